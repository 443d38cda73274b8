//! Prefix reuse: the attention cache of prompts that have run and of finished sequences, kept so
//! that a request starting with the same tokens (a shared system prompt, the earlier turns of the
//! same conversation) copies those positions instead of recomputing them.
//!
//! Entries are compact (`[tensor][kv_head][position][head_dim]`, only the positions that were
//! cached), bounded in bytes, and evicted least recently used first. An entry that another entry
//! extends (turn 1 of a chat, once turn 2 has finished) is dropped as redundant. Reuse is exact:
//! the positions copied are the ones the model computed for those very tokens.

/// One finished sequence's tokens and their cached keys and values.
pub struct Entry {
    tokens: Vec<u32>,
    kv: Vec<f32>,
    last_used: u64,
}

impl Entry {
    /// The cached positions' token ids.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// `[tensor][kv_head][position][head_dim]` for `tokens().len()` positions.
    pub fn kv(&self) -> &[f32] {
        &self.kv
    }
}

/// A byte-bounded, least-recently-used set of cached prefixes.
pub struct PrefixCache {
    entries: Vec<Entry>,
    bytes: usize,
    budget_bytes: usize,
    /// Shorter sequences are not worth an entry (and are cheap to recompute).
    min_tokens: usize,
    clock: u64,
}

impl PrefixCache {
    pub fn new(budget_bytes: usize, min_tokens: usize) -> Self {
        Self { entries: Vec::new(), bytes: 0, budget_bytes, min_tokens: min_tokens.max(1), clock: 0 }
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry sharing the longest prefix with `prompt`, and how many of its positions to reuse:
    /// at most `prompt.len() - 2`, because the prompt's end must still run to give logits, and as
    /// a chunk of two tokens at least (see `Sequence::next_chunk`: a lone token takes other kernels).
    /// `None` when no entry shares at least `min_tokens` tokens.
    pub fn lookup(&mut self, prompt: &[u32]) -> Option<(&Entry, usize)> {
        let limit = prompt.len().saturating_sub(2);
        let (best, shared) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, common_prefix(&e.tokens, prompt).min(limit)))
            .max_by_key(|&(_, n)| n)?;
        if shared < self.min_tokens {
            return None;
        }
        self.clock += 1;
        let entry = &mut self.entries[best];
        entry.last_used = self.clock;
        Some((&self.entries[best], shared))
    }

    /// Whether an entry of `tokens` positions and about `kv_bytes` could be kept at all (checked
    /// before copying a sequence's cache out).
    pub fn accepts(&self, tokens: usize, kv_bytes: usize) -> bool {
        tokens >= self.min_tokens && kv_bytes <= self.budget_bytes
    }

    /// Keep `kv` for `tokens`, evicting least recently used entries to stay within the budget.
    /// Returns false (and keeps nothing) when the entry is too short, larger than the whole budget,
    /// or already covered by an entry that extends it.
    pub fn insert(&mut self, tokens: Vec<u32>, kv: Vec<f32>) -> bool {
        let size = entry_bytes(&kv, &tokens);
        if tokens.len() < self.min_tokens || size > self.budget_bytes {
            return false;
        }
        if self.entries.iter().any(|e| e.tokens.starts_with(&tokens)) {
            return false;
        }
        // Entries this one extends are redundant now.
        let mut i = 0;
        while i < self.entries.len() {
            if tokens.starts_with(&self.entries[i].tokens) {
                let gone = self.entries.swap_remove(i);
                self.bytes -= entry_bytes(&gone.kv, &gone.tokens);
            } else {
                i += 1;
            }
        }
        while self.bytes + size > self.budget_bytes {
            let Some(oldest) =
                self.entries.iter().enumerate().min_by_key(|(_, e)| e.last_used).map(|(i, _)| i)
            else {
                break;
            };
            let gone = self.entries.swap_remove(oldest);
            self.bytes -= entry_bytes(&gone.kv, &gone.tokens);
        }
        self.clock += 1;
        self.bytes += size;
        self.entries.push(Entry { tokens, kv, last_used: self.clock });
        true
    }
}

fn entry_bytes(kv: &[f32], tokens: &[u32]) -> usize {
    std::mem::size_of_val(kv) + std::mem::size_of_val(tokens)
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(n: usize) -> Vec<f32> {
        vec![0.5; n]
    }

    #[test]
    fn finds_the_longest_shared_prefix_but_leaves_two_tokens_to_run() {
        let mut cache = PrefixCache::new(1 << 20, 2);
        assert!(cache.insert(vec![1, 2, 3, 4], kv(4)));
        assert!(cache.insert(vec![1, 2, 9, 9, 9], kv(5)));
        let (entry, n) = cache.lookup(&[1, 2, 3, 4, 5, 6]).unwrap_or_else(|| unreachable!("a match"));
        assert_eq!((entry.tokens(), n), (&[1u32, 2, 3, 4][..], 4));
        // The whole prompt is cached: its last two tokens still run, for the logits.
        let (_, n) = cache.lookup(&[1, 2, 3, 4]).unwrap_or_else(|| unreachable!("a match"));
        assert_eq!(n, 2);
        assert!(cache.lookup(&[7, 8, 9]).is_none());
        // Below the minimum length, no reuse.
        assert!(cache.lookup(&[1, 5, 5]).is_none());
    }

    #[test]
    fn an_extending_entry_replaces_the_one_it_extends() {
        let mut cache = PrefixCache::new(1 << 20, 1);
        assert!(cache.insert(vec![1, 2, 3], kv(3)));
        assert!(cache.insert(vec![1, 2, 3, 4, 5], kv(5)));
        assert_eq!(cache.len(), 1);
        // Already covered: nothing new is kept.
        assert!(!cache.insert(vec![1, 2], kv(2)));
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.bytes(), 5 * 4 + 5 * 4);
    }

    #[test]
    fn evicts_least_recently_used_within_the_byte_budget() {
        // Each entry: 10 floats + 2 tokens = 48 bytes; room for two.
        let mut cache = PrefixCache::new(100, 1);
        assert!(cache.insert(vec![1, 1], kv(10)));
        assert!(cache.insert(vec![2, 2], kv(10)));
        assert!(cache.lookup(&[1, 1, 7]).is_some()); // 1 is now the most recent
        assert!(cache.insert(vec![3, 3], kv(10)));
        assert_eq!(cache.len(), 2);
        assert!(cache.lookup(&[2, 2, 7]).is_none(), "the least recently used entry went first");
        assert!(cache.lookup(&[1, 1, 7]).is_some());
        assert!(cache.bytes() <= 100);
        // Larger than the whole budget: refused, nothing evicted.
        assert!(!cache.accepts(2, 400));
        assert!(!cache.insert(vec![4, 4], kv(100)));
        assert_eq!(cache.len(), 2);
    }
}
