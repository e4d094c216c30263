//! Afflio ingest: turns event text (one JSON object, or JSON Lines) into
//! engine [`Event`](afflio_engine::Event)s, borrowing strings from the input
//! where it can; serves the HTTP ingest (checkout events, tracking-link
//! redirects, health and metrics) and publishes to NATS JetStream.
//!
//! What cannot be decoded becomes a [`DecodeError`] with the reason
//! (`malformed` or `invalid_amount`), the field at fault and, where it could
//! be read, the event id, so that the caller can keep it as a rejection.

mod decode;
pub mod envelope;
pub mod http;
mod jsonl;
pub mod metrics;
pub mod nats;
pub mod server;

pub use decode::{decode_event, parse_money, DecodeError, LIMITS};
pub use jsonl::{JsonLines, Line};
