//! Who is asking: partner access tokens, console sessions and CSRF tokens.
//!
//! Nothing here is stored: every token is a MAC (HMAC-SHA256) under the
//! service's portal secret over what it grants, checked in constant time.
//! - A partner token names the partner and its token epoch; a
//!   `partner_updated` event with `rotate_token` raises the epoch, and every
//!   older token stops working.
//! - A console session names an API key by a fingerprint (a hash, never the
//!   key) and an expiry; removing the key from the rules ends the session.
//! - Console forms carry a CSRF token derived from the session; anonymous
//!   forms (apply, partner sign-in) use a double-submit cookie.

use afflio_engine::rules::{KeyRole, Rules};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// How long a console session lasts.
pub(crate) const SESSION_SECS: i64 = 8 * 3600;

/// The key all tokens are derived under. Never logged.
#[derive(Clone)]
pub(crate) struct PortalSecret(Vec<u8>);

impl std::fmt::Debug for PortalSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PortalSecret(***)")
    }
}

impl PortalSecret {
    #[cfg(test)]
    pub(crate) fn new(bytes: Vec<u8>) -> PortalSecret {
        PortalSecret(bytes)
    }

    /// From `AFFLIO_PORTAL_SECRET` (at least 32 bytes), or random: then
    /// tokens and sessions do not survive a restart, which is said once.
    pub(crate) fn from_env() -> PortalSecret {
        match std::env::var("AFFLIO_PORTAL_SECRET") {
            Ok(s) if s.len() >= 32 => PortalSecret(s.into_bytes()),
            Ok(_) => {
                eprintln!("afflio: AFFLIO_PORTAL_SECRET is shorter than 32 bytes: ignored, using a random secret");
                PortalSecret(rand::random::<[u8; 32]>().to_vec())
            }
            Err(_) => {
                eprintln!(
                    "afflio: AFFLIO_PORTAL_SECRET is not set: partner tokens and console sessions last until a restart"
                );
                PortalSecret(rand::random::<[u8; 32]>().to_vec())
            }
        }
    }

    fn mac(&self, parts: &[&str]) -> String {
        let mut m = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        for p in parts {
            m.update(&(p.len() as u64).to_le_bytes());
            m.update(p.as_bytes());
        }
        hex::encode(&m.finalize().into_bytes()[..20])
    }

    /// The access token of a partner at a token epoch.
    pub(crate) fn partner_token(&self, program: &str, partner: &str, epoch: u32) -> String {
        let mac = self.mac(&["partner", program, partner, &epoch.to_string()]);
        format!("pt_{}_{epoch}_{mac}", hex::encode(partner))
    }

    /// The partner a token claims and its epoch (not yet verified: check it
    /// with [`PortalSecret::verify_partner`] against the registry).
    pub(crate) fn claimed_partner(token: &str) -> Option<(String, u32)> {
        let rest = token.strip_prefix("pt_")?;
        let mut it = rest.split('_');
        let partner = String::from_utf8(hex::decode(it.next()?).ok()?).ok()?;
        let epoch = it.next()?.parse().ok()?;
        Some((partner, epoch))
    }

    pub(crate) fn verify_partner(&self, token: &str, program: &str, partner: &str, epoch: u32) -> bool {
        let want = self.partner_token(program, partner, epoch);
        bool::from(want.as_bytes().ct_eq(token.as_bytes()))
    }

    /// A console session for `key` until `expires` (unix seconds).
    pub(crate) fn session(&self, key: &str, expires: i64) -> String {
        let fp = key_fingerprint(key);
        let mac = self.mac(&["console", &fp, &expires.to_string()]);
        format!("{fp}.{expires}.{mac}")
    }

    /// The key a session speaks for, if it is genuine, unexpired and the key
    /// is still in the rules.
    pub(crate) fn verify_session(&self, rules: &Rules, session: &str, now: i64) -> Option<ConsoleUser> {
        let mut it = session.split('.');
        let (fp, exp, mac) = (it.next()?, it.next()?, it.next()?);
        let expires: i64 = exp.parse().ok()?;
        let want = self.mac(&["console", fp, exp]);
        if !bool::from(want.as_bytes().ct_eq(mac.as_bytes())) || expires <= now {
            return None;
        }
        let key = rules.api_keys().iter().find(|k| key_fingerprint(k.key.expose()) == fp)?;
        Some(ConsoleUser { program_id: key.program_id.clone(), role: key.role, fingerprint: fp.to_string() })
    }

    /// The CSRF token of a session's forms.
    pub(crate) fn csrf(&self, session: &str) -> String {
        self.mac(&["csrf", session])
    }

    pub(crate) fn check_csrf(&self, session: &str, given: &str) -> bool {
        bool::from(self.csrf(session).as_bytes().ct_eq(given.as_bytes()))
    }
}

/// Who is signed in to the console.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ConsoleUser {
    pub(crate) program_id: String,
    pub(crate) role: KeyRole,
    /// The key's fingerprint: who decided, in registry and review events.
    pub(crate) fingerprint: String,
}

/// The first 16 hex digits of the key's SHA-256: names a key without revealing it.
pub(crate) fn key_fingerprint(key: &str) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

/// A cookie's value from the request's `Cookie` headers.
pub(crate) fn cookie(headers: &axum::http::HeaderMap, name: &str) -> Option<String> {
    headers.get_all(axum::http::header::COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(|c| {
        c.split(';').find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name && !v.is_empty() && v.len() <= 512).then(|| v.to_string())
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_bound_to_partner_program_and_epoch_and_sessions_expire() {
        let s = PortalSecret::new(b"0123456789abcdef0123456789abcdef".to_vec());
        let t = s.partner_token("acme", "maya", 0);
        assert_eq!(PortalSecret::claimed_partner(&t), Some(("maya".into(), 0)));
        assert!(s.verify_partner(&t, "acme", "maya", 0));
        assert!(!s.verify_partner(&t, "acme", "maya", 1), "a rotated epoch ends the token");
        assert!(!s.verify_partner(&t, "other", "maya", 0));
        let forged = t.replace(&hex::encode("maya"), &hex::encode("noor"));
        let (p, e) = PortalSecret::claimed_partner(&forged).unwrap();
        assert!(!s.verify_partner(&forged, "acme", &p, e), "another partner's name under maya's MAC");
        let other = PortalSecret::new(b"another secret of 32 bytes or more!!".to_vec());
        assert!(!other.verify_partner(&t, "acme", "maya", 0));

        let rules = Rules::parse(
            "t",
            r#"
[[programs]]
id = "acme"
currency = "USD"
rate = "10%"
[[api_keys]]
program_id = "acme"
key = "brand-key-0123456789"
role = "brand"
"#,
        )
        .unwrap();
        let session = s.session("brand-key-0123456789", 1_000);
        let user = s.verify_session(&rules, &session, 999).unwrap();
        assert_eq!((user.program_id.as_str(), user.role), ("acme", KeyRole::Brand));
        assert!(s.verify_session(&rules, &session, 1_000).is_none(), "expired");
        assert!(s.verify_session(&rules, &session.replace(".1000.", ".9999."), 999).is_none(), "expiry is signed");
        assert!(s.verify_session(&rules, &s.session("not-a-key-of-the-rules", 1_000), 999).is_none());
        assert!(!session.contains("brand-key"), "the key itself is never in the cookie");
        assert!(s.check_csrf(&session, &s.csrf(&session)));
        assert!(!s.check_csrf(&session, &s.csrf("another session")));
    }
}
