//! Envelopes: many events in one broker message.
//!
//! One JetStream message per event caps the live pipeline at the broker's
//! per-message cost (tens of thousands a second on a small machine); a batch
//! request's events travel as one message instead. The format is
//! `AFE1\n` then, per event, its length in bytes, `:`, and its text, so a
//! text may contain anything (a pretty-printed JSON array element included).
//! A JSON event never starts with `A`, so single-event messages and
//! envelopes share the stream.

use bytes::{BufMut, Bytes, BytesMut};

const MAGIC: &[u8] = b"AFE1\n";

/// At most this many payload bytes per envelope (NATS' default message limit is 1 MiB).
pub const MAX_ENVELOPE_BYTES: usize = 768 * 1024;

/// Encodes `texts` as one envelope.
pub fn encode<'a>(texts: impl IntoIterator<Item = &'a str>) -> Bytes {
    let mut b = BytesMut::with_capacity(4096);
    b.put_slice(MAGIC);
    for t in texts {
        b.put_slice(t.len().to_string().as_bytes());
        b.put_u8(b':');
        b.put_slice(t.as_bytes());
    }
    b.freeze()
}

/// Whether `payload` is an envelope.
pub fn is_envelope(payload: &[u8]) -> bool {
    payload.starts_with(MAGIC)
}

/// The texts of an envelope, in order; an error names the byte offset of a
/// broken frame (an external fault: only the ingest writes envelopes).
pub fn decode(payload: &[u8]) -> Result<Vec<&str>, String> {
    let mut rest = payload.strip_prefix(MAGIC).ok_or("not an envelope (no AFE1 header)")?;
    let mut texts = Vec::new();
    while !rest.is_empty() {
        let at = payload.len() - rest.len();
        let colon = rest.iter().position(|&b| b == b':').ok_or(format!("frame at byte {at}: no length"))?;
        let len: usize = std::str::from_utf8(&rest[..colon])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or(format!("frame at byte {at}: bad length"))?;
        let body = rest.get(colon + 1..colon + 1 + len).ok_or(format!("frame at byte {at}: truncated"))?;
        texts.push(std::str::from_utf8(body).map_err(|e| format!("frame at byte {at}: not UTF-8: {e}"))?);
        rest = &rest[colon + 1 + len..];
    }
    Ok(texts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_any_text_and_refuses_broken_frames() {
        let texts = ["{\"a\":1}", "[\n 1,\n 2\n]", "", "ü:5:x"];
        let env = encode(texts);
        assert!(is_envelope(&env));
        assert!(!is_envelope(b"{\"type\":\"click\"}"));
        assert_eq!(decode(&env).unwrap(), texts);
        assert_eq!(decode(b"AFE1\n").unwrap(), Vec::<&str>::new());
        assert!(decode(b"AFE1\n10:abc").unwrap_err().contains("truncated"));
        assert!(decode(b"AFE1\nx:abc").unwrap_err().contains("bad length"));
        assert!(decode(b"AFE1\n3").unwrap_err().contains("no length"));
        assert!(decode(b"{}").is_err());
    }
}
