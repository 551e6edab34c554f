//! Reading kiln checkpoints: `RUN/checkpoints/step-XXXXXXXX/` with `model.safetensors`,
//! `state.json` (the step and every file's size and CRC32) and the run's `config.toml`.
//!
//! A checkpoint counts as complete once its `state.json` exists: the trainer writes a checkpoint
//! into a hidden temp directory and renames it into place, so a crash never leaves a half one.
//! [`verify_checkpoint`] checks every recorded file, so a truncated or corrupted file is
//! reported by name instead of being loaded as garbage. (Writing checkpoints, with the
//! optimizer and sampler state, belongs to kiln-train.)

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::LoadError;

/// The checkpoint format version this kiln reads.
pub const CHECKPOINT_FORMAT_VERSION: u32 = 1;
/// The model weights of a checkpoint (kiln tensor names, f32 safetensors).
pub const MODEL_FILE: &str = "model.safetensors";
/// A checkpoint's manifest: step, file sizes and CRC32s (and the trainer's state).
pub const STATE_FILE: &str = "state.json";
/// A run's (and each checkpoint's) resolved run config.
pub const CONFIG_FILE: &str = "config.toml";
/// A run's tokenizer.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Where a run keeps its checkpoints.
pub const CHECKPOINTS_DIR: &str = "checkpoints";

/// Size and CRC32 of a file, as recorded in `state.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub bytes: u64,
    pub crc32: u32,
}

/// The parts of a checkpoint's `state.json` that loading needs (the rest is the trainer's).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CheckpointManifest {
    pub format_version: u32,
    /// Optimizer steps completed.
    pub step: u64,
    #[serde(default)]
    pub tokens_seen: u64,
    /// Every file of the checkpoint (besides `state.json` itself) with its size and CRC32.
    pub files: BTreeMap<String, FileDigest>,
}

/// Size and CRC32 of the file at `path`, read in 1 MiB chunks.
pub fn file_digest(path: &Path) -> Result<FileDigest, LoadError> {
    let mut f = File::open(path).map_err(|e| LoadError::io(path, e))?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| LoadError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(FileDigest {
        bytes,
        crc32: hasher.finalize(),
    })
}

/// Complete checkpoints of a run (those with a `state.json`), oldest first. A run without a
/// `checkpoints/` directory has none.
pub fn list_checkpoints(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>, LoadError> {
    let root = run_dir.join(CHECKPOINTS_DIR);
    let entries = match std::fs::read_dir(&root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(LoadError::io(&root, e)),
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(step) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue; // `.tmp-step-*` debris of a crash, or anything else
        };
        if entry.path().join(STATE_FILE).is_file() {
            out.push((step, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The newest complete checkpoint of a run, if any.
pub fn latest_checkpoint(run_dir: &Path) -> Result<Option<(u64, PathBuf)>, LoadError> {
    Ok(list_checkpoints(run_dir)?.pop())
}

/// Reads a checkpoint's `state.json` and checks that every file it records exists with the
/// recorded size and CRC32. Errors name the file and what is wrong with it.
pub fn verify_checkpoint(dir: &Path) -> Result<CheckpointManifest, LoadError> {
    let state_path = dir.join(STATE_FILE);
    let bad = |path: &Path, msg: String| LoadError::Checkpoint {
        path: path.to_path_buf(),
        msg,
    };
    let text = std::fs::read_to_string(&state_path)
        .map_err(|e| bad(&state_path, format!("cannot read ({e})")))?;
    let state: CheckpointManifest = serde_json::from_str(&text)
        .map_err(|e| bad(&state_path, format!("corrupt checkpoint state ({e})")))?;
    if state.format_version != CHECKPOINT_FORMAT_VERSION {
        return Err(bad(
            &state_path,
            format!(
                "format version {} is not supported (this kiln reads {CHECKPOINT_FORMAT_VERSION})",
                state.format_version
            ),
        ));
    }
    for (name, want) in &state.files {
        let p = dir.join(name);
        if !p.is_file() {
            return Err(bad(&p, "file is missing".into()));
        }
        let got = file_digest(&p)?;
        if got.bytes != want.bytes {
            return Err(bad(
                &p,
                format!(
                    "truncated or resized: {} bytes, checkpoint recorded {}",
                    got.bytes, want.bytes
                ),
            ));
        }
        if got.crc32 != want.crc32 {
            return Err(bad(
                &p,
                format!(
                    "corrupt: CRC32 {:08x} does not match the recorded {:08x}",
                    got.crc32, want.crc32
                ),
            ));
        }
    }
    Ok(state)
}
