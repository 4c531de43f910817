//! Encoding and decoding with a vocabulary of byte strings (token id = rank), with tiktoken's
//! semantics: a chunk that is itself a token becomes that token; otherwise start from single
//! bytes and repeatedly merge the adjacent pair whose concatenation has the lowest rank (the
//! leftmost one on ties) until no adjacent concatenation is a token.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::hash::BuildHasherDefault;

use rustc_hash::FxHashMap;

use crate::pretok::Splitter;

/// Chunks longer than this use the O(n log n) heap merge instead of tiktoken's O(n^2) scan.
const LONG_CHUNK_BYTES: usize = 128;
/// The per-worker chunk cache is dropped when its arena grows past this many ids.
const CACHE_MAX_IDS: usize = 1 << 22;

/// Hasher for the `short_key` maps. FxHash's multiply only carries low key bits upwards, and
/// the bits hashbrown uses would ignore a chunk's last bytes (long probe chains for chunks that
/// share a 5-byte prefix); this mixes every key bit into both the low and the top bits.
#[derive(Default, Clone, Copy)]
struct ShortKeyHasher(u64);

impl std::hash::Hasher for ShortKeyHasher {
    #[inline]
    fn write_u64(&mut self, k: u64) {
        let h = (k ^ (k >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        self.0 = h ^ (h >> 32);
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(self.0 ^ u64::from(b));
        }
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

/// A map keyed by `short_key`.
type ShortMap<V> = std::collections::HashMap<u64, V, BuildHasherDefault<ShortKeyHasher>>;

/// A chunk of up to 7 bytes as one integer (its bytes, then its length in the top byte), so
/// the hot lookups hash a u64 instead of a byte string.
#[inline]
fn short_key(b: &[u8]) -> Option<u64> {
    let n = b.len();
    // Two overlapping loads (no byte-by-byte copy, which would stall the read back).
    let bytes = match n {
        0 => 0,
        1 => u64::from(b[0]),
        2..=3 => {
            let lo = u16::from_le_bytes([b[0], b[1]]) as u64;
            let hi = u16::from_le_bytes([b[n - 2], b[n - 1]]) as u64;
            lo | (hi << ((n - 2) * 8))
        }
        4..=7 => {
            let lo = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u64;
            let hi = u32::from_le_bytes([b[n - 4], b[n - 3], b[n - 2], b[n - 1]]) as u64;
            lo | (hi << ((n - 4) * 8))
        }
        _ => return None,
    };
    Some(bytes | ((n as u64) << 56))
}

#[inline]
fn pair_key(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

pub struct Vocab {
    /// Token bytes by id (= rank).
    pub tokens: Vec<Vec<u8>>,
    by_bytes: FxHashMap<Vec<u8>, u32>,
    /// The tokens of at most 7 bytes again, by `short_key`: most chunks are that short.
    short: ShortMap<u32>,
    byte_id: [u32; 256],
    /// (left id, right id) -> id of their concatenation, for every way a token splits into two
    /// tokens; that is all tiktoken's merge loop can ever use.
    pair_id: FxHashMap<u64, u32>,
}

impl Vocab {
    /// From token bytes indexed by rank; every single byte must be a token and no bytes repeat.
    pub fn from_tokens(tokens: Vec<Vec<u8>>) -> Result<Self, String> {
        let mut by_bytes = FxHashMap::default();
        by_bytes.reserve(tokens.len());
        for (id, t) in tokens.iter().enumerate() {
            if t.is_empty() {
                return Err(format!("token {id} is empty"));
            }
            if let Some(other) = by_bytes.insert(t.clone(), id as u32) {
                return Err(format!("tokens {other} and {id} have the same bytes {t:?}"));
            }
        }
        let mut byte_id = [0u32; 256];
        for (b, slot) in byte_id.iter_mut().enumerate() {
            *slot = *by_bytes.get(&[b as u8][..]).ok_or_else(|| {
                format!("byte 0x{b:02x} has no token; every single byte must be a token")
            })?;
        }
        let mut pair_id = FxHashMap::default();
        for (id, t) in tokens.iter().enumerate() {
            for k in 1..t.len() {
                if let (Some(&l), Some(&r)) = (by_bytes.get(&t[..k]), by_bytes.get(&t[k..])) {
                    pair_id.insert(pair_key(l, r), id as u32);
                }
            }
        }
        let short = tokens
            .iter()
            .enumerate()
            .filter_map(|(id, t)| short_key(t).map(|k| (k, id as u32)))
            .collect();
        Ok(Vocab {
            tokens,
            by_bytes,
            short,
            byte_id,
            pair_id,
        })
    }

    /// Bytes 0..=255 as ids 0..=255, then one token per merge.
    pub fn from_merges(merges: &[(u32, u32)]) -> Self {
        let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        for &(a, b) in merges {
            let t = [&tokens[a as usize][..], &tokens[b as usize][..]].concat();
            tokens.push(t);
        }
        Self::from_tokens(tokens).expect("merged tokens are distinct")
    }

    /// Every (left, right, merged) split, ordered by merged id then split point; used to write
    /// a merges list for other libraries.
    pub fn merge_pairs(&self) -> Vec<(u32, u32, u32)> {
        let mut out: Vec<(u32, u32, u32)> = self
            .pair_id
            .iter()
            .map(|(&k, &id)| ((k >> 32) as u32, k as u32, id))
            .collect();
        out.sort_unstable_by_key(|&(l, _, id)| (id, self.tokens[l as usize].len()));
        out
    }

    #[inline]
    fn rank(&self, a: u32, b: u32) -> u32 {
        *self.pair_id.get(&pair_key(a, b)).unwrap_or(&u32::MAX)
    }

    /// Appends the ids of one chunk (that is not a token itself) to `out`.
    fn merge_chunk(&self, piece: &[u8], scratch: &mut Scratch, out: &mut Vec<u32>) {
        if piece.len() > LONG_CHUNK_BYTES {
            self.merge_chunk_long(piece, out);
        } else {
            self.merge_chunk_scan(piece, scratch, out);
        }
    }

    /// tiktoken's loop: find the lowest-rank adjacent pair, merge it, repeat.
    fn merge_chunk_scan(&self, piece: &[u8], scratch: &mut Scratch, out: &mut Vec<u32>) {
        let ids = &mut scratch.ids;
        let ranks = &mut scratch.ranks;
        ids.clear();
        ids.extend(piece.iter().map(|&b| self.byte_id[b as usize]));
        ranks.clear();
        ranks.extend(ids.windows(2).map(|w| self.rank(w[0], w[1])));
        loop {
            let mut best = (u32::MAX, 0);
            for (i, &r) in ranks.iter().enumerate() {
                if r < best.0 {
                    best = (r, i);
                }
            }
            let (rank, i) = best;
            if rank == u32::MAX {
                break;
            }
            ids[i] = rank;
            ids.remove(i + 1);
            ranks.remove(i);
            if i > 0 {
                ranks[i - 1] = self.rank(ids[i - 1], ids[i]);
            }
            if i + 1 < ids.len() {
                ranks[i] = self.rank(ids[i], ids[i + 1]);
            }
        }
        out.extend_from_slice(ids);
    }

    /// Same result as the scan, using a min-heap of (rank, position) over a linked list of
    /// parts; entries whose pair has changed since they were pushed are skipped when popped.
    fn merge_chunk_long(&self, piece: &[u8], out: &mut Vec<u32>) {
        const NONE: u32 = u32::MAX;
        let n = piece.len();
        let mut ids: Vec<u32> = piece.iter().map(|&b| self.byte_id[b as usize]).collect();
        let mut next: Vec<u32> = (1..=n as u32)
            .map(|i| if i == n as u32 { NONE } else { i })
            .collect();
        let mut prev: Vec<u32> = (0..n as u32)
            .map(|i| if i == 0 { NONE } else { i - 1 })
            .collect();
        let mut alive = vec![true; n];
        let mut heap: BinaryHeap<Reverse<(u32, u32)>> = (0..n - 1)
            .map(|i| (self.rank(ids[i], ids[i + 1]), i as u32))
            .filter(|&(r, _)| r != u32::MAX)
            .map(Reverse)
            .collect();
        while let Some(Reverse((rank, i))) = heap.pop() {
            let iu = i as usize;
            if !alive[iu] || next[iu] == NONE {
                continue;
            }
            let j = next[iu] as usize;
            if self.rank(ids[iu], ids[j]) != rank {
                continue;
            }
            ids[iu] = rank;
            alive[j] = false;
            next[iu] = next[j];
            if next[j] != NONE {
                prev[next[j] as usize] = i;
                let r = self.rank(rank, ids[next[j] as usize]);
                if r != u32::MAX {
                    heap.push(Reverse((r, i)));
                }
            }
            if prev[iu] != NONE {
                let p = prev[iu];
                let r = self.rank(ids[p as usize], rank);
                if r != u32::MAX {
                    heap.push(Reverse((r, p)));
                }
            }
        }
        let mut i = 0u32;
        while i != NONE {
            out.push(ids[i as usize]);
            i = next[i as usize];
        }
    }
}

/// Reusable buffers for one worker.
#[derive(Default)]
pub struct Scratch {
    ids: Vec<u32>,
    ranks: Vec<u32>,
}

/// Chunk -> ids for chunks that took merging; keys borrow from the texts being encoded and
/// values live in one arena, so a hit costs a hash and a copy, never an allocation.
#[derive(Default)]
pub struct ChunkCache<'t> {
    short: ShortMap<(u32, u32)>,
    long: FxHashMap<&'t str, (u32, u32)>,
    arena: Vec<u32>,
    scratch: Scratch,
}

pub struct Encoder {
    pub vocab: Vocab,
    pub splitter: Splitter,
    pub pattern: String,
}

impl Encoder {
    /// Appends the ids of `text` to `out`.
    pub fn encode_into<'t>(
        &self,
        text: &'t str,
        cache: &mut ChunkCache<'t>,
        out: &mut Vec<u32>,
    ) -> Result<(), String> {
        let vocab = &self.vocab;
        self.splitter.for_each_chunk(text, |chunk| {
            let bytes = chunk.as_bytes();
            if bytes.len() == 1 {
                out.push(vocab.byte_id[bytes[0] as usize]);
                return;
            }
            let key = short_key(bytes);
            let token = match key {
                Some(k) => vocab.short.get(&k),
                None => vocab.by_bytes.get(bytes),
            };
            if let Some(&id) = token {
                out.push(id);
                return;
            }
            let cached = match key {
                Some(k) => cache.short.get(&k),
                None => cache.long.get(chunk),
            };
            if let Some(&(start, len)) = cached {
                out.extend_from_slice(&cache.arena[start as usize..(start + len) as usize]);
                return;
            }
            if cache.arena.len() > CACHE_MAX_IDS {
                cache.short.clear();
                cache.long.clear();
                cache.arena.clear();
            }
            let start = cache.arena.len();
            vocab.merge_chunk(bytes, &mut cache.scratch, &mut cache.arena);
            let ids = &cache.arena[start..];
            out.extend_from_slice(ids);
            let span = (start as u32, ids.len() as u32);
            match key {
                Some(k) => cache.short.insert(k, span),
                None => cache.long.insert(chunk, span),
            };
        })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        self.encode_into(text, &mut ChunkCache::default(), &mut out)?;
        Ok(out)
    }

    /// Encodes `texts` in parallel on the current rayon pool; one cache per group of texts.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>, String> {
        use rayon::prelude::*;
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let groups = rayon::current_num_threads() * 4;
        let group_len = texts.len().div_ceil(groups).max(1);
        let per_group: Vec<Vec<Vec<u32>>> = texts
            .par_chunks(group_len)
            .map(|group| {
                let mut cache = ChunkCache::default();
                group
                    .iter()
                    .map(|t| {
                        let mut out = Vec::with_capacity(t.len() / 3 + 1);
                        self.encode_into(t, &mut cache, &mut out)?;
                        Ok(out)
                    })
                    .collect::<Result<Vec<_>, String>>()
            })
            .collect::<Result<_, String>>()?;
        Ok(per_group.into_iter().flatten().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pretok::NANOCHAT_PATTERN;

    fn encoder(merges: &[(u32, u32)]) -> Encoder {
        Encoder {
            vocab: Vocab::from_merges(merges),
            splitter: Splitter::new(NANOCHAT_PATTERN, false).unwrap(),
            pattern: NANOCHAT_PATTERN.to_owned(),
        }
    }

    #[test]
    fn scan_and_heap_merges_agree() {
        // a b -> 256, 256 256 -> 257, a a -> 258, 258 b -> 259
        let enc = encoder(&[(97, 98), (256, 256), (97, 97), (258, 98)]);
        let mut state = 88172645463325252u64;
        for _ in 0..500 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = 2 + (state % 300) as usize;
            let piece: Vec<u8> = (0..len)
                .map(|i| {
                    if (state >> (i % 61)) & 1 == 0 {
                        b'a'
                    } else {
                        b'b'
                    }
                })
                .collect();
            let (mut short, mut long) = (Vec::new(), Vec::new());
            enc.vocab
                .merge_chunk_scan(&piece, &mut Scratch::default(), &mut short);
            enc.vocab.merge_chunk_long(&piece, &mut long);
            assert_eq!(short, long);
        }
    }

    #[test]
    fn short_keys_are_distinct() {
        let pieces: [&[u8]; 9] = [
            b"", b"\0", b"a", b"a\0", b"ab", b"abc", b"abcd", b"abcdefg", b"bcdefga",
        ];
        let keys: std::collections::HashSet<u64> =
            pieces.iter().map(|p| short_key(p).unwrap()).collect();
        assert_eq!(keys.len(), pieces.len());
        assert_eq!(short_key(b"abcdefgh"), None);
        assert_eq!(
            short_key(b"abcdefg").unwrap() & 0xFF_FFFF_FFFF_FFFF,
            u64::from_le_bytes(*b"abcdefg\0")
        );
    }

    #[test]
    fn roundtrip() {
        let enc = encoder(&[(104, 101), (108, 108)]);
        let text = "hello hello world, 123 ünïcødé 😀";
        let ids = enc.encode(text).unwrap();
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&i| enc.vocab.tokens[i as usize].clone())
            .collect();
        assert_eq!(bytes, text.as_bytes());
    }
}
