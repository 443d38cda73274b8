//! A server-sent events reader for upstream responses, fed bytes as they arrive: it yields each
//! event's `data` (its `data:` lines joined by `\n`) when the blank line that ends the event is
//! read. What the SSE specification allows is accepted — `\n`, `\r\n` or `\r` line ends (split
//! across chunks too), comments (`:` lines), `data:` with or without the space, other fields
//! (`id:`, `event:`, `retry:`), which are skipped — and what it does not never panics: a line
//! without a field name is ignored as the specification says, invalid UTF-8 is replaced, and a
//! line or event past [`MAX_EVENT_BYTES`] is an error (a stream that never ends a line must not
//! grow without bound).

use std::fmt;

/// The longest event (or line) accepted: far above any chunk a model server sends.
pub const MAX_EVENT_BYTES: usize = 1 << 20;

/// The stream broke the one limit an SSE reader must keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventTooLong;

impl fmt::Display for EventTooLong {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an upstream event is longer than {MAX_EVENT_BYTES} bytes")
    }
}

/// Incremental SSE parser.
#[derive(Debug, Default)]
pub struct SseReader {
    /// The current line, not yet ended.
    line: Vec<u8>,
    /// The current event's data lines so far.
    data: Option<String>,
    /// The last byte was `\r`: a `\n` right after it ends nothing more.
    after_cr: bool,
}

impl SseReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feed the next bytes; returns the data of every event they complete, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<String>, EventTooLong> {
        let mut events = Vec::new();
        for &b in bytes {
            match b {
                b'\n' if self.after_cr => self.after_cr = false,
                b'\n' | b'\r' => {
                    self.after_cr = b == b'\r';
                    self.end_line(&mut events);
                }
                _ => {
                    self.after_cr = false;
                    if self.line.len() >= MAX_EVENT_BYTES {
                        return Err(EventTooLong);
                    }
                    self.line.push(b);
                }
            }
        }
        if self.data.as_ref().is_some_and(|d| d.len() > MAX_EVENT_BYTES) {
            return Err(EventTooLong);
        }
        Ok(events)
    }

    fn end_line(&mut self, events: &mut Vec<String>) {
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            events.extend(self.data.take());
            return;
        }
        if line[0] == b':' {
            return; // a comment (keep-alive)
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (&line[..], &[][..]),
        };
        if field == b"data" {
            let value = String::from_utf8_lossy(value);
            match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(&value);
                }
                None => self.data = Some(value.into_owned()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(chunks: &[&[u8]]) -> Vec<String> {
        let mut reader = SseReader::new();
        chunks.iter().flat_map(|c| reader.push(c).unwrap_or_else(|e| unreachable!("{e}"))).collect()
    }

    #[test]
    fn every_line_ending_and_split_works() {
        let expected = vec!["a".to_owned(), "b".to_owned()];
        assert_eq!(all(&[b"data: a\n\ndata: b\n\n"]), expected);
        assert_eq!(all(&[b"data: a\r\n\r\ndata: b\r\n\r\n"]), expected);
        assert_eq!(all(&[b"data: a\r\rdata: b\r\r"]), expected);
        assert_eq!(all(&[b"data: a\r", b"\n\r", b"\ndata: b\r\n", b"\r\n"]), expected);
        let bytes = b"data: a\n\ndata: b\n\n";
        let singles: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(all(&singles), expected);
    }

    #[test]
    fn comments_fields_and_multiline_data() {
        let text = b": keep-alive\n\nid: 7\nevent: message\nretry: 100\ndata:{\"x\":1}\ndata: 2\n\n";
        assert_eq!(all(&[text]), vec!["{\"x\":1}\n2".to_owned()]);
        // No `data:` prefix: not a data field, ignored; an event without data dispatches nothing.
        assert_eq!(all(&[b"{\"choices\":[]}\n\nevent: ping\n\n"]), Vec::<String>::new());
        assert_eq!(all(&[b"data\n\n"]), vec![String::new()]);
        assert_eq!(all(&[b"data: \xff\xfe\n\n"]), vec!["\u{fffd}\u{fffd}".to_owned()]);
        // An event not ended by a blank line is not dispatched (yet).
        assert_eq!(all(&[b"data: unfinished\n"]), Vec::<String>::new());
    }

    #[test]
    fn a_line_that_never_ends_is_refused() {
        let mut reader = SseReader::new();
        let chunk = vec![b'x'; 64 * 1024];
        let mut result = Ok(Vec::new());
        for _ in 0..=(MAX_EVENT_BYTES / chunk.len()) {
            result = reader.push(&chunk);
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(EventTooLong));
        let mut many = SseReader::new();
        let line = format!("data: {}\n", "y".repeat(1000));
        let refused = (0..2000).map(|_| many.push(line.as_bytes())).find(Result::is_err);
        assert_eq!(refused, Some(Err(EventTooLong)), "nor does an event of many lines");
    }
}
