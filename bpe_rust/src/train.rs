//! BPE training with rustbpe's exact merge rule.
//!
//! The rule: repeatedly merge the adjacent pair with the highest count over all chunks
//! (weighted by how often each distinct chunk occurs), ties going to the lexicographically
//! smaller pair `(left, right)`; merge `i` creates token `256 + i`. Within a chunk occurrences
//! are replaced left to right without overlap.
//!
//! rustbpe finds the maximum with a lazily refreshed max-heap. A pair's count only grows during
//! the merge that creates one of its tokens, and it is pushed right after that merge, so every
//! heap entry's count is >= the pair's current count. Popping until an entry is up to date thus
//! yields the true maximum, and we are free to use different data structures as long as they
//! keep that rule. Ours: chunks as spans of one flat token array merged in place, pair counts
//! and word lists in plain vectors indexed by a dense pair id (byte pairs need no hashing),
//! i64 counts, and a per-merge map for the few pairs that contain the new token.

use std::collections::BinaryHeap;

use rayon::prelude::*;
use rustc_hash::FxHashMap;

use crate::pretok::Splitter;

/// Adds the chunk counts of `texts` to `counts`: split and count in parallel, then fold the
/// per-thread maps (keyed by borrowed slices) into the owned global map.
pub fn count_chunks(
    texts: &[&str],
    splitter: &Splitter,
    counts: &mut FxHashMap<String, i64>,
) -> Result<(), String> {
    if texts.is_empty() {
        return Ok(());
    }
    let groups = (rayon::current_num_threads() * 4).max(1);
    let group_len = texts.len().div_ceil(groups);
    let local = texts
        .par_chunks(group_len)
        .map(|group| {
            let mut m: FxHashMap<&str, i64> = FxHashMap::default();
            for text in group {
                splitter.for_each_chunk(text, |c| *m.entry(c).or_insert(0) += 1)?;
            }
            Ok::<_, String>(m)
        })
        .try_reduce(FxHashMap::default, |mut a, mut b| {
            if a.len() < b.len() {
                std::mem::swap(&mut a, &mut b);
            }
            for (k, v) in b {
                *a.entry(k).or_insert(0) += v;
            }
            Ok(a)
        })?;
    for (chunk, n) in local {
        match counts.get_mut(chunk) {
            Some(total) => *total += n,
            None => {
                counts.insert(chunk.to_owned(), n);
            }
        }
    }
    Ok(())
}

#[inline]
fn pair_key(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

/// A heap entry: max count first, then the smaller pair.
#[derive(PartialEq, Eq)]
struct Job {
    count: i64,
    key: u64,
    pair: u32,
}

impl Ord for Job {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.count
            .cmp(&other.count)
            .then_with(|| other.key.cmp(&self.key))
    }
}

impl PartialOrd for Job {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Every pair ever seen, by dense id: byte pairs are ids `a * 256 + b`, later pairs follow.
struct Pairs {
    index: FxHashMap<u64, u32>,
    key: Vec<u64>,
    count: Vec<i64>,
    words: Vec<Vec<u32>>,
}

impl Pairs {
    fn new() -> Self {
        let n = 256 * 256;
        Pairs {
            index: FxHashMap::default(),
            key: (0..n as u64)
                .map(|i| pair_key((i >> 8) as u32, (i & 255) as u32))
                .collect(),
            count: vec![0; n],
            words: vec![Vec::new(); n],
        }
    }

    #[inline]
    fn id(&self, a: u32, b: u32) -> u32 {
        if a < 256 && b < 256 {
            a * 256 + b
        } else {
            self.index[&pair_key(a, b)]
        }
    }

    fn add(&mut self, a: u32, b: u32) -> u32 {
        let id = self.key.len() as u32;
        self.key.push(pair_key(a, b));
        self.count.push(0);
        self.words.push(Vec::new());
        id
    }

    /// Adds `n` occurrences of pair `id` in word `w`; words are visited in runs, so checking the
    /// last entry is enough to keep each list free of repeats.
    #[inline]
    fn bump(&mut self, id: u32, n: i64, w: u32) {
        self.count[id as usize] += n;
        let list = &mut self.words[id as usize];
        if list.last() != Some(&w) {
            list.push(w);
        }
    }
}

/// Distinct chunks as spans of one flat token array; each shrinks in place as merges apply.
struct Words {
    tokens: Vec<u32>,
    start: Vec<usize>,
    len: Vec<u32>,
    weight: Vec<i64>,
}

/// Learns up to `num_merges` merges from chunk counts; fewer when no pair is left.
pub fn learn_merges(counts: &FxHashMap<String, i64>, num_merges: usize) -> Vec<(u32, u32)> {
    let mut words = Words {
        tokens: Vec::new(),
        start: Vec::new(),
        len: Vec::new(),
        weight: Vec::new(),
    };
    // Chunks of one byte can never take part in a merge.
    for (chunk, &n) in counts.iter().filter(|(c, _)| c.len() > 1) {
        words.start.push(words.tokens.len());
        words.len.push(chunk.len() as u32);
        words.weight.push(n);
        words.tokens.extend(chunk.bytes().map(u32::from));
    }

    let mut pairs = Pairs::new();
    for w in 0..words.start.len() {
        let span = &words.tokens[words.start[w]..words.start[w] + words.len[w] as usize];
        for p in span.windows(2) {
            pairs.bump(p[0] * 256 + p[1], words.weight[w], w as u32);
        }
    }
    let mut heap: BinaryHeap<Job> = (0..pairs.key.len() as u32)
        .filter(|&p| pairs.count[p as usize] > 0)
        .map(|p| Job {
            count: pairs.count[p as usize],
            key: pairs.key[p as usize],
            pair: p,
        })
        .collect();

    let mut merges = Vec::with_capacity(num_merges);
    // New pairs of the current merge, by their other token: (x, new) and (new, y).
    let mut with_left: FxHashMap<u32, u32> = FxHashMap::default();
    let mut with_right: FxHashMap<u32, u32> = FxHashMap::default();
    let mut created: Vec<u32> = Vec::new();
    while merges.len() < num_merges {
        let Some(top) = heap.pop() else { break };
        let current = pairs.count[top.pair as usize];
        if current != top.count {
            if current > 0 {
                heap.push(Job {
                    count: current,
                    ..top
                });
            }
            continue;
        }
        let (a, b) = ((top.key >> 32) as u32, top.key as u32);
        let new = 256 + merges.len() as u32;
        merges.push((a, b));
        with_left.clear();
        with_right.clear();
        created.clear();

        let word_list = std::mem::take(&mut pairs.words[top.pair as usize]);
        for &w in &word_list {
            let wi = w as usize;
            let start = words.start[wi];
            let len = words.len[wi] as usize;
            let n = words.weight[wi];
            let span = &mut words.tokens[start..start + len];
            let (mut read, mut write) = (0, 0);
            while read < len {
                if read + 1 < len && span[read] == a && span[read + 1] == b {
                    if write > 0 {
                        // The left neighbour as already rewritten, so it may be `new` itself.
                        let x = span[write - 1];
                        let old = if x == new {
                            with_right[&a]
                        } else {
                            pairs.id(x, a)
                        };
                        pairs.count[old as usize] -= n;
                        let id = *with_left.entry(x).or_insert_with(|| {
                            let id = pairs.add(x, new);
                            created.push(id);
                            id
                        });
                        pairs.bump(id, n, w);
                    }
                    pairs.count[top.pair as usize] -= n;
                    if read + 2 < len {
                        let y = span[read + 2];
                        let old = pairs.id(b, y);
                        pairs.count[old as usize] -= n;
                        let id = *with_right.entry(y).or_insert_with(|| {
                            let id = pairs.add(new, y);
                            created.push(id);
                            id
                        });
                        pairs.bump(id, n, w);
                    }
                    span[write] = new;
                    read += 2;
                } else {
                    span[write] = span[read];
                    read += 1;
                }
                write += 1;
            }
            words.len[wi] = write as u32;
        }
        debug_assert_eq!(pairs.count[top.pair as usize], 0);

        for &id in &created {
            let key = pairs.key[id as usize];
            pairs.index.insert(key, id);
            let count = pairs.count[id as usize];
            if count > 0 {
                heap.push(Job {
                    count,
                    key,
                    pair: id,
                });
            } else {
                pairs.words[id as usize] = Vec::new();
            }
        }
    }
    merges
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(chunks: &[(&str, i64)]) -> FxHashMap<String, i64> {
        chunks.iter().map(|&(c, n)| (c.to_owned(), n)).collect()
    }

    #[test]
    fn picks_highest_count_then_smallest_pair() {
        // "ab" x3 and "cd" x3 tie; (a, b) < (c, d), so "ab" first.
        let m = learn_merges(&counts(&[("cd", 3), ("ab", 3), ("xy", 1)]), 3);
        assert_eq!(m, vec![(97, 98), (99, 100), (120, 121)]);
    }

    #[test]
    fn overlapping_runs_merge_left_to_right() {
        // "aaaa" -> (a,a) then (256,256).
        let m = learn_merges(&counts(&[("aaaa", 1)]), 5);
        assert_eq!(m, vec![(97, 97), (256, 256)]);
        // "aaa" -> (a,a) then (256,a).
        let m = learn_merges(&counts(&[("aaa", 1)]), 5);
        assert_eq!(m, vec![(97, 97), (256, 97)]);
    }

    #[test]
    fn stops_when_no_pairs_are_left() {
        let m = learn_merges(&counts(&[("abc", 2), ("d", 7)]), 100);
        assert_eq!(m.len(), 2);
    }
}
