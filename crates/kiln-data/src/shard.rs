//! Memory-mapped token shards and the prepared-dataset directory.
//!
//! A shard is a raw little-endian array of `u16` or `u32` token ids (see [`Dtype`]);
//! a dataset directory holds `train.bin`, `val.bin`, `tokenizer.json` and `meta.json`.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{DataError, Result};
use crate::prepare::DatasetMeta;
use crate::tokenizer::KilnTokenizer;

/// Element type of a token shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    U16,
    U32,
}

impl Dtype {
    /// The smallest dtype that holds every id of a vocabulary of this size.
    pub fn for_vocab(vocab_size: usize) -> Dtype {
        if vocab_size <= 1 << 16 {
            Dtype::U16
        } else {
            Dtype::U32
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::U16 => 2,
            Dtype::U32 => 4,
        }
    }

    /// `"u16"` or `"u32"`, as in `meta.json`.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::U16 => "u16",
            Dtype::U32 => "u32",
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A read-only, memory-mapped `.bin` file of token ids.
#[derive(Debug)]
pub struct TokenShard {
    path: PathBuf,
    dtype: Dtype,
    /// `None` for an empty file (mapping zero bytes is not portable).
    mmap: Option<Mmap>,
    len: usize,
}

impl TokenShard {
    /// Maps `path`, whose elements are `dtype`.
    pub fn open(path: impl AsRef<Path>, dtype: Dtype) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| DataError::io("opening shard", &path, e))?;
        let bytes = file
            .metadata()
            .map_err(|e| DataError::io("reading metadata of", &path, e))?
            .len();
        if bytes % dtype.size() as u64 != 0 {
            return Err(DataError::ShardLength {
                path,
                len: bytes,
                elem_size: dtype.size(),
            });
        }
        let mmap = if bytes == 0 {
            None
        } else {
            // SAFETY: the shard is treated as immutable once prepared (prepare writes a
            // temporary file and renames it into place, never rewriting in place).
            Some(
                unsafe { Mmap::map(&file) }
                    .map_err(|e| DataError::io("mapping shard", &path, e))?,
            )
        };
        let len = (bytes / dtype.size() as u64) as usize;
        Ok(Self {
            path,
            dtype,
            mmap,
            len,
        })
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Token at index `i`, or `None` past the end.
    pub fn get(&self, i: usize) -> Option<u32> {
        if i >= self.len {
            return None;
        }
        let bytes = &self.mmap.as_ref()?[i * self.dtype.size()..(i + 1) * self.dtype.size()];
        Some(match self.dtype {
            Dtype::U16 => u16::from_le_bytes([bytes[0], bytes[1]]) as u32,
            Dtype::U32 => u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
        })
    }

    /// Appends tokens `[start, start + len)` to `out` (it is not cleared, so a batch can
    /// be built row by row).
    pub fn copy_window(&self, start: usize, len: usize, out: &mut Vec<u32>) -> Result<()> {
        let end = start
            .checked_add(len)
            .filter(|&e| e <= self.len)
            .ok_or_else(|| DataError::OutOfRange {
                path: self.path.clone(),
                start,
                len,
                n_tokens: self.len,
            })?;
        let Some(mmap) = &self.mmap else {
            return Ok(()); // empty shard: only the empty window passed the check above
        };
        let size = self.dtype.size();
        let bytes = &mmap[start * size..end * size];
        // Decode explicitly as little-endian: correct on any host and indifferent to
        // the alignment of the mapping.
        match self.dtype {
            Dtype::U16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32),
            ),
            Dtype::U32 => out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
        }
        Ok(())
    }
}

/// A prepared dataset directory (see [`crate::prepare_dataset`]).
#[derive(Debug)]
pub struct Dataset {
    pub meta: DatasetMeta,
    pub train: TokenShard,
    pub val: TokenShard,
    pub dir: PathBuf,
}

impl Dataset {
    /// Opens `dir`, checking that `meta.json`, the shards and the tokenizer agree.
    pub fn open(dir: impl AsRef<Path>) -> Result<Dataset> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(DataError::MissingDatasetDir { path: dir });
        }
        let meta_path = dir.join("meta.json");
        if !meta_path.is_file() {
            return Err(DataError::MissingMeta { path: meta_path });
        }
        let meta_bytes =
            std::fs::read(&meta_path).map_err(|e| DataError::io("reading", &meta_path, e))?;
        let meta: DatasetMeta =
            serde_json::from_slice(&meta_bytes).map_err(|e| DataError::Json {
                path: meta_path.clone(),
                source: e,
            })?;

        let mismatch = |field, expected: String, found: String| DataError::MetaMismatch {
            path: meta_path.clone(),
            field,
            expected,
            found,
        };
        // prepare always picks the smallest dtype, so anything else means a hand-edited meta.
        if meta.dtype != Dtype::for_vocab(meta.vocab_size) {
            return Err(mismatch(
                "dtype",
                meta.dtype.to_string(),
                format!(
                    "vocab_size {} which needs {}",
                    meta.vocab_size,
                    Dtype::for_vocab(meta.vocab_size)
                ),
            ));
        }
        let tokenizer = KilnTokenizer::load(dir.join("tokenizer.json"))?;
        if tokenizer.vocab_size() != meta.vocab_size {
            return Err(mismatch(
                "vocab_size",
                meta.vocab_size.to_string(),
                format!("{} in tokenizer.json", tokenizer.vocab_size()),
            ));
        }
        if tokenizer.eos_id() != Some(meta.eos_id) {
            return Err(mismatch(
                "eos_id",
                meta.eos_id.to_string(),
                format!("{:?} in tokenizer.json", tokenizer.eos_id()),
            ));
        }

        let train = TokenShard::open(dir.join("train.bin"), meta.dtype)?;
        let val = TokenShard::open(dir.join("val.bin"), meta.dtype)?;
        for (field, shard, expected) in [
            ("n_train_tokens", &train, meta.n_train_tokens),
            ("n_val_tokens", &val, meta.n_val_tokens),
        ] {
            if shard.len() as u64 != expected {
                return Err(mismatch(
                    field,
                    expected.to_string(),
                    format!("{} tokens in {}", shard.len(), shard.path().display()),
                ));
            }
        }
        Ok(Dataset {
            meta,
            train,
            val,
            dir,
        })
    }

    /// Loads the dataset's copy of the tokenizer.
    pub fn tokenizer(&self) -> Result<KilnTokenizer> {
        KilnTokenizer::load(self.dir.join("tokenizer.json"))
    }
}
