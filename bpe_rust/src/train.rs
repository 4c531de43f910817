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
//! keep that rule. Ours: chunks as spans of one flat array merged in place, each position
//! holding its token and the id of the pair it starts; pair counts and word lists in vectors
//! indexed by that dense id; i64 counts. A pair that contains token `t` can only appear in the
//! merge that creates `t`, so new pairs are found through a small per-merge table and the
//! merge loop never hashes.

use dary_heap::OctonaryHeap;
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

/// Every pair ever seen, by dense id: byte pairs are ids `a * 256 + b`, later pairs follow in
/// order of creation.
struct Pairs {
    key: Vec<u64>,
    count: Vec<i64>,
    words: Vec<Vec<u32>>,
}

impl Pairs {
    fn new() -> Self {
        let n = 256 * 256;
        Pairs {
            key: (0..n as u64)
                .map(|i| pair_key((i >> 8) as u32, (i & 255) as u32))
                .collect(),
            count: vec![0; n],
            words: vec![Vec::new(); n],
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

/// The pairs `(x, new)` or `(new, y)` of the current merge, by the other token `x` / `y`: a
/// dense table whose entries are valid only when stamped with the current merge.
struct NewPairs {
    stamp: Vec<u32>,
    pair: Vec<u32>,
}

impl NewPairs {
    fn new(n_tokens: usize) -> Self {
        NewPairs {
            stamp: vec![u32::MAX; n_tokens],
            pair: vec![0; n_tokens],
        }
    }

    /// The id of the pair with other token `t` in merge `merge`, created on first use.
    #[inline]
    fn get(&mut self, t: u32, merge: u32, create: impl FnOnce() -> u32) -> u32 {
        let i = t as usize;
        if self.stamp[i] != merge {
            self.stamp[i] = merge;
            self.pair[i] = create();
        }
        self.pair[i]
    }
}

/// One position of a chunk: its token, and the id of the pair it starts (`NO_PAIR` at the
/// end), so a merge never has to look a pair up. Together so that one cache miss brings both.
#[derive(Clone, Copy)]
struct Cell {
    token: u32,
    pair: u32,
}

const NO_PAIR: u32 = u32::MAX;

/// A distinct chunk: its span of `cells` (which shrinks in place) and its count.
struct Word {
    start: usize,
    weight: i64,
    len: u32,
}

#[inline(always)]
fn prefetch<T>(item: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetching is a hint with no effect on memory; the pointer comes from a reference.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(item as *const T as *const i8);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = item;
}

/// Learns up to `num_merges` merges from chunk counts; fewer when no pair is left.
pub fn learn_merges(counts: &FxHashMap<String, i64>, num_merges: usize) -> Vec<(u32, u32)> {
    let mut cells: Vec<Cell> = Vec::new();
    let mut words: Vec<Word> = Vec::new();
    let mut pairs = Pairs::new();
    // Chunks of one byte can never take part in a merge.
    for (chunk, &n) in counts.iter().filter(|(c, _)| c.len() > 1) {
        let w = words.len() as u32;
        let bytes = chunk.as_bytes();
        words.push(Word {
            start: cells.len(),
            weight: n,
            len: bytes.len() as u32,
        });
        for (i, &byte) in bytes.iter().enumerate() {
            let pair = match bytes.get(i + 1) {
                Some(&next) => u32::from(byte) * 256 + u32::from(next),
                None => NO_PAIR,
            };
            cells.push(Cell {
                token: u32::from(byte),
                pair,
            });
            if pair != NO_PAIR {
                pairs.bump(pair, n, w);
            }
        }
    }
    let mut heap: OctonaryHeap<Job> = (0..pairs.key.len() as u32)
        .filter(|&p| pairs.count[p as usize] > 0)
        .map(|p| Job {
            count: pairs.count[p as usize],
            key: pairs.key[p as usize],
            pair: p,
        })
        .collect();

    // Each merge removes at least one token occurrence, which bounds the useful merge count.
    let num_merges = num_merges.min(cells.len());
    let mut merges = Vec::with_capacity(num_merges);
    let n_tokens = 256 + num_merges;
    let mut with_left = NewPairs::new(n_tokens); // (x, new) by x
    let mut with_right = NewPairs::new(n_tokens); // (new, y) by y
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
        let merge = merges.len() as u32;
        let new = 256 + merge;
        merges.push((a, b));
        created.clear();

        let word_list = std::mem::take(&mut pairs.words[top.pair as usize]);
        for (i, &w) in word_list.iter().enumerate() {
            // The merge loop is bound by cache misses on words scattered in memory: ask for the
            // word record a few steps ahead and for its cells a little later.
            if let Some(&ahead) = word_list.get(i + 8) {
                prefetch(&words[ahead as usize]);
            }
            if let Some(&ahead) = word_list.get(i + 4) {
                prefetch(&cells[words[ahead as usize].start]);
            }
            let word = &mut words[w as usize];
            let n = word.weight;
            let len = word.len as usize;
            let span = &mut cells[word.start..word.start + len];
            let (mut read, mut write) = (0, 0);
            while read < len {
                let cell = span[read];
                if cell.pair != top.pair {
                    span[write] = cell;
                    read += 1;
                    write += 1;
                    continue;
                }
                if write > 0 {
                    // (x, a) -> (x, new); x is the output so far, so it may be `new` itself.
                    let left = &mut span[write - 1];
                    let x = left.token;
                    pairs.count[left.pair as usize] -= n;
                    let id = with_left.get(x, merge, || {
                        let id = pairs.add(x, new);
                        created.push(id);
                        id
                    });
                    pairs.bump(id, n, w);
                    left.pair = id;
                }
                pairs.count[top.pair as usize] -= n;
                let pair = if read + 2 < len {
                    // (b, y) -> (new, y)
                    let y = span[read + 2].token;
                    pairs.count[span[read + 1].pair as usize] -= n;
                    let id = with_right.get(y, merge, || {
                        let id = pairs.add(new, y);
                        created.push(id);
                        id
                    });
                    pairs.bump(id, n, w);
                    id
                } else {
                    NO_PAIR
                };
                span[write] = Cell { token: new, pair };
                read += 2;
                write += 1;
            }
            word.len = write as u32;
        }
        debug_assert_eq!(pairs.count[top.pair as usize], 0);

        for &id in &created {
            let count = pairs.count[id as usize];
            if count > 0 {
                heap.push(Job {
                    count,
                    key: pairs.key[id as usize],
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
