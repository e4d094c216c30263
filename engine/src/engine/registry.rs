//! Registry events (the marketplace): listings, applications, and the
//! partners, links and codes approval creates; and the lookups that see the
//! rules file and the registry as one directory.

use afflio_rules::{normalize_code, Code, Link, Listing, Marketplace, Partner, Program, Rules};
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use super::validate::{reject, Reject};
use super::Engine;
use crate::event::Event;
use crate::output::Reason;
use crate::registry::{
    AppStatus, Application, Apply, Decide, ListingState, NewCode, NewLink, Publish, RegPartner, RegistryEvent,
    UpdatePartner, Verdict, MAX_APPLICATIONS, MAX_CHANNELS, MAX_PENDING, MAX_PER_PARTNER, MAX_TEXT,
};

/// How many suffixes are tried to make a generated link id or code unique.
const MAX_SUFFIX: u32 = 1000;

fn invalid(field: &str, detail: String) -> Reject {
    reject(Reason::InvalidRegistry, field.to_string(), detail)
}

/// An id: 1 to 64 bytes of letters, digits, '-', '_' and '.'.
fn check_id(field: &str, v: &str) -> Result<(), Reject> {
    let ok = !v.is_empty()
        && v.len() <= 64
        && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(invalid(field, format!("{field} {v:?} must be 1 to 64 letters, digits, '-', '_' or '.'")))
    }
}

fn check_code(field: &str, v: &str) -> Result<(), Reject> {
    let ok = !v.is_empty() && v.len() <= 32 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(invalid(field, format!("{field} {v:?} must be 1 to 32 letters, digits, '-' or '_'")))
    }
}

fn check_text(field: &str, v: &str, max: usize, required: bool) -> Result<(), Reject> {
    if required && v.trim().is_empty() {
        return Err(invalid(field, format!("{field} must not be empty")));
    }
    if v.len() > max {
        return Err(invalid(field, format!("{field} is {} bytes, over the limit of {max}", v.len())));
    }
    if v.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return Err(invalid(field, format!("{field} holds control characters")));
    }
    Ok(())
}

fn check_url(field: &str, v: &str) -> Result<(), Reject> {
    let ok = (v.starts_with("https://") || v.starts_with("http://"))
        && v.len() <= 512
        && !v.chars().any(|c| c.is_control() || c.is_whitespace());
    if ok {
        Ok(())
    } else {
        Err(invalid(field, format!("{field} {v:?} is not an http(s) URL of at most 512 bytes")))
    }
}

fn check_email(v: &str) -> Result<(), Reject> {
    let ok = v.len() <= 254
        && v.split_once('@').is_some_and(|(a, b)| !a.is_empty() && b.contains('.'))
        && !v.chars().any(|c| c.is_control() || c.is_whitespace());
    if ok {
        Ok(())
    } else {
        Err(invalid("data.email", format!("email {v:?} is not an e-mail address")))
    }
}

/// Lower-case hex SHA-256 of a trimmed, lower-cased e-mail address (the
/// form self-referral matches customers' `email_sha256` in).
pub fn email_sha256(email: &str) -> String {
    let d = Sha256::digest(email.trim().to_lowercase().as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// A partner, from the rules file or the registry (a free function, so that
/// callers holding other parts of the engine mutably can use it).
pub(super) fn lookup_partner<'a>(
    names: &crate::state::Names,
    registry: &'a crate::registry::Registry,
    rules: &'a Rules,
    id: &str,
) -> Option<&'a Partner> {
    rules.partner(id).or_else(|| names.get(id).and_then(|p| registry.partners.get(&p)).map(|r| &r.partner))
}

/// A program's listing as the marketplace shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct ListingView {
    pub program_id: String,
    pub listing: Listing,
    pub listed: bool,
}

/// A partner's own view of the registry: what identifies it, its links and codes.
#[derive(Clone, Debug, PartialEq)]
pub struct PartnerView {
    pub partner_id: String,
    pub program_id: String,
    pub display_name: String,
    /// `None` for a partner of the rules file.
    pub registry: Option<RegPartner>,
    pub links: Vec<Link>,
    /// Codes with their uses so far.
    pub codes: Vec<(Code, u64)>,
}

impl Engine {
    pub(super) fn apply_registry(
        &mut self,
        e: &Event<'_>,
        r: &RegistryEvent,
        rules: &Rules,
        program: &Program,
        prog: u32,
    ) -> Result<(), Reject> {
        match r {
            RegistryEvent::ProgramPublished(p) => self.publish(e.ts, p, prog),
            RegistryEvent::PartnerApplied(a) => self.apply_application(e.ts, a, rules, program, prog),
            RegistryEvent::ApplicationDecided(d) => self.decide(e.ts, d, rules, program, prog),
            RegistryEvent::LinkCreated(l) => self.create_link(l, rules, program, prog),
            RegistryEvent::CodeCreated(c) => self.create_code(e.ts, c, rules, program, prog),
            RegistryEvent::PartnerUpdated(u) => self.update_partner(u, rules, program),
        }?;
        self.meta.stats.applied_registry += 1;
        if self.notices {
            let app_id = match r {
                RegistryEvent::PartnerApplied(a) => {
                    let detail = vec![("display_name", a.display_name.clone())];
                    self.notice("partner.applied", e, Some(a.partner_id.as_str().into()), &a.application_id, detail);
                    Some(a.application_id.as_str())
                }
                RegistryEvent::ApplicationDecided(d) => Some(d.application_id.as_str()),
                _ => None,
            };
            if let Some(app) = app_id.and_then(|id| self.application(&program.id, id)) {
                if app.status == crate::registry::AppStatus::Approved && app.decided_at == Some(e.ts) {
                    let partner = Some(app.apply.partner_id.as_str().into());
                    self.notice("partner.approved", e, partner, &app.apply.application_id, Vec::new());
                }
            }
        }
        Ok(())
    }

    fn publish(&mut self, ts: DateTime<Utc>, p: &Publish, prog: u32) -> Result<(), Reject> {
        check_text("data.name", &p.name, 128, true)?;
        check_text("data.description", &p.description, MAX_TEXT, false)?;
        check_text("data.terms", &p.terms, MAX_TEXT, false)?;
        check_text("data.category", &p.category, 64, false)?;
        let listing = Listing {
            name: p.name.trim().into(),
            description: p.description.trim().into(),
            terms: p.terms.trim().into(),
            category: p.category.trim().into(),
        };
        self.registry.listings.insert(prog, ListingState { listing, listed: p.listed, published_at: ts });
        Ok(())
    }

    fn apply_application(
        &mut self,
        ts: DateTime<Utc>,
        a: &Apply,
        rules: &Rules,
        program: &Program,
        prog: u32,
    ) -> Result<(), Reject> {
        if !self.listing_of(program, prog).is_some_and(|l| l.listed) {
            return Err(invalid(
                "program_id",
                format!("program {:?} is not listed in the marketplace: it takes no applications", program.id),
            ));
        }
        check_id("data.application_id", &a.application_id)?;
        check_id("data.partner_id", &a.partner_id)?;
        check_text("data.display_name", &a.display_name, 128, true)?;
        check_email(&a.email)?;
        check_text("data.audience", &a.audience, MAX_TEXT, false)?;
        if a.channels.len() > MAX_CHANNELS {
            return Err(invalid(
                "data.channels",
                format!("{} channels, over the limit of {MAX_CHANNELS}", a.channels.len()),
            ));
        }
        for (i, c) in a.channels.iter().enumerate() {
            check_url(&format!("data.channels[{i}]"), c)?;
        }
        if let Some(p) = &a.payout {
            afflio_rules::check_payout(p).map_err(|(f, d)| invalid(&format!("data.{f}"), d))?;
        }
        let (all, pending) = self.registry.counts.get(&prog).copied().unwrap_or_default();
        if pending >= MAX_PENDING || all >= MAX_APPLICATIONS {
            return Err(invalid(
                "program_id",
                format!(
                    "program {:?} has {pending} applications waiting ({all} in all): at most {MAX_PENDING} wait and {MAX_APPLICATIONS} are kept",
                    program.id
                ),
            ));
        }
        let app = self.names.intern(&a.application_id);
        if self.registry.applications.contains_key(&(prog, app)) {
            return Err(reject(
                Reason::DuplicateId,
                "data.application_id",
                format!("application_id {:?} exists in program {:?}", a.application_id, program.id),
            ));
        }
        if self.partner_taken(rules, &a.partner_id) {
            return Err(reject(
                Reason::DuplicateId,
                "data.partner_id",
                format!("partner_id {:?} is taken: choose another", a.partner_id),
            ));
        }
        let partner = self.names.intern(&a.partner_id);
        self.registry.claimed.insert(partner, (prog, app));
        let c = self.registry.counts.entry(prog).or_default();
        c.0 += 1;
        c.1 += 1;
        self.registry.applications.insert(
            (prog, app),
            Box::new(Application {
                program_id: program.id.clone(),
                apply: a.clone(),
                applied_at: ts,
                status: AppStatus::Pending,
                reason: None,
                decided_by: None,
                decided_at: None,
            }),
        );
        if program.marketplace.auto_approve {
            let d = Decide {
                application_id: a.application_id.clone(),
                decision: Verdict::Approve,
                reason: Some("approved by the program's auto_approve rule".into()),
                decided_by: "auto".into(),
            };
            self.decide(ts, &d, rules, program, prog)?;
        }
        Ok(())
    }

    fn decide(
        &mut self,
        ts: DateTime<Utc>,
        d: &Decide,
        rules: &Rules,
        program: &Program,
        prog: u32,
    ) -> Result<(), Reject> {
        check_text("data.decided_by", &d.decided_by, 128, true)?;
        if let Some(r) = &d.reason {
            check_text("data.reason", r, MAX_TEXT, false)?;
        }
        let unknown = || {
            reject(
                Reason::UnknownApplication,
                "data.application_id",
                format!("application_id {:?} names no application to program {:?}", d.application_id, program.id),
            )
        };
        let app = self.names.get(&d.application_id).ok_or_else(unknown)?;
        let current = self.registry.applications.get(&(prog, app)).ok_or_else(unknown)?;
        if current.status != AppStatus::Pending {
            return Err(reject(
                Reason::AlreadyDecided,
                "data.application_id",
                format!("application {:?} was {} before", d.application_id, current.status.as_str()),
            ));
        }
        if d.decision == Verdict::Reject && d.reason.as_deref().is_none_or(|r| r.trim().is_empty()) {
            return Err(invalid("data.reason", "a rejection needs a `reason`".into()));
        }
        let apply = current.apply.clone();
        if d.decision == Verdict::Approve {
            self.create_partner(ts, &apply, rules, program, prog);
        }
        if let Some(c) = self.registry.counts.get_mut(&prog) {
            c.1 = c.1.saturating_sub(1);
        }
        let a = self.registry.applications.get_mut(&(prog, app)).expect("checked above");
        a.status = if d.decision == Verdict::Approve { AppStatus::Approved } else { AppStatus::Rejected };
        a.reason = d.reason.clone();
        a.decided_by = Some(d.decided_by.clone());
        a.decided_at = Some(ts);
        Ok(())
    }

    /// The approved creator as a partner, with a link and a code made from
    /// the program's patterns (a suffix makes them unique).
    fn create_partner(&mut self, ts: DateTime<Utc>, a: &Apply, rules: &Rules, program: &Program, prog: u32) {
        let m = &program.marketplace;
        let base_link = Marketplace::expand(&m.link_pattern, &program.id, &a.partner_id);
        let link_id = (1..=MAX_SUFFIX)
            .map(|n| if n == 1 { base_link.clone() } else { format!("{base_link}-{n}") })
            .find(|id| check_id("link", id).is_ok() && self.find_link_any(rules, id).is_none());
        let base_code = normalize_code(&Marketplace::expand(&m.code_pattern, &program.id, &a.partner_id));
        let code = (1..=MAX_SUFFIX)
            .map(|n| if n == 1 { base_code.clone() } else { format!("{base_code}{n}") })
            .find(|c| check_code("code", c).is_ok() && self.find_code_any(program, prog, c).is_none());
        let partner = Partner {
            id: a.partner_id.clone(),
            program_id: program.id.clone(),
            parent: None,
            rate: None,
            category_rates: Default::default(),
            email_sha256: [email_sha256(&a.email)].into_iter().collect(),
            customer_ids: Default::default(),
            payout: a.payout.clone(),
            lead_reward: None,
        };
        let mut reg = RegPartner {
            partner,
            display_name: a.display_name.trim().to_string(),
            email: a.email.clone(),
            active: true,
            token_epoch: 0,
            joined_at: ts,
            application_id: a.application_id.clone(),
            links: Vec::new(),
            codes: Vec::new(),
        };
        if let Some(id) = link_id {
            let link = Link {
                id: id.clone(),
                partner_id: a.partner_id.clone(),
                program_id: program.id.clone(),
                destination: m.destination.clone(),
            };
            self.insert_link(link);
            reg.links.push(id);
        }
        if let Some(c) = code {
            let code = Code {
                code: c.clone(),
                normalized: c.clone(),
                partner_id: a.partner_id.clone(),
                starts_at: Some(ts),
                expires_at: m.code_valid_for.map(|d| ts + d),
                max_uses: m.code_max_uses,
            };
            let k = self.names.intern(&c);
            self.registry.codes.insert((prog, k), code);
            reg.codes.push(c);
        }
        let p = self.names.intern(&a.partner_id);
        self.registry.partners.insert(p, Box::new(reg));
    }

    fn insert_link(&mut self, link: Link) {
        let k = self.names.intern(&link.id);
        if self.link_feed {
            self.new_links.push(link.clone());
        }
        self.registry.links.insert(k, link);
    }

    /// A partner of `program`, from the rules file or the registry.
    fn program_partner<'a>(&'a self, rules: &'a Rules, program: &Program, id: &str) -> Result<&'a Partner, Reject> {
        self.find_partner(rules, id).filter(|p| p.program_id == program.id).ok_or_else(|| {
            reject(
                Reason::UnknownPartner,
                "data.partner_id",
                format!("partner_id {id:?} names no partner of program {:?}", program.id),
            )
        })
    }

    fn own_count(&self, partner_id: &str, links: bool) -> usize {
        let reg = self.names.get(partner_id).and_then(|p| self.registry.partners.get(&p));
        reg.map_or(0, |r| if links { r.links.len() } else { r.codes.len() })
    }

    fn create_link(&mut self, l: &NewLink, rules: &Rules, program: &Program, _prog: u32) -> Result<(), Reject> {
        check_id("data.link_id", &l.link_id)?;
        if let Some(d) = &l.destination {
            check_url("data.destination", d)?;
        }
        self.program_partner(rules, program, &l.partner_id)?;
        if self.find_link_any(rules, &l.link_id).is_some() {
            return Err(reject(Reason::DuplicateId, "data.link_id", format!("link_id {:?} exists", l.link_id)));
        }
        if self.own_count(&l.partner_id, true) >= MAX_PER_PARTNER {
            return Err(invalid("data.partner_id", format!("partner {:?} has {MAX_PER_PARTNER} links", l.partner_id)));
        }
        let link = Link {
            id: l.link_id.clone(),
            partner_id: l.partner_id.clone(),
            program_id: program.id.clone(),
            destination: l.destination.clone().or_else(|| program.marketplace.destination.clone()),
        };
        self.insert_link(link);
        if let Some(r) = self.names.get(&l.partner_id).and_then(|p| self.registry.partners.get_mut(&p)) {
            r.links.push(l.link_id.clone());
        }
        Ok(())
    }

    fn create_code(
        &mut self,
        ts: DateTime<Utc>,
        c: &NewCode,
        rules: &Rules,
        program: &Program,
        prog: u32,
    ) -> Result<(), Reject> {
        let norm = normalize_code(&c.code);
        check_code("data.code", &norm)?;
        self.program_partner(rules, program, &c.partner_id)?;
        if self.find_code_any(program, prog, &norm).is_some() {
            return Err(reject(
                Reason::DuplicateId,
                "data.code",
                format!("code {norm:?} exists in program {:?}", program.id),
            ));
        }
        if let (Some(s), Some(x)) = (c.starts_at, c.expires_at) {
            if x <= s {
                return Err(invalid("data.expires_at", "expires_at must be after starts_at".into()));
            }
        }
        if c.max_uses == Some(0) {
            return Err(invalid("data.max_uses", "max_uses must be at least 1".into()));
        }
        if self.own_count(&c.partner_id, false) >= MAX_PER_PARTNER {
            return Err(invalid("data.partner_id", format!("partner {:?} has {MAX_PER_PARTNER} codes", c.partner_id)));
        }
        let code = Code {
            code: c.code.trim().to_string(),
            normalized: norm.clone(),
            partner_id: c.partner_id.clone(),
            starts_at: Some(c.starts_at.unwrap_or(ts)),
            expires_at: c.expires_at,
            max_uses: c.max_uses,
        };
        let k = self.names.intern(&norm);
        self.registry.codes.insert((prog, k), code);
        if let Some(r) = self.names.get(&c.partner_id).and_then(|p| self.registry.partners.get_mut(&p)) {
            r.codes.push(norm);
        }
        Ok(())
    }

    fn update_partner(&mut self, u: &UpdatePartner, rules: &Rules, program: &Program) -> Result<(), Reject> {
        let unknown = || {
            reject(
                Reason::UnknownPartner,
                "data.partner_id",
                format!(
                    "partner_id {:?} names no marketplace partner of program {:?} (partners of the rules file change there)",
                    u.partner_id, program.id
                ),
            )
        };
        if rules.partner(&u.partner_id).is_some() {
            return Err(unknown());
        }
        let p = self.names.get(&u.partner_id).ok_or_else(unknown)?;
        match self.registry.partners.get(&p) {
            Some(r) if r.partner.program_id == program.id => {}
            _ => return Err(unknown()),
        }
        if let Some(n) = &u.display_name {
            check_text("data.display_name", n, 128, true)?;
        }
        if let Some(po) = &u.payout {
            afflio_rules::check_payout(po).map_err(|(f, d)| invalid(&format!("data.{f}"), d))?;
        }
        let mut hashes = Vec::new();
        for (i, h) in u.email_sha256.iter().flatten().enumerate() {
            let v = h.trim().to_ascii_lowercase();
            if v.len() != 64 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid(&format!("data.email_sha256[{i}]"), format!("{h:?} is not a hex SHA-256")));
            }
            hashes.push(v);
        }
        for (i, c) in u.customer_ids.iter().flatten().enumerate() {
            check_text(&format!("data.customer_ids[{i}]"), c, 128, true)?;
        }
        if hashes.len() + u.customer_ids.as_ref().map_or(0, Vec::len) > 2 * MAX_PER_PARTNER {
            return Err(invalid("data", format!("more than {} identities", 2 * MAX_PER_PARTNER)));
        }
        let r = self.registry.partners.get_mut(&p).expect("checked above");
        if let Some(n) = &u.display_name {
            r.display_name = n.trim().to_string();
        }
        if let Some(po) = &u.payout {
            r.partner.payout = Some(po.clone());
        }
        if u.email_sha256.is_some() {
            r.partner.email_sha256 = hashes.into_iter().collect();
        }
        if let Some(ids) = &u.customer_ids {
            r.partner.customer_ids = ids.iter().cloned().collect();
        }
        if let Some(a) = u.active {
            r.active = a;
            // Clicks resolve links through a cache: a suspended partner's must go.
            self.link_targets.clear();
        }
        if u.rotate_token {
            r.token_epoch += 1;
        }
        Ok(())
    }

    fn partner_taken(&self, rules: &Rules, id: &str) -> bool {
        rules.partner(id).is_some()
            || self
                .names
                .get(id)
                .is_some_and(|p| self.registry.partners.contains_key(&p) || self.registry.claimed.contains_key(&p))
    }

    fn active(&self, partner_id: &str) -> bool {
        self.names.get(partner_id).and_then(|p| self.registry.partners.get(&p)).is_none_or(|r| r.active)
    }

    /// A link of the rules file or the registry, whatever its partner's state.
    fn find_link_any<'a>(&'a self, rules: &'a Rules, id: &str) -> Option<&'a Link> {
        rules.link(id).or_else(|| self.names.get(id).and_then(|k| self.registry.links.get(&k)))
    }

    fn find_code_any<'a>(&'a self, program: &'a Program, prog: u32, norm: &str) -> Option<&'a Code> {
        program.codes.get(norm).or_else(|| self.names.get(norm).and_then(|k| self.registry.codes.get(&(prog, k))))
    }

    /// A partner, from the rules file or the registry.
    pub(crate) fn find_partner<'a>(&'a self, rules: &'a Rules, id: &str) -> Option<&'a Partner> {
        lookup_partner(&self.names, &self.registry, rules, id)
    }

    /// A link that credits clicks: of the rules file, or of an active registry partner.
    pub(crate) fn find_link<'a>(&'a self, rules: &'a Rules, id: &str) -> Option<&'a Link> {
        self.find_link_any(rules, id).filter(|l| self.active(&l.partner_id))
    }

    /// A registry code that credits orders: its partner is active. (The
    /// rules file's codes are looked up in the program first.)
    pub(crate) fn registry_code(&self, prog: u32, norm: &str) -> Option<&Code> {
        let k = self.names.get(norm)?;
        self.registry.codes.get(&(prog, k)).filter(|c| self.active(&c.partner_id))
    }

    fn listing_of(&self, program: &Program, prog: u32) -> Option<ListingState> {
        match self.registry.listings.get(&prog) {
            Some(l) => Some(l.clone()),
            None => program.marketplace.listing.clone().map(|listing| ListingState {
                listing,
                listed: true,
                published_at: DateTime::<Utc>::MIN_UTC,
            }),
        }
    }

    // ----- Reads for the marketplace API and pages.

    /// Every program with a listing (listed or taken down), by program id.
    pub fn listings(&self) -> Vec<ListingView> {
        let mut out: Vec<ListingView> = self
            .rules
            .programs()
            .filter_map(|p| {
                let prog = self.names.get(&p.id);
                let l = match prog.and_then(|k| self.registry.listings.get(&k)) {
                    Some(l) => l.clone(),
                    None => ListingState {
                        listing: p.marketplace.listing.clone()?,
                        listed: true,
                        published_at: DateTime::<Utc>::MIN_UTC,
                    },
                };
                Some(ListingView { program_id: p.id.clone(), listing: l.listing, listed: l.listed })
            })
            .collect();
        out.sort_by(|a, b| a.program_id.cmp(&b.program_id));
        out
    }

    /// A program's applications, newest first, at most `limit`.
    pub fn applications(&self, program_id: &str, status: Option<AppStatus>, limit: usize) -> Vec<Application> {
        let Some(prog) = self.names.get(program_id) else { return Vec::new() };
        let mut v: Vec<&Application> = self
            .registry
            .applications
            .iter()
            .filter(|((p, _), a)| *p == prog && status.is_none_or(|s| a.status == s))
            .map(|(_, a)| &**a)
            .collect();
        v.sort_by(|a, b| {
            b.applied_at.cmp(&a.applied_at).then_with(|| a.apply.application_id.cmp(&b.apply.application_id))
        });
        v.into_iter().take(limit).cloned().collect()
    }

    pub fn application(&self, program_id: &str, application_id: &str) -> Option<Application> {
        let prog = self.names.get(program_id)?;
        let app = self.names.get(application_id)?;
        self.registry.applications.get(&(prog, app)).map(|a| (**a).clone())
    }

    /// The application that claimed a partner id (pending, approved or rejected).
    pub fn application_of_partner(&self, partner_id: &str) -> Option<Application> {
        let p = self.names.get(partner_id)?;
        let key = self.registry.claimed.get(&p)?;
        self.registry.applications.get(key).map(|a| (**a).clone())
    }

    /// The program a partner id belongs to (or applied to) and its token
    /// epoch: what a partner access token is derived from.
    pub fn partner_token_epoch(&self, partner_id: &str) -> Option<(String, u32)> {
        if let Some(p) = self.rules.partner(partner_id) {
            return Some((p.program_id.clone(), 0));
        }
        let k = self.names.get(partner_id)?;
        if let Some(r) = self.registry.partners.get(&k) {
            return Some((r.partner.program_id.clone(), r.token_epoch));
        }
        let (prog, _) = self.registry.claimed.get(&k)?;
        Some((self.names.name(*prog).to_string(), 0))
    }

    /// A partner's registry view: its links and codes (of the file and the registry).
    pub fn partner_view(&self, partner_id: &str) -> Option<PartnerView> {
        let partner = self.find_partner(&self.rules, partner_id)?;
        let registry = self.names.get(partner_id).and_then(|p| self.registry.partners.get(&p)).map(|r| (**r).clone());
        let mut links: Vec<Link> = self.rules.links().filter(|l| l.partner_id == partner_id).cloned().collect();
        links.sort_by(|a, b| a.id.cmp(&b.id));
        let program = self.rules.program(&partner.program_id)?;
        let prog = self.names.get(&program.id);
        let uses =
            |norm: &str| prog.zip(self.names.get(norm)).and_then(|k| self.code_uses.get(&k)).copied().unwrap_or(0);
        let mut codes: Vec<(Code, u64)> = program
            .codes
            .values()
            .filter(|c| c.partner_id == partner_id)
            .map(|c| (c.clone(), uses(&c.normalized)))
            .collect();
        codes.sort_by(|a, b| a.0.normalized.cmp(&b.0.normalized));
        if let Some(r) = &registry {
            links.extend(r.links.iter().filter_map(|id| self.find_link_any(&self.rules, id)).cloned());
            if let Some(prog) = prog {
                codes.extend(r.codes.iter().filter_map(|c| {
                    let k = self.names.get(c)?;
                    Some((self.registry.codes.get(&(prog, k))?.clone(), uses(c)))
                }));
            }
        }
        Some(PartnerView {
            partner_id: partner_id.to_string(),
            program_id: partner.program_id.clone(),
            display_name: registry.as_ref().map_or_else(|| partner_id.to_string(), |r| r.display_name.clone()),
            registry,
            links,
            codes,
        })
    }

    /// Where a partner (of the rules file or the registry) is paid.
    pub fn partner_payout(&self, partner_id: &str) -> Option<afflio_rules::Payout> {
        self.find_partner(&self.rules, partner_id).and_then(|p| p.payout.clone())
    }

    /// Links the registry holds (for the ingest tier's directory).
    pub fn registry_links(&self) -> Vec<Link> {
        self.registry.links.values().filter(|l| self.active(&l.partner_id)).cloned().collect()
    }

    /// Links created since the last call (the ingest tier learns them).
    pub fn take_new_links(&mut self) -> Vec<Link> {
        std::mem::take(&mut self.new_links)
    }

    /// Keeps the links created for [`Engine::take_new_links`] (off by default).
    pub fn set_link_feed(&mut self, on: bool) {
        self.link_feed = on;
        if !on {
            self.new_links = Vec::new();
        }
    }

    /// Registry sizes: applications, partners, links, codes.
    pub fn registry_sizes(&self) -> [usize; 4] {
        let r = &self.registry;
        [r.applications.len(), r.partners.len(), r.links.len(), r.codes.len()]
    }
}
