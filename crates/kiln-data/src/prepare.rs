//! Turning text sources into a prepared dataset directory.
//!
//! Output layout (all files written to a temporary name and renamed into place;
//! `meta.json` last, so a directory without it is known to be incomplete):
//!
//! - `train.bin`, `val.bin`: raw little-endian token ids, `u16` when the vocabulary has at
//!   most 65536 entries, else `u32`;
//! - `tokenizer.json`: a copy of the tokenizer used;
//! - `meta.json`: [`DatasetMeta`].
//!
//! The split is by fixed-size blocks of the concatenated token stream, so it is
//! deterministic and identical to the Python reference:
//! block `i` is validation iff `splitmix64(seed ^ i) % 10000 < val_fraction * 10000`.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};
use crate::sampler::splitmix64;
use crate::shard::Dtype;
use crate::tokenizer::{KilnTokenizer, EOS_TOKEN};

/// Options for [`prepare_dataset`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PrepareOptions {
    /// Fraction of blocks (not documents) assigned to validation, in `[0, 1]`.
    pub val_fraction: f64,
    /// Seed of the block split.
    pub seed: u64,
    /// Size of the blocks the token stream is cut into for the split.
    pub split_block_tokens: usize,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        Self {
            val_fraction: 0.05,
            seed: 1337,
            split_block_tokens: 2048,
        }
    }
}

/// Contents of `meta.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DatasetMeta {
    /// Element type of `train.bin` / `val.bin` (`"u16"` or `"u32"`).
    pub dtype: Dtype,
    /// Tokenizer vocabulary size, added tokens included.
    pub vocab_size: usize,
    /// Id of `<|endoftext|>`, appended after every document.
    pub eos_id: u32,
    pub n_train_tokens: u64,
    pub n_val_tokens: u64,
    pub n_documents: u64,
    /// The files read, in order (directories expanded).
    pub sources: Vec<String>,
    pub val_fraction: f64,
    pub seed: u64,
    /// Block size of the split (needed to reproduce it).
    pub split_block_tokens: usize,
}

/// Is block `i` in the validation split? Compared in `f64` exactly like Python's
/// `splitmix64(seed ^ i) % 10000 < val_fraction * 10000`.
fn is_val_block(seed: u64, i: u64, val_fraction: f64) -> bool {
    ((splitmix64(seed ^ i) % 10_000) as f64) < val_fraction * 10_000.0
}

/// Tokenizes `sources` with `tokenizer` into `out_dir` (created if needed) and returns the
/// metadata also written to `out_dir/meta.json`.
///
/// A source is a `.txt` file (one document), a `.jsonl` file (one document per line, in
/// the string field `text`; blank lines skipped) or a directory, meaning its `.txt` and
/// `.jsonl` files sorted by name (not recursive). Every document is followed by EOS.
pub fn prepare_dataset(
    sources: &[PathBuf],
    tokenizer: &KilnTokenizer,
    out_dir: &Path,
    opts: &PrepareOptions,
) -> Result<DatasetMeta> {
    if !(0.0..=1.0).contains(&opts.val_fraction) {
        return Err(DataError::InvalidOption {
            field: "val_fraction",
            problem: format!("{} is not in [0, 1]", opts.val_fraction),
        });
    }
    if opts.split_block_tokens == 0 {
        return Err(DataError::InvalidOption {
            field: "split_block_tokens",
            problem: "must be at least 1".into(),
        });
    }
    let eos_id = tokenizer
        .eos_id()
        .ok_or(DataError::NoEos { token: EOS_TOKEN })?;
    let files = expand_sources(sources)?;
    let vocab_size = tokenizer.vocab_size();
    let dtype = Dtype::for_vocab(vocab_size);

    std::fs::create_dir_all(out_dir)
        .map_err(|e| DataError::io("creating output directory", out_dir, e))?;
    // Drop a stale meta.json first: from now until the end the directory is "incomplete".
    let meta_path = out_dir.join("meta.json");
    match std::fs::remove_file(&meta_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(DataError::io("removing stale", &meta_path, e))
        }
        _ => {}
    }

    let mut splitter = BlockSplitter {
        train: ShardWriter::create(&out_dir.join("train.bin"), dtype)?,
        val: ShardWriter::create(&out_dir.join("val.bin"), dtype)?,
        block: Vec::with_capacity(opts.split_block_tokens),
        block_tokens: opts.split_block_tokens,
        block_index: 0,
        seed: opts.seed,
        val_fraction: opts.val_fraction,
    };
    let mut docs = DocBatcher {
        tokenizer,
        eos_id,
        pending: Vec::new(),
        pending_bytes: 0,
        n_documents: 0,
    };
    let t0 = std::time::Instant::now();
    for file in &files {
        read_documents(file, |doc| docs.push(doc, &mut splitter))?;
    }
    docs.flush(&mut splitter)?;
    splitter.finish_block()?;
    let n_blocks = splitter.block_index;

    let BlockSplitter { train, val, .. } = splitter;
    if val.count == 0 {
        train.discard();
        val.discard();
        return Err(DataError::EmptyValSplit {
            n_blocks,
            block_tokens: opts.split_block_tokens,
            val_fraction: opts.val_fraction,
        });
    }
    let n_train_tokens = train.commit()?;
    let n_val_tokens = val.commit()?;

    let tok_path = out_dir.join("tokenizer.json");
    let tok_tmp = tmp_path(&tok_path);
    tokenizer.save(&tok_tmp)?;
    rename(&tok_tmp, &tok_path)?;

    let meta = DatasetMeta {
        dtype,
        vocab_size,
        eos_id,
        n_train_tokens,
        n_val_tokens,
        n_documents: docs.n_documents,
        sources: files.iter().map(|p| p.display().to_string()).collect(),
        val_fraction: opts.val_fraction,
        seed: opts.seed,
        split_block_tokens: opts.split_block_tokens,
    };
    let json = serde_json::to_vec_pretty(&meta).map_err(|e| DataError::Json {
        path: meta_path.clone(),
        source: e,
    })?;
    write_atomic(&meta_path, &json)?;
    tracing::info!(
        documents = meta.n_documents,
        train_tokens = n_train_tokens,
        val_tokens = n_val_tokens,
        secs = t0.elapsed().as_secs_f32(),
        "prepared dataset in {}",
        out_dir.display()
    );
    Ok(meta)
}

/// Expands directories and checks that every source exists and has a known extension.
pub fn expand_sources(sources: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for src in sources {
        if src.is_dir() {
            let entries = std::fs::read_dir(src).map_err(|e| DataError::io("listing", src, e))?;
            let mut found = Vec::new();
            for entry in entries {
                let path = entry.map_err(|e| DataError::io("listing", src, e))?.path();
                if path.is_file() && source_kind(&path).is_some() {
                    found.push(path);
                }
            }
            if found.is_empty() {
                return Err(DataError::EmptySourceDir { path: src.clone() });
            }
            found.sort();
            files.extend(found);
        } else if src.is_file() {
            if source_kind(src).is_none() {
                return Err(DataError::UnsupportedSource { path: src.clone() });
            }
            files.push(src.clone());
        } else {
            return Err(DataError::MissingSource { path: src.clone() });
        }
    }
    if files.is_empty() {
        return Err(DataError::InvalidOption {
            field: "sources",
            problem: "no sources given".into(),
        });
    }
    Ok(files)
}

#[derive(Clone, Copy, PartialEq)]
enum SourceKind {
    Text,
    Jsonl,
}

fn source_kind(path: &Path) -> Option<SourceKind> {
    match path.extension()?.to_str()? {
        "txt" => Some(SourceKind::Text),
        "jsonl" => Some(SourceKind::Jsonl),
        _ => None,
    }
}

/// Calls `sink` with every document of `path`, validating JSONL as it goes.
fn read_documents(path: &Path, mut sink: impl FnMut(String) -> Result<()>) -> Result<()> {
    match source_kind(path) {
        Some(SourceKind::Text) => {
            let bytes = std::fs::read(path).map_err(|e| DataError::io("reading", path, e))?;
            let text = String::from_utf8(bytes).map_err(|e| {
                let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
                DataError::InvalidUtf8 {
                    path: path.to_path_buf(),
                    line: 1 + valid.iter().filter(|&&b| b == b'\n').count(),
                }
            })?;
            sink(text)
        }
        Some(SourceKind::Jsonl) => {
            let file = File::open(path).map_err(|e| DataError::io("opening", path, e))?;
            let mut reader = BufReader::new(file);
            let mut buf = Vec::new();
            let mut line_no = 0;
            loop {
                buf.clear();
                let n = reader
                    .read_until(b'\n', &mut buf)
                    .map_err(|e| DataError::io("reading", path, e))?;
                if n == 0 {
                    return Ok(());
                }
                line_no += 1;
                let line = std::str::from_utf8(&buf).map_err(|_| DataError::InvalidUtf8 {
                    path: path.to_path_buf(),
                    line: line_no,
                })?;
                if line.trim().is_empty() {
                    continue;
                }
                sink(jsonl_text(path, line_no, line)?)?;
            }
        }
        None => Err(DataError::UnsupportedSource {
            path: path.to_path_buf(),
        }),
    }
}

/// Extracts the `text` field of one JSONL line.
fn jsonl_text(path: &Path, line: usize, json: &str) -> Result<String> {
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| DataError::JsonlSyntax {
            path: path.to_path_buf(),
            line,
            source: e,
        })?;
    let field_err = |problem: String| DataError::JsonlField {
        path: path.to_path_buf(),
        line,
        field: "text",
        problem,
    };
    let serde_json::Value::Object(mut obj) = value else {
        return Err(field_err(format!(
            "is missing: the line is a JSON {}, not an object",
            json_type(&value)
        )));
    };
    match obj.remove("text") {
        Some(serde_json::Value::String(s)) => Ok(s),
        Some(other) => Err(field_err(format!(
            "must be a string, found {}",
            json_type(&other)
        ))),
        None => Err(field_err("is missing".into())),
    }
}

fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

/// Buffers documents so they are tokenized in parallel batches, in order.
struct DocBatcher<'a> {
    tokenizer: &'a KilnTokenizer,
    eos_id: u32,
    pending: Vec<String>,
    pending_bytes: usize,
    n_documents: u64,
}

impl DocBatcher<'_> {
    /// Big enough to keep all cores busy, small enough to bound memory.
    const MAX_PENDING_BYTES: usize = 8 << 20;
    const MAX_PENDING_DOCS: usize = 4096;

    fn push(&mut self, doc: String, out: &mut BlockSplitter) -> Result<()> {
        self.pending_bytes += doc.len();
        self.pending.push(doc);
        self.n_documents += 1;
        if self.pending_bytes >= Self::MAX_PENDING_BYTES
            || self.pending.len() >= Self::MAX_PENDING_DOCS
        {
            self.flush(out)?;
        }
        Ok(())
    }

    fn flush(&mut self, out: &mut BlockSplitter) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let texts: Vec<&str> = self.pending.iter().map(String::as_str).collect();
        for ids in self.tokenizer.encode_batch(&texts)? {
            out.push_tokens(&ids)?;
            out.push_tokens(&[self.eos_id])?;
        }
        self.pending.clear();
        self.pending_bytes = 0;
        Ok(())
    }
}

/// Cuts the token stream into blocks and routes each to train or val.
struct BlockSplitter {
    train: ShardWriter,
    val: ShardWriter,
    block: Vec<u32>,
    block_tokens: usize,
    block_index: u64,
    seed: u64,
    val_fraction: f64,
}

impl BlockSplitter {
    fn push_tokens(&mut self, mut ids: &[u32]) -> Result<()> {
        while !ids.is_empty() {
            let take = (self.block_tokens - self.block.len()).min(ids.len());
            self.block.extend_from_slice(&ids[..take]);
            ids = &ids[take..];
            if self.block.len() == self.block_tokens {
                self.finish_block()?;
            }
        }
        Ok(())
    }

    /// Routes the current (possibly partial, final) block; no-op when empty.
    fn finish_block(&mut self) -> Result<()> {
        if self.block.is_empty() {
            return Ok(());
        }
        let target = if is_val_block(self.seed, self.block_index, self.val_fraction) {
            &mut self.val
        } else {
            &mut self.train
        };
        target.write(&self.block)?;
        self.block.clear();
        self.block_index += 1;
        Ok(())
    }
}

/// Writes tokens to `<path>.tmp`; [`commit`](Self::commit) renames it into place.
struct ShardWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<File>,
    dtype: Dtype,
    count: u64,
    bytes: Vec<u8>,
}

impl ShardWriter {
    fn create(path: &Path, dtype: Dtype) -> Result<Self> {
        let tmp = tmp_path(path);
        let file = File::create(&tmp).map_err(|e| DataError::io("creating", &tmp, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            tmp,
            out: BufWriter::with_capacity(1 << 20, file),
            dtype,
            count: 0,
            bytes: Vec::new(),
        })
    }

    fn write(&mut self, ids: &[u32]) -> Result<()> {
        self.bytes.clear();
        match self.dtype {
            Dtype::U16 => {
                for &id in ids {
                    let v = u16::try_from(id)
                        .map_err(|_| DataError::TokenOverflow { id, dtype: "u16" })?;
                    self.bytes.extend_from_slice(&v.to_le_bytes());
                }
            }
            Dtype::U32 => {
                for &id in ids {
                    self.bytes.extend_from_slice(&id.to_le_bytes());
                }
            }
        }
        self.out
            .write_all(&self.bytes)
            .map_err(|e| DataError::io("writing", &self.tmp, e))?;
        self.count += ids.len() as u64;
        Ok(())
    }

    /// Flushes, syncs and renames into place; returns the number of tokens written.
    fn commit(self) -> Result<u64> {
        let file = self
            .out
            .into_inner()
            .map_err(|e| DataError::io("flushing", &self.tmp, e.into_error()))?;
        file.sync_all()
            .map_err(|e| DataError::io("syncing", &self.tmp, e))?;
        rename(&self.tmp, &self.path)?;
        Ok(self.count)
    }

    fn discard(self) {
        let Self { out, tmp, .. } = self;
        drop(out);
        let _ = std::fs::remove_file(tmp);
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).map_err(|e| DataError::io("renaming into place", to, e))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    let mut f = File::create(&tmp).map_err(|e| DataError::io("creating", &tmp, e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| DataError::io("writing", &tmp, e))?;
    rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::{Dataset, TokenShard};
    use crate::tokenizer::{train_bpe, BpeTrainOptions};

    const TEXT: &str = "Now is the winter of our discontent\n\
        Made glorious summer by this sun of York;\n\
        And all the clouds that lour'd upon our house\n\
        In the deep bosom of the ocean buried.\n";

    fn setup() -> (tempfile::TempDir, KilnTokenizer) {
        let dir = tempfile::tempdir().unwrap();
        let train_txt = dir.path().join("train_src.txt");
        std::fs::write(&train_txt, TEXT.repeat(10)).unwrap();
        let tok = train_bpe(
            &[train_txt],
            &BpeTrainOptions {
                vocab_size: 300,
                ..Default::default()
            },
        )
        .unwrap();

        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("a.txt"), TEXT).unwrap();
        std::fs::write(
            src.join("b.jsonl"),
            "{\"text\": \"First document.\"}\n\n{\"text\": \"Zweites Dokument: grüße 🦀\", \"id\": 2}\r\n{\"text\": \"\"}\n",
        )
        .unwrap();
        std::fs::write(src.join("ignored.md"), "not a source").unwrap();
        (dir, tok)
    }

    fn opts() -> PrepareOptions {
        PrepareOptions {
            val_fraction: 0.3,
            seed: 1337,
            split_block_tokens: 8,
        }
    }

    #[test]
    fn prepare_counts_split_and_determinism() {
        let (dir, tok) = setup();
        let src = dir.path().join("src");
        let out1 = dir.path().join("out1");
        let meta = prepare_dataset(std::slice::from_ref(&src), &tok, &out1, &opts()).unwrap();

        // Expected stream: a.txt, then the three JSONL docs, each followed by EOS.
        let eos = tok.eos_id().unwrap();
        let docs = [TEXT, "First document.", "Zweites Dokument: grüße 🦀", ""];
        let mut stream = Vec::new();
        for d in docs {
            stream.extend(tok.encode(d).unwrap());
            stream.push(eos);
        }
        let (mut train, mut val) = (Vec::new(), Vec::new());
        for (i, block) in stream.chunks(8).enumerate() {
            let dest = if is_val_block(1337, i as u64, 0.3) {
                &mut val
            } else {
                &mut train
            };
            dest.extend_from_slice(block);
        }
        assert!(!train.is_empty() && !val.is_empty());

        assert_eq!(meta.dtype, Dtype::U16);
        assert_eq!(meta.n_documents, 4);
        assert_eq!(meta.n_train_tokens, train.len() as u64);
        assert_eq!(meta.n_val_tokens, val.len() as u64);
        assert_eq!(meta.eos_id, eos);
        assert_eq!(meta.vocab_size, tok.vocab_size());
        assert_eq!(meta.sources.len(), 2, "{:?}", meta.sources);
        assert!(meta.sources[0].ends_with("a.txt") && meta.sources[1].ends_with("b.jsonl"));

        let le16 = |ids: &[u32]| -> Vec<u8> {
            ids.iter().flat_map(|&i| (i as u16).to_le_bytes()).collect()
        };
        assert_eq!(std::fs::read(out1.join("train.bin")).unwrap(), le16(&train));
        assert_eq!(std::fs::read(out1.join("val.bin")).unwrap(), le16(&val));
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out1.join("meta.json")).unwrap()).unwrap();
        assert_eq!(json["dtype"], "u16");

        // A second run (same sources given as files) is byte-identical.
        let out2 = dir.path().join("out2");
        prepare_dataset(
            &[src.join("a.txt"), src.join("b.jsonl")],
            &tok,
            &out2,
            &opts(),
        )
        .unwrap();
        for f in ["train.bin", "val.bin", "meta.json", "tokenizer.json"] {
            assert_eq!(
                std::fs::read(out1.join(f)).unwrap(),
                std::fs::read(out2.join(f)).unwrap(),
                "{f} differs"
            );
        }
        assert!(!out1.join("train.bin.tmp").exists());

        // The prepared directory opens and reads back.
        let ds = Dataset::open(&out1).unwrap();
        assert_eq!(ds.meta, meta);
        let mut got = Vec::new();
        ds.train.copy_window(0, ds.train.len(), &mut got).unwrap();
        assert_eq!(got, train);
        assert_eq!(ds.val.get(0), Some(val[0]));
        assert_eq!(ds.tokenizer().unwrap().vocab_size(), tok.vocab_size());
    }

    #[test]
    fn jsonl_errors_name_file_line_and_field() {
        let (dir, tok) = setup();
        let cases = [
            (
                "missing.jsonl",
                "{\"text\": \"ok\"}\n\n{\"body\": \"no text\"}\n",
                ":3:",
                "`text` is missing",
            ),
            (
                "number.jsonl",
                "{\"text\": 5}\n",
                ":1:",
                "must be a string, found number",
            ),
            (
                "syntax.jsonl",
                "{\"text\": \"ok\"}\nnot json\n",
                ":2:",
                "invalid JSON",
            ),
            ("array.jsonl", "[1, 2]\n", ":1:", "not an object"),
        ];
        for (name, content, line, what) in cases {
            let path = dir.path().join(name);
            std::fs::write(&path, content).unwrap();
            let err = prepare_dataset(&[path], &tok, &dir.path().join("out"), &opts())
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(name) && err.contains(line) && err.contains(what),
                "{err}"
            );
        }
    }

    #[test]
    fn prepare_errors() {
        let (dir, tok) = setup();
        let out = dir.path().join("out");
        let src = dir.path().join("src");

        let missing = dir.path().join("nope.txt");
        let err = prepare_dataset(&[src.clone(), missing], &tok, &out, &opts()).unwrap_err();
        assert!(matches!(err, DataError::MissingSource { .. }));
        assert!(err.to_string().contains("nope.txt"), "{err}");

        let err = prepare_dataset(
            std::slice::from_ref(&src),
            &tok,
            &out,
            &PrepareOptions {
                val_fraction: 0.0,
                ..opts()
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("larger val_fraction"), "{err}");
        assert!(!out.join("meta.json").exists() && !out.join("train.bin.tmp").exists());

        let no_eos = train_bpe(
            &[src.join("a.txt")],
            &BpeTrainOptions {
                vocab_size: 300,
                min_frequency: 1,
                special_tokens: vec![],
            },
        )
        .unwrap();
        assert!(matches!(
            prepare_dataset(std::slice::from_ref(&src), &no_eos, &out, &opts()),
            Err(DataError::NoEos { .. })
        ));
    }

    #[test]
    fn dataset_open_errors() {
        let (dir, tok) = setup();
        let out = dir.path().join("out");
        let err = Dataset::open(&out).unwrap_err();
        assert!(matches!(err, DataError::MissingDatasetDir { .. }), "{err}");

        prepare_dataset(&[dir.path().join("src")], &tok, &out, &opts()).unwrap();
        let train = out.join("train.bin");
        let mut bytes = std::fs::read(&train).unwrap();

        // Odd length: not a whole number of u16.
        bytes.pop();
        std::fs::write(&train, &bytes).unwrap();
        let err = Dataset::open(&out).unwrap_err();
        assert!(matches!(err, DataError::ShardLength { .. }), "{err}");
        assert!(err.to_string().contains("train.bin"), "{err}");
        assert!(TokenShard::open(&train, Dtype::U16).is_err());

        // Whole tokens, but fewer than meta.json says.
        bytes.pop();
        std::fs::write(&train, &bytes).unwrap();
        let err = Dataset::open(&out).unwrap_err();
        assert!(err.to_string().contains("n_train_tokens"), "{err}");

        std::fs::remove_file(out.join("meta.json")).unwrap();
        let err = Dataset::open(&out).unwrap_err();
        assert!(matches!(err, DataError::MissingMeta { .. }), "{err}");
    }
}
