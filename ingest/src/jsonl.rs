//! Reading JSON Lines with bounded memory.

use std::io::BufRead;

/// One line of a JSON Lines input.
pub struct Line<'a> {
    /// 1-based line number.
    pub number: u64,
    /// The line's text; invalid UTF-8 is replaced (and will not decode).
    pub text: &'a str,
    /// Set when the line was not valid UTF-8 or was too long.
    pub problem: Option<String>,
}

/// Reads lines one at a time into a reused buffer. Blank lines are skipped.
pub struct JsonLines<R> {
    reader: R,
    buf: Vec<u8>,
    text: String,
    number: u64,
    max_line_bytes: usize,
}

impl<R: BufRead> JsonLines<R> {
    pub fn new(reader: R) -> Self {
        JsonLines { reader, buf: Vec::with_capacity(4096), text: String::new(), number: 0, max_line_bytes: 1 << 20 }
    }

    /// The next non-blank line, `Ok(None)` at the end.
    pub fn next_line(&mut self) -> std::io::Result<Option<Line<'_>>> {
        loop {
            self.buf.clear();
            let n = self.reader.read_until(b'\n', &mut self.buf)?;
            if n == 0 {
                return Ok(None);
            }
            self.number += 1;
            while matches!(self.buf.last(), Some(b'\n' | b'\r')) {
                self.buf.pop();
            }
            // A byte order mark some editors write at the start of a file.
            if self.number == 1 && self.buf.starts_with(b"\xEF\xBB\xBF") {
                self.buf.drain(..3);
            }
            if self.buf.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let mut problem = None;
            if self.buf.len() > self.max_line_bytes {
                problem =
                    Some(format!("line is {} bytes, over the {}-byte limit", self.buf.len(), self.max_line_bytes));
            }
            // Valid text is lent straight from the read buffer (no copy).
            match std::str::from_utf8(&self.buf) {
                Ok(text) => return Ok(Some(Line { number: self.number, text, problem })),
                Err(e) => {
                    problem.get_or_insert_with(|| format!("line is not valid UTF-8: {e}"));
                    self.text.clear();
                    self.text.push_str(&String::from_utf8_lossy(&self.buf));
                }
            }
            return Ok(Some(Line { number: self.number, text: &self.text, problem }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::JsonLines;

    #[test]
    fn lines_are_numbered_blank_lines_skipped_and_crlf_bom_and_bad_utf8_handled() {
        let input: &[u8] = b"\xEF\xBB\xBF{\"a\":1}\r\n\n  \n{\"b\":2}\n\xFF\xFE\n{\"c\":3}";
        let mut r = JsonLines::new(input);
        let mut got = Vec::new();
        while let Some(l) = r.next_line().unwrap() {
            got.push((l.number, l.text.to_string(), l.problem.is_some()));
        }
        assert_eq!(
            got,
            [
                (1, "{\"a\":1}".to_string(), false),
                (4, "{\"b\":2}".to_string(), false),
                (5, "\u{FFFD}\u{FFFD}".to_string(), true),
                (6, "{\"c\":3}".to_string(), false),
            ]
        );
    }
}
