//! `GET /r/{link_id}`: the tracking redirect. A shopper is always sent on;
//! a click is recorded only when it is one: a `GET` (not `HEAD`), not from a
//! known bot or link-preview fetcher, not the same visitor on the same link
//! again within the dedupe interval. The client's address is the peer's
//! unless the peer is a trusted proxy. Over-long parameters are cut to the
//! event's limits (the click is kept, counted as truncated).

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use chrono::{SecondsFormat, Utc};
use dashmap::DashMap;
use serde_json::json;

use super::{client_ip, rules, AppState};
use crate::decode::{decode_event, LIMITS};

const VISITOR_COOKIE: &str = "afflio_vid";

/// How the redirect records clicks.
#[derive(Clone, Debug)]
pub struct RedirectConfig {
    /// Extra user-agent patterns (regular expressions) to treat as bots, on
    /// top of the maintained list (`isbot`).
    pub bot_patterns: Vec<String>,
    /// The same visitor on the same link within this counts once.
    pub dedupe_interval: Duration,
    /// At most this many (visitor, link) pairs remembered for it.
    pub dedupe_capacity: usize,
    /// The visitor cookie's `Secure` attribute (set it when served over HTTPS).
    pub cookie_secure: bool,
    /// The visitor cookie's `Domain` (default: the host only).
    pub cookie_domain: Option<String>,
}

impl Default for RedirectConfig {
    fn default() -> Self {
        RedirectConfig {
            bot_patterns: Vec::new(),
            dedupe_interval: Duration::from_secs(30),
            dedupe_capacity: 1_000_000,
            cookie_secure: false,
            cookie_domain: None,
        }
    }
}

/// Recent clicks by (visitor, link): shared by the request tasks, bounded.
pub struct ClickDedupe {
    seen: DashMap<u128, i64>,
    capacity: usize,
}

impl ClickDedupe {
    pub fn new(capacity: usize) -> ClickDedupe {
        ClickDedupe { seen: DashMap::new(), capacity: capacity.max(1) }
    }

    /// Whether a click of `visitor` on `link` at `now_us` is new (none within `interval`).
    pub fn first(&self, visitor: &str, link: &str, now_us: i64, interval: Duration) -> bool {
        let key = xxhash_rust::xxh3::xxh3_128(format!("{visitor}\u{0}{link}").as_bytes());
        let window = interval.as_micros() as i64;
        if self.seen.len() >= self.capacity {
            // Forget what is older than the interval; if that is not enough, forget all.
            self.seen.retain(|_, t| now_us - *t < window);
            if self.seen.len() >= self.capacity {
                self.seen.clear();
            }
        }
        let mut new = true;
        self.seen
            .entry(key)
            .and_modify(|t| {
                if now_us - *t < window {
                    new = false;
                } else {
                    *t = now_us;
                }
            })
            .or_insert(now_us);
        new
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

fn visitor_from_cookie(headers: &axum::http::HeaderMap) -> Option<String> {
    let cookies = headers.get(header::COOKIE)?.to_str().ok()?;
    cookies.split(';').find_map(|c| {
        let v = c.trim().strip_prefix(VISITOR_COOKIE)?.strip_prefix('=')?;
        let ok = !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        ok.then(|| v.to_string())
    })
}

/// `s` cut to at most `max` bytes at a character boundary, without control
/// characters; and whether anything was cut.
fn bounded(s: &str, max: usize) -> (String, bool) {
    let clean: String = s.chars().filter(|c| !c.is_control()).collect();
    if clean.len() <= max {
        let cut = clean.len() != s.len();
        return (clean, cut);
    }
    let mut end = max;
    while !clean.is_char_boundary(end) {
        end -= 1;
    }
    (clean[..end].to_string(), true)
}

pub(super) async fn redirect(
    State(st): State<AppState>,
    Path(link_id): Path<String>,
    Query(params): Query<Vec<(String, String)>>,
    req: Request,
) -> Response {
    let rules = rules(&st.ingest);
    let link = match rules.link(&link_id) {
        Some(l) => l.clone(),
        None => match st.ingest.links.get(&link_id) {
            Some(r) => afflio_engine::rules::Link {
                id: link_id.clone(),
                partner_id: r.partner_id,
                program_id: r.program_id,
                destination: r.destination,
            },
            None => return (StatusCode::NOT_FOUND, "unknown link\n").into_response(),
        },
    };
    let Some(destination) = link.destination.clone() else {
        return (StatusCode::NOT_FOUND, "this link has no destination\n").into_response();
    };
    let m = &st.ingest.metrics;
    let headers = req.headers();
    let (visitor, new_visitor) = match visitor_from_cookie(headers) {
        Some(v) => (v, false),
        None => (format!("{:032x}", rand::random::<u128>()), true),
    };
    let mut truncated = false;
    let mut param = |v: &str| {
        let (v, cut) = bounded(v, LIMITS.string_bytes);
        truncated |= cut;
        v
    };
    let pass: Vec<(String, String)> = params
        .iter()
        .filter(|(k, _)| k == "sub_id" || k.starts_with("utm_"))
        .map(|(k, v)| (k.clone(), param(v)))
        .collect();
    let mut location = destination.clone();
    if !pass.is_empty() {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for (k, v) in &pass {
            q.append_pair(k, v);
        }
        location.push(if location.contains('?') { '&' } else { '?' });
        location.push_str(&q.finish());
    }
    let user_agent = headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok()).map(&mut param);
    let sub_id = pass.iter().find(|(k, _)| k == "sub_id").map(|(_, v)| v.clone());
    let now = Utc::now();
    // What is not a shopper's click is redirected and not recorded.
    let counted = if req.method() != Method::GET {
        false
    } else if user_agent.as_deref().is_some_and(|ua| st.bots.is_bot(ua)) {
        m.clicks_bots.fetch_add(1, Ordering::Relaxed);
        false
    } else if !st.clicks.first(&visitor, &link.id, now.timestamp_micros(), st.config.redirect.dedupe_interval) {
        m.clicks_repeated.fetch_add(1, Ordering::Relaxed);
        false
    } else {
        true
    };
    if counted {
        if truncated {
            m.params_truncated.fetch_add(1, Ordering::Relaxed);
        }
        let ip = client_ip(&req, &st.config.trusted_proxies).to_string();
        let (landing_url, _) = bounded(&destination, LIMITS.string_bytes);
        let event = json!({
            "type": "click",
            "event_id": format!("clk-{:032x}", rand::random::<u128>()),
            "ts": now.to_rfc3339_opts(SecondsFormat::Micros, true),
            "program_id": link.program_id,
            "link_id": link.id,
            "visitor_id": visitor,
            "ip": ip,
            "user_agent": user_agent,
            "landing_url": landing_url,
            "sub_id": sub_id,
        });
        let text = event.to_string();
        match decode_event(&text) {
            Ok(ev) => {
                let subject = crate::nats::subject(&link.program_id, "click");
                let msg_id = crate::nats::message_id(&ev.program_id, &ev.event_id, afflio_engine::fingerprint(&ev));
                let fut = st.ingest.publisher.publish(vec![(subject, msg_id, Bytes::from(text))]);
                let metrics = st.ingest.metrics.clone();
                // The shopper is never kept waiting for the broker.
                tokio::spawn(async move {
                    if fut.await.iter().any(Result::is_err) {
                        metrics.clicks_lost.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
            Err(_) => {
                m.clicks_lost.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    m.redirects.fetch_add(1, Ordering::Relaxed);
    let mut resp = (StatusCode::FOUND, [(header::LOCATION, location)]).into_response();
    if new_visitor {
        let mut cookie = format!("{VISITOR_COOKIE}={visitor}; Max-Age=31536000; Path=/; HttpOnly; SameSite=Lax");
        if st.config.redirect.cookie_secure {
            cookie.push_str("; Secure");
        }
        if let Some(d) = &st.config.redirect.cookie_domain {
            cookie.push_str(&format!("; Domain={d}"));
        }
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            resp.headers_mut().insert(header::SET_COOKIE, v);
        }
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_click_counts_once_within_the_interval_and_memory_is_bounded() {
        let d = ClickDedupe::new(3);
        let s = Duration::from_secs(30);
        assert!(d.first("v", "l", 0, s));
        assert!(!d.first("v", "l", 10_000_000, s));
        assert!(d.first("v", "other", 10_000_000, s));
        assert!(d.first("v", "l", 31_000_000, s), "after the interval it counts again");
        for i in 0..10 {
            d.first(&format!("w{i}"), "l", 40_000_000, s);
        }
        assert!(d.len() <= 3, "{}", d.len());
    }

    #[test]
    fn long_or_dirty_parameters_are_cut_not_dropped() {
        assert_eq!(bounded("abc", 10), ("abc".to_string(), false));
        assert_eq!(bounded("a\u{1b}[31mb", 10), ("a[31mb".to_string(), true));
        let (s, cut) = bounded(&"é".repeat(2000), 2048);
        assert!(cut && s.len() <= 2048 && s.chars().all(|c| c == 'é'));
    }
}
