//! `bpe_rust`: byte-level BPE that trains with rustbpe's exact merges and encodes like
//! tiktoken, both with the GIL released and in parallel.
//!
//! Python API (module `bpe_rust`):
//! - `Tokenizer(pattern=None)`: the 256 byte tokens; `pattern` defaults to GPT-4's.
//! - `Tokenizer.from_ranks(mergeable_ranks, pattern, special_tokens=None)`: from `{bytes: rank}`
//!   (ranks 0..n-1, every single byte present) and optional `{str: id}` specials (ids >= n).
//! - `train_from_iterator(iterator, vocab_size, pattern=None, buffer_size=8192)`
//! - `encode(text)`, `encode_batch(texts, num_threads=None)`, `decode(ids) -> bytes`
//! - `get_mergeable_ranks() -> dict[bytes, int]`, `get_pattern()`, `get_special_tokens()`,
//!   `with_special_tokens(dict)`, `get_merge_pairs()`, `vocab_size`, `n_mergeable`
//! - `split_text(text, pattern=None, force_regex=False)`: the pre-tokenizer's chunks.

mod encode;
mod pretok;
mod train;

use std::sync::{Arc, Mutex};

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyString};
use rustc_hash::FxHashMap;

use encode::{Encoder, Vocab};
use pretok::{Splitter, GPT4_PATTERN};

fn value_error(msg: impl Into<String>) -> PyErr {
    PyValueError::new_err(msg.into())
}

/// A `str` as UTF-8, or a ValueError that says where the lone surrogate is.
fn text_of<'a>(s: &'a Bound<'_, PyString>, what: &str) -> PyResult<&'a str> {
    s.to_str().map_err(|err| {
        let py = s.py();
        let at = err
            .value(py)
            .getattr("start")
            .map(|v| v.to_string())
            .unwrap_or_else(|_| "?".into());
        let e = value_error(format!(
            "{what} contains a lone surrogate at index {at}, which is not valid Unicode and \
             cannot be encoded as UTF-8; clean it first, e.g. \
             text.encode('utf-8', 'replace').decode('utf-8')"
        ));
        e.set_cause(py, Some(err));
        e
    })
}

fn item_as_str<'a, 'py>(
    item: &'a Bound<'py, PyAny>,
    index: usize,
) -> PyResult<&'a Bound<'py, PyString>> {
    item.downcast::<PyString>().map_err(|_| {
        let type_name = item
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "?".into());
        PyTypeError::new_err(format!("item {index} is a {type_name}, expected str"))
    })
}

#[pyclass(module = "bpe_rust", frozen)]
struct Tokenizer {
    encoder: Encoder,
    /// Special token ids and strings, in the order they were given.
    specials: Vec<(String, u32)>,
    special_bytes: FxHashMap<u32, Vec<u8>>,
    /// Thread pools by size for `encode_batch(num_threads=...)`, built on first use.
    pools: Mutex<FxHashMap<usize, Arc<rayon::ThreadPool>>>,
}

impl Tokenizer {
    fn build(vocab: Vocab, pattern: &str, specials: Vec<(String, u32)>) -> PyResult<Self> {
        let splitter = Splitter::new(pattern, false).map_err(value_error)?;
        let n = vocab.tokens.len() as u64;
        let mut special_bytes = FxHashMap::default();
        for (name, id) in &specials {
            if (*id as u64) < n {
                return Err(value_error(format!(
                    "special token {name:?} has id {id}, which is a mergeable rank; special ids \
                     must be >= {n}"
                )));
            }
            if special_bytes
                .insert(*id, name.as_bytes().to_vec())
                .is_some()
            {
                return Err(value_error(format!("special token id {id} is used twice")));
            }
        }
        Ok(Tokenizer {
            encoder: Encoder {
                vocab,
                splitter,
                pattern: pattern.to_owned(),
            },
            specials,
            special_bytes,
            pools: Mutex::new(FxHashMap::default()),
        })
    }

    fn pool(&self, num_threads: usize) -> PyResult<Arc<rayon::ThreadPool>> {
        let mut pools = self.pools.lock().expect("pool cache lock");
        if let Some(p) = pools.get(&num_threads) {
            return Ok(p.clone());
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(num_threads)
            .build()
            .map_err(|e| value_error(format!("cannot start {num_threads} threads: {e}")))?;
        let pool = Arc::new(pool);
        pools.insert(num_threads, pool.clone());
        Ok(pool)
    }
}

fn parse_specials(special_tokens: Option<&Bound<'_, PyDict>>) -> PyResult<Vec<(String, u32)>> {
    let mut out = Vec::new();
    if let Some(d) = special_tokens {
        for (k, v) in d.iter() {
            let name: String = k
                .extract()
                .map_err(|_| PyTypeError::new_err("special token names must be str"))?;
            let id: u32 = v.extract().map_err(|_| {
                value_error(format!(
                    "special token {name:?}: id must be an int in [0, 2**32)"
                ))
            })?;
            out.push((name, id));
        }
    }
    Ok(out)
}

#[pymethods]
impl Tokenizer {
    /// The 256 byte tokens and no merges, splitting with `pattern` (GPT-4's by default).
    #[new]
    #[pyo3(signature = (pattern=None))]
    fn new(pattern: Option<&str>) -> PyResult<Self> {
        Self::build(
            Vocab::from_merges(&[]),
            pattern.unwrap_or(GPT4_PATTERN),
            Vec::new(),
        )
    }

    /// A tokenizer from `{token bytes: rank}` (ranks exactly 0..n-1, all 256 single bytes
    /// present), a split pattern and optional `{name: id}` special tokens.
    #[staticmethod]
    #[pyo3(signature = (mergeable_ranks, pattern, special_tokens=None))]
    fn from_ranks(
        mergeable_ranks: &Bound<'_, PyDict>,
        pattern: &str,
        special_tokens: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        let n = mergeable_ranks.len();
        let mut tokens: Vec<Option<Vec<u8>>> = vec![None; n];
        for (k, v) in mergeable_ranks.iter() {
            let bytes: Vec<u8> = k
                .downcast::<PyBytes>()
                .map_err(|_| PyTypeError::new_err("mergeable_ranks keys must be bytes"))?
                .as_bytes()
                .to_vec();
            let rank: usize = v.extract().map_err(|_| {
                value_error(format!("rank of {bytes:?} must be a non-negative int"))
            })?;
            if rank >= n {
                return Err(value_error(format!(
                    "rank {rank} of {bytes:?} is out of range; ranks must be exactly 0..{n}"
                )));
            }
            if tokens[rank].replace(bytes).is_some() {
                return Err(value_error(format!(
                    "rank {rank} is used twice; ranks must be exactly 0..{n}"
                )));
            }
        }
        let tokens: Vec<Vec<u8>> = tokens.into_iter().map(|t| t.expect("filled")).collect();
        let vocab = Vocab::from_tokens(tokens).map_err(value_error)?;
        Self::build(vocab, pattern, parse_specials(special_tokens)?)
    }

    /// Learns `vocab_size - 256` merges from an iterator of str (rustbpe's algorithm and
    /// merges), reading `buffer_size` texts at a time and splitting them in parallel with the
    /// GIL released. Returns the trained tokenizer (without special tokens).
    #[staticmethod]
    #[pyo3(signature = (iterator, vocab_size, pattern=None, buffer_size=8192))]
    fn train_from_iterator(
        py: Python<'_>,
        iterator: &Bound<'_, PyAny>,
        vocab_size: i64,
        pattern: Option<&str>,
        buffer_size: i64,
    ) -> PyResult<Self> {
        if !(256..=(1i64 << 31)).contains(&vocab_size) {
            return Err(value_error(format!(
                "vocab_size must be at least 256 (the byte tokens) and at most 2**31, got \
                 {vocab_size}"
            )));
        }
        if buffer_size < 1 {
            return Err(value_error(format!(
                "buffer_size must be >= 1, got {buffer_size}"
            )));
        }
        let pattern = pattern.unwrap_or(GPT4_PATTERN);
        let splitter = Splitter::new(pattern, false).map_err(value_error)?;
        let iter = iterator.try_iter().map_err(|_| {
            PyTypeError::new_err(format!(
                "expected an iterable of str, got {}",
                iterator
                    .get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_default()
            ))
        })?;
        let mut counts: FxHashMap<String, i64> = FxHashMap::default();
        let mut index = 0usize;
        let mut buffer: Vec<Bound<'_, PyString>> = Vec::with_capacity(buffer_size as usize);
        let mut iter = iter.into_iter();
        loop {
            buffer.clear();
            for item in iter.by_ref().take(buffer_size as usize) {
                let item = item?;
                buffer.push(item_as_str(&item, index)?.clone());
                index += 1;
            }
            if buffer.is_empty() {
                break;
            }
            let texts = buffer
                .iter()
                .enumerate()
                .map(|(i, s)| text_of(s, &format!("item {}", index - buffer.len() + i)))
                .collect::<PyResult<Vec<&str>>>()?;
            py.allow_threads(|| train::count_chunks(&texts, &splitter, &mut counts))
                .map_err(value_error)?;
        }
        if counts.is_empty() {
            return Err(value_error(if index == 0 {
                "the training iterator yielded no texts".to_owned()
            } else {
                format!("the training iterator yielded {index} texts but all were empty")
            }));
        }
        let num_merges = (vocab_size - 256) as usize;
        let merges = py.allow_threads(|| train::learn_merges(&counts, num_merges));
        drop(counts);
        let vocab = py.allow_threads(|| Vocab::from_merges(&merges));
        Self::build(vocab, pattern, Vec::new())
    }

    /// A copy of this tokenizer with `{name: id}` special tokens (ids >= n_mergeable).
    fn with_special_tokens(&self, special_tokens: &Bound<'_, PyDict>) -> PyResult<Self> {
        let vocab = Vocab::from_tokens(self.encoder.vocab.tokens.clone()).map_err(value_error)?;
        Self::build(
            vocab,
            &self.encoder.pattern,
            parse_specials(Some(special_tokens))?,
        )
    }

    fn get_pattern(&self) -> &str {
        &self.encoder.pattern
    }

    /// `{token bytes: rank}` in rank order.
    fn get_mergeable_ranks<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (rank, t) in self.encoder.vocab.tokens.iter().enumerate() {
            d.set_item(PyBytes::new(py, t), rank)?;
        }
        Ok(d)
    }

    fn get_special_tokens<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (name, id) in &self.specials {
            d.set_item(name, id)?;
        }
        Ok(d)
    }

    /// Every `(left, right, merged)` id triple whose bytes concatenate to a token, ordered by
    /// the merged id: the merges list another BPE library needs to encode the same way.
    fn get_merge_pairs(&self) -> Vec<(u32, u32, u32)> {
        self.encoder.vocab.merge_pairs()
    }

    /// One more than the largest id (tiktoken's `n_vocab`): mergeable tokens plus special
    /// tokens when their ids follow without gaps.
    #[getter]
    fn vocab_size(&self) -> usize {
        let top_special = self.specials.iter().map(|&(_, id)| id as usize + 1).max();
        top_special
            .unwrap_or(0)
            .max(self.encoder.vocab.tokens.len())
    }

    #[getter]
    fn n_mergeable(&self) -> usize {
        self.encoder.vocab.tokens.len()
    }

    /// Ids of `text`; special-token strings in it are ordinary text.
    fn encode(&self, py: Python<'_>, text: &Bound<'_, PyString>) -> PyResult<Vec<u32>> {
        let text = text_of(text, "text")?;
        py.allow_threads(|| self.encoder.encode(text))
            .map_err(value_error)
    }

    /// `[encode(t) for t in texts]`, in parallel on `num_threads` threads (default: all).
    #[pyo3(signature = (texts, num_threads=None))]
    fn encode_batch(
        &self,
        py: Python<'_>,
        texts: &Bound<'_, PyAny>,
        num_threads: Option<usize>,
    ) -> PyResult<Vec<Vec<u32>>> {
        let items: Vec<Bound<'_, PyAny>> = texts
            .try_iter()
            .map_err(|_| PyTypeError::new_err("texts must be an iterable of str"))?
            .collect::<PyResult<_>>()?;
        let strs = items
            .iter()
            .enumerate()
            .map(|(i, item)| item_as_str(item, i))
            .collect::<PyResult<Vec<_>>>()?;
        let texts = strs
            .iter()
            .enumerate()
            .map(|(i, s)| text_of(s, &format!("text {i}")))
            .collect::<PyResult<Vec<&str>>>()?;
        let run = || self.encoder.encode_batch(&texts);
        let result = match num_threads {
            None => py.allow_threads(run),
            Some(0) => return Err(value_error("num_threads must be >= 1")),
            Some(n) => {
                let pool = self.pool(n)?;
                py.allow_threads(|| pool.install(run))
            }
        };
        result.map_err(value_error)
    }

    /// The bytes of `ids` (mergeable or special); an unknown id is a ValueError.
    fn decode<'py>(
        &self,
        py: Python<'py>,
        ids: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let ids: Vec<i64> = ids.extract().map_err(|e| {
            PyTypeError::new_err(format!("decode takes a sequence of int ids: {e}"))
        })?;
        let tokens = &self.encoder.vocab.tokens;
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in &ids {
            if (0..tokens.len() as i64).contains(&id) {
                out.extend_from_slice(&tokens[id as usize]);
            } else if let Some(b) = u32::try_from(id)
                .ok()
                .and_then(|i| self.special_bytes.get(&i))
            {
                out.extend_from_slice(b);
            } else {
                return Err(value_error(format!(
                    "cannot decode id {id}: not a token of this vocabulary of {} ids",
                    self.vocab_size()
                )));
            }
        }
        Ok(PyBytes::new(py, &out))
    }

    /// The chunks the pre-tokenizer cuts `text` into.
    fn split(&self, text: &Bound<'_, PyString>) -> PyResult<Vec<String>> {
        let text = text_of(text, "text")?;
        let chunks = self.encoder.splitter.split(text).map_err(value_error)?;
        Ok(chunks.into_iter().map(str::to_owned).collect())
    }

    fn __repr__(&self) -> String {
        format!(
            "bpe_rust.Tokenizer(n_mergeable={}, specials={}, pattern={:?})",
            self.encoder.vocab.tokens.len(),
            self.specials.len(),
            self.encoder.pattern
        )
    }
}

/// The chunks `pattern` (GPT-4's by default) cuts `text` into; `force_regex` skips the
/// hand-written matcher (for testing that both agree).
#[pyfunction]
#[pyo3(signature = (text, pattern=None, force_regex=false))]
fn split_text(
    text: &Bound<'_, PyString>,
    pattern: Option<&str>,
    force_regex: bool,
) -> PyResult<Vec<String>> {
    let splitter =
        Splitter::new(pattern.unwrap_or(GPT4_PATTERN), force_regex).map_err(value_error)?;
    let text = text_of(text, "text")?;
    let chunks = splitter.split(text).map_err(value_error)?;
    Ok(chunks.into_iter().map(str::to_owned).collect())
}

#[pymodule]
fn bpe_rust(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("GPT4_PATTERN", GPT4_PATTERN)?;
    m.add("NANOCHAT_PATTERN", pretok::NANOCHAT_PATTERN)?;
    m.add_class::<Tokenizer>()?;
    m.add_function(wrap_pyfunction!(split_text, m)?)?;
    Ok(())
}
