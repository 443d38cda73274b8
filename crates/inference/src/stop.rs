//! Stop sequences over streamed text: text that might be the start of a stop sequence is held
//! back, so a client never sees part of a stop sequence, and the stop sequence itself is never sent.

/// Matches stop sequences across token boundaries.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

/// The result of feeding text to a [`StopMatcher`].
#[derive(Debug, PartialEq, Eq)]
pub enum StopCheck {
    /// Emit this text (possibly empty) and keep generating.
    Continue(String),
    /// A stop sequence matched: emit this text (what came before the stop) and finish.
    Stopped(String),
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), pending: String::new() }
    }

    pub fn push(&mut self, text: &str) -> StopCheck {
        if self.stops.is_empty() {
            return StopCheck::Continue(text.to_owned());
        }
        self.pending.push_str(text);
        if let Some(at) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            self.pending.truncate(at);
            return StopCheck::Stopped(std::mem::take(&mut self.pending));
        }
        let hold = self.longest_partial_suffix();
        let emit_len = self.pending.len() - hold;
        let rest = self.pending.split_off(emit_len);
        StopCheck::Continue(std::mem::replace(&mut self.pending, rest))
    }

    /// Held text, released when generation ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Length in bytes of the longest suffix of `pending` that is a proper prefix of a stop sequence.
    fn longest_partial_suffix(&self) -> usize {
        let mut best = 0;
        for (start, _) in self.pending.char_indices() {
            let suffix = &self.pending[start..];
            if self.stops.iter().any(|s| s.len() > suffix.len() && s.starts_with(suffix)) {
                best = best.max(suffix.len());
                break; // char_indices runs longest suffix first
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| (*s).to_owned()).collect());
        let mut out = String::new();
        for p in pieces {
            match m.push(p) {
                StopCheck::Continue(t) => out.push_str(&t),
                StopCheck::Stopped(t) => {
                    out.push_str(&t);
                    return (out, true);
                }
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn stop_across_pieces_is_not_emitted() {
        assert_eq!(run(&["###"], &["Hello #", "#", "# world"]), ("Hello ".to_owned(), true));
    }

    #[test]
    fn partial_match_is_released_at_the_end() {
        assert_eq!(run(&["###"], &["a #", "#"]), ("a ##".to_owned(), false));
    }

    #[test]
    fn earliest_stop_wins() {
        assert_eq!(run(&["bb", "a"], &["xxbba"]), ("xx".to_owned(), true));
    }

    #[test]
    fn multibyte_stop_sequences_are_char_safe() {
        assert_eq!(run(&["中文"], &["é中", "文"]), ("é".to_owned(), true));
        assert_eq!(run(&["中文"], &["é中", "x"]), ("é中x".to_owned(), false));
    }

    #[test]
    fn held_text_is_released_once_it_cannot_match() {
        let mut m = StopMatcher::new(vec!["STOP".to_owned()]);
        assert_eq!(m.push("ST"), StopCheck::Continue(String::new()));
        assert_eq!(m.push("x"), StopCheck::Continue("STx".to_owned()));
    }
}
