//! Pre-tokenization: cutting text into the chunks that BPE works on.
//!
//! Any pattern goes through `fancy-regex` (as rustbpe and tiktoken do). The two patterns that
//! matter in practice, GPT-4's cl100k pattern and nanochat's variant of it (numbers in runs of at
//! most 2 digits instead of 3), also have a hand-written matcher that gives the same chunks
//! several times faster. Its character classes come from `regex-syntax`, the same Unicode tables
//! the regex engine uses, so the two paths cannot drift apart (the tests compare them).

use std::sync::OnceLock;

use regex_syntax::hir::{Class, HirKind};

/// GPT-4's (cl100k_base) split pattern; rustbpe's default.
pub const GPT4_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";
/// nanochat's split pattern: GPT-4's with `\p{N}{1,2}`.
pub const NANOCHAT_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

const LETTER: u8 = 1;
const NUMBER: u8 = 2;
const SPACE: u8 = 4;
// Case-insensitive letters of the contractions: `(?i:[sdmt]|ll|ve|re)`.
const C_SDMT: u8 = 8;
const C_L: u8 = 16;
const C_V: u8 = 32;
const C_E: u8 = 64;
const C_R: u8 = 128;

/// Per-code-point flag bits; a flat table for the BMP, sorted ranges above it.
struct CharTable {
    bmp: Vec<u8>,
    astral: Vec<(u32, u32, u8)>,
}

impl CharTable {
    fn build() -> Self {
        let sets: [(&str, u8); 8] = [
            (r"\p{L}", LETTER),
            (r"\p{N}", NUMBER),
            (r"\s", SPACE),
            (r"(?i:[sdmt])", C_SDMT),
            (r"(?i:[l])", C_L),
            (r"(?i:[v])", C_V),
            (r"(?i:[e])", C_E),
            (r"(?i:[r])", C_R),
        ];
        let mut bmp = vec![0u8; 0x10000];
        let mut astral = Vec::new();
        for (pattern, flag) in sets {
            let hir = regex_syntax::Parser::new()
                .parse(pattern)
                .expect("built-in class pattern parses");
            let HirKind::Class(Class::Unicode(class)) = hir.kind() else {
                unreachable!("{pattern} is a Unicode class")
            };
            for r in class.ranges() {
                let (lo, hi) = (r.start() as u32, r.end() as u32);
                for c in lo..=hi.min(0xFFFF) {
                    bmp[c as usize] |= flag;
                }
                if hi > 0xFFFF {
                    astral.push((lo.max(0x10000), hi, flag));
                }
            }
        }
        // Split the astral ranges into disjoint pieces so one binary search finds all flags.
        let mut bounds: Vec<u32> = astral
            .iter()
            .flat_map(|&(lo, hi, _)| [lo, hi + 1])
            .collect();
        bounds.sort_unstable();
        bounds.dedup();
        let mut pieces = Vec::new();
        for w in bounds.windows(2) {
            let (lo, hi) = (w[0], w[1] - 1);
            let flags = astral
                .iter()
                .filter(|&&(a, b, _)| a <= lo && hi <= b)
                .fold(0u8, |acc, &(_, _, f)| acc | f);
            if flags != 0 {
                pieces.push((lo, hi, flags));
            }
        }
        CharTable {
            bmp,
            astral: pieces,
        }
    }

    #[inline]
    fn flags(&self, c: u32) -> u8 {
        if c < 0x10000 {
            return self.bmp[c as usize];
        }
        match self.astral.binary_search_by(|&(lo, hi, _)| {
            if hi < c {
                std::cmp::Ordering::Less
            } else if lo > c {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        }) {
            Ok(i) => self.astral[i].2,
            Err(_) => 0,
        }
    }
}

fn table() -> &'static CharTable {
    static TABLE: OnceLock<CharTable> = OnceLock::new();
    TABLE.get_or_init(CharTable::build)
}

/// The hand-written matcher for the GPT-4 pattern family (`\p{N}{1,max_digits}`).
pub struct FastSplit {
    max_digits: usize,
    table: &'static CharTable,
}

/// Decodes the char starting at byte `i` of valid UTF-8: (code point, byte length).
#[inline]
fn decode(s: &[u8], i: usize) -> (u32, usize) {
    let b0 = s[i] as u32;
    if b0 < 0x80 {
        (b0, 1)
    } else if b0 < 0xE0 {
        (((b0 & 0x1F) << 6) | (s[i + 1] as u32 & 0x3F), 2)
    } else if b0 < 0xF0 {
        (
            ((b0 & 0x0F) << 12) | ((s[i + 1] as u32 & 0x3F) << 6) | (s[i + 2] as u32 & 0x3F),
            3,
        )
    } else {
        (
            ((b0 & 0x07) << 18)
                | ((s[i + 1] as u32 & 0x3F) << 12)
                | ((s[i + 2] as u32 & 0x3F) << 6)
                | (s[i + 3] as u32 & 0x3F),
            4,
        )
    }
}

const CR: u32 = '\r' as u32;
const LF: u32 = '\n' as u32;

impl FastSplit {
    #[inline]
    fn flags_at(&self, s: &[u8], i: usize) -> (u8, u32, usize) {
        let (c, len) = decode(s, i);
        (self.table.flags(c), c, len)
    }

    /// End of the run of chars starting at `i` whose flags satisfy `keep`.
    #[inline]
    fn run_end(&self, s: &[u8], mut i: usize, keep: impl Fn(u8, u32) -> bool) -> usize {
        while i < s.len() {
            let (f, c, len) = self.flags_at(s, i);
            if !keep(f, c) {
                break;
            }
            i += len;
        }
        i
    }

    #[inline]
    fn letters_end(&self, s: &[u8], i: usize) -> usize {
        self.run_end(s, i, |f, _| f & LETTER != 0)
    }

    /// ` ?[^\s\p{L}\p{N}]++[\r\n]*` after its first symbol char, which ends at `i`.
    #[inline]
    fn symbols_end(&self, s: &[u8], i: usize) -> usize {
        let i = self.run_end(s, i, |f, _| f & (LETTER | NUMBER | SPACE) == 0);
        self.run_end(s, i, |_, c| c == CR || c == LF)
    }

    /// Byte end of the chunk that starts at byte `i` (< s.len()); alternatives are tried in
    /// the pattern's order, exactly as a backtracking engine would.
    fn chunk_end(&self, s: &[u8], i: usize) -> usize {
        let n = s.len();
        let (f, c, len) = self.flags_at(s, i);
        let j = i + len;
        // '(?i:[sdmt]|ll|ve|re)
        if c == '\'' as u32 && j < n {
            let (f2, _, len2) = self.flags_at(s, j);
            if f2 & C_SDMT != 0 {
                return j + len2;
            }
            if j + len2 < n {
                let (f3, _, len3) = self.flags_at(s, j + len2);
                if (f2 & C_L != 0 && f3 & C_L != 0) || (f2 & (C_V | C_R) != 0 && f3 & C_E != 0) {
                    return j + len2 + len3;
                }
            }
        }
        // [^\r\n\p{L}\p{N}]?+\p{L}+ with no prefix char
        if f & LETTER != 0 {
            return self.letters_end(s, j);
        }
        // \p{N}{1,k}
        if f & NUMBER != 0 {
            let mut end = j;
            for _ in 1..self.max_digits {
                if end >= n {
                    break;
                }
                let (f2, _, len2) = self.flags_at(s, end);
                if f2 & NUMBER == 0 {
                    break;
                }
                end += len2;
            }
            return end;
        }
        // [^\r\n\p{L}\p{N}]?+\p{L}+ with a prefix char
        if c != CR && c != LF && j < n {
            let (f2, _, _) = self.flags_at(s, j);
            if f2 & LETTER != 0 {
                return self.letters_end(s, j);
            }
        }
        if f & SPACE == 0 {
            // A symbol: ` ?[^\s\p{L}\p{N}]++[\r\n]*` without the space.
            return self.symbols_end(s, j);
        }
        // ` ?[^\s\p{L}\p{N}]++[\r\n]*` with the space.
        if c == ' ' as u32 && j < n {
            let (f2, _, len2) = self.flags_at(s, j);
            if f2 & (LETTER | NUMBER | SPACE) == 0 {
                return self.symbols_end(s, j + len2);
            }
        }
        // Whitespace: \s*[\r\n] | \s+(?!\S) | \s+ over the maximal run [i, end).
        let mut last_newline_end = if c == CR || c == LF { j } else { 0 };
        let mut last_char_start = i;
        let mut end = j;
        while end < n {
            let (f2, c2, len2) = self.flags_at(s, end);
            if f2 & SPACE == 0 {
                break;
            }
            last_char_start = end;
            end += len2;
            if c2 == CR || c2 == LF {
                last_newline_end = end;
            }
        }
        if last_newline_end != 0 {
            return last_newline_end;
        }
        if end == n || last_char_start == i {
            return end;
        }
        // \s+(?!\S) backs off one char so the last space can prefix the next word.
        last_char_start
    }
}

/// How a tokenizer cuts text into chunks.
pub enum Splitter {
    Fast(FastSplit),
    Regex(Box<fancy_regex::Regex>),
}

impl Splitter {
    /// The fast matcher when `pattern` is one it implements (unless `force_regex`), else
    /// fancy-regex. Errors carry the regex compiler's message.
    pub fn new(pattern: &str, force_regex: bool) -> Result<Self, String> {
        let max_digits = match pattern {
            GPT4_PATTERN => Some(3),
            NANOCHAT_PATTERN => Some(2),
            _ => None,
        };
        match max_digits {
            Some(max_digits) if !force_regex => Ok(Splitter::Fast(FastSplit {
                max_digits,
                table: table(),
            })),
            _ => fancy_regex::Regex::new(pattern)
                .map(|re| Splitter::Regex(Box::new(re)))
                .map_err(|e| format!("invalid split pattern {pattern:?}: {e}")),
        }
    }

    /// Calls `f` on every chunk of `text`, in order.
    pub fn for_each_chunk<'t>(
        &self,
        text: &'t str,
        mut f: impl FnMut(&'t str),
    ) -> Result<(), String> {
        match self {
            Splitter::Fast(fast) => {
                let bytes = text.as_bytes();
                let mut i = 0;
                while i < bytes.len() {
                    let end = fast.chunk_end(bytes, i);
                    f(&text[i..end]);
                    i = end;
                }
                Ok(())
            }
            Splitter::Regex(re) => {
                for m in re.find_iter(text) {
                    let m = m.map_err(|e| format!("regex failed while splitting text: {e}"))?;
                    f(m.as_str());
                }
                Ok(())
            }
        }
    }

    pub fn split<'t>(&self, text: &'t str) -> Result<Vec<&'t str>, String> {
        let mut out = Vec::new();
        self.for_each_chunk(text, |c| out.push(c))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn both(text: &str) {
        static SPLITTERS: OnceLock<Vec<(Splitter, Splitter)>> = OnceLock::new();
        let splitters = SPLITTERS.get_or_init(|| {
            [NANOCHAT_PATTERN, GPT4_PATTERN]
                .iter()
                .map(|p| {
                    (
                        Splitter::new(p, false).unwrap(),
                        Splitter::new(p, true).unwrap(),
                    )
                })
                .collect()
        });
        for (fast, slow) in splitters {
            assert_eq!(
                fast.split(text).unwrap(),
                slow.split(text).unwrap(),
                "text {text:?}"
            );
        }
    }

    #[test]
    fn fast_matches_regex_on_tricky_text() {
        let samples = [
            "Hello world! I'm here, you'll see. WE'RE 12345 and 3.14159",
            "  leading spaces\n\n\n  trailing   \t\r\n\r\nx  ",
            "'s 'S 'ſ 'll 'LL 'lL 've 'VE 're 'Re 'x 'hello ''",
            "中文字符 😀🎉 naïve café 日本語テキスト١٢٣٤٥ ⅫⅩ ²³",
            "a\u{0301}e\u{0300} \u{00a0}nbsp\u{2028}line\u{3000}ideo\u{85}nel",
            "!!!\n\n?? ...\r\n   --- +++\t\t\n",
            "x = [1, 2, 3]  # comment\n    return f(x) ** 2\n",
            "   ",
            " ",
            "\n",
            "a",
            "'",
            "1234567",
        ];
        for text in samples {
            both(text);
        }
    }

    #[test]
    fn fast_matches_regex_on_random_text() {
        let alphabet: Vec<char> =
            "aZé中😀1٣Ⅻ²'sltvreLRE \t\n\r\u{a0}\u{3000}\u{2028}.,!?-_#\u{301}\u{85}\u{b}\u{c}"
                .chars()
                .collect();
        let mut state = 0x2545F4914F6CDD1Du64;
        for _ in 0..20000 {
            let mut text = String::new();
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 40) as usize;
            for _ in 0..len {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                text.push(alphabet[(state % alphabet.len() as u64) as usize]);
            }
            both(&text);
        }
    }

    #[test]
    fn bad_pattern_is_an_error() {
        assert!(Splitter::new("(unclosed", false).is_err());
    }
}
