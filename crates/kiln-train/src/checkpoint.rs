//! Checkpoints: `RUN/checkpoints/step-XXXXXXXX/{model,optimizer}.safetensors + state.json +
//! config.toml`. A checkpoint is written into a hidden temp directory, every file is fsynced,
//! and the directory is renamed into place, so a crash mid-save never leaves a half checkpoint
//! and never touches the previous one. `state.json` records each file's size and CRC32, so a
//! truncated or corrupted file is reported by name on resume instead of loading garbage.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use kiln_data::WindowSampler;
use kiln_model::SplitMix64;
use serde::{Deserialize, Serialize};

use crate::TrainError;

pub const FORMAT_VERSION: u32 = 1;
pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "state.json";
pub const CONFIG_FILE: &str = "config.toml";

pub use kiln_load::FileDigest;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointState {
    pub format_version: u32,
    /// Optimizer steps completed.
    pub step: u64,
    pub tokens_seen: u64,
    pub sampler: WindowSampler,
    pub dropout_rng: SplitMix64,
    pub files: BTreeMap<String, FileDigest>,
}

pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// A checkpoint's AdamW moments as whole tensors `m.NAME` / `v.NAME`: assembled from every
/// rank's pieces when the checkpoint is sharded (`shards.json`), else read from its one file.
/// Each optimizer keeps what it holds of them (`AdamW::load_tensors`, `Fsdp::load_moments`).
pub fn load_moments(
    dir: &Path,
    device: &candle_core::Device,
) -> Result<std::collections::HashMap<String, candle_core::Tensor>, TrainError> {
    use kiln_model::sharded::{read_manifest, read_sharded, SHARD_MANIFEST};
    if dir.join(SHARD_MANIFEST).exists() {
        let manifest = read_manifest(dir)?;
        return Ok(read_sharded(dir, &manifest, "optimizer", device)?);
    }
    let file = dir.join(OPTIMIZER_FILE);
    candle_core::safetensors::load(&file, device)
        .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", file.display())))
}

/// Where a checkpoint of `step` is written before it is renamed into place.
pub fn tmp_dir(run_dir: &Path, step: u64) -> PathBuf {
    checkpoints_dir(run_dir).join(format!(".tmp-{}", step_dir_name(step)))
}

pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

pub(crate) fn digest(path: &Path) -> Result<FileDigest, TrainError> {
    Ok(kiln_load::file_digest(path)?)
}

fn io_err(path: &Path, e: std::io::Error) -> TrainError {
    TrainError::Io(format!("{}: {e}", path.display()))
}

pub(crate) fn fsync(path: &Path) -> Result<(), TrainError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err(path, e))
}

/// Writes a checkpoint atomically. `write_files` fills the temp directory with the model and
/// optimizer files; this function adds `state.json` and `config.toml`, fsyncs and renames.
pub fn save(
    run_dir: &Path,
    state: CheckpointState,
    config_toml: &str,
    write_files: impl FnOnce(&Path) -> Result<(), TrainError>,
    keep_last: usize,
) -> Result<PathBuf, TrainError> {
    save_with(
        run_dir,
        state,
        config_toml,
        |dir| write_files(dir).map(|()| BTreeMap::new()),
        keep_last,
    )
}

/// [`save`] where `write_files` returns the digests of files it has already fsynced and
/// digested (each rank of a distributed run seals its own shards): only the others are read
/// again here.
pub fn save_with(
    run_dir: &Path,
    mut state: CheckpointState,
    config_toml: &str,
    write_files: impl FnOnce(&Path) -> Result<BTreeMap<String, FileDigest>, TrainError>,
    keep_last: usize,
) -> Result<PathBuf, TrainError> {
    let root = checkpoints_dir(run_dir);
    fs::create_dir_all(&root).map_err(|e| io_err(&root, e))?;
    let final_dir = root.join(step_dir_name(state.step));
    if final_dir.join(STATE_FILE).exists() {
        return Ok(final_dir); // this step is already saved (e.g. Ctrl-C right after a save)
    }
    let tmp = tmp_dir(run_dir, state.step);
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?; // debris of an earlier crash
    }
    fs::create_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    let mut sealed = write_files(&tmp)?;
    fs::write(tmp.join(CONFIG_FILE), config_toml).map_err(|e| io_err(&tmp, e))?;
    // Every file written (model and optimizer, or every rank's shards and the manifest).
    let mut names: Vec<String> = fs::read_dir(&tmp)
        .map_err(|e| io_err(&tmp, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != CONFIG_FILE && n != STATE_FILE)
        .collect();
    names.sort();
    for name in names {
        let d = match sealed.remove(&name) {
            Some(d) => d,
            None => {
                let p = tmp.join(&name);
                fsync(&p)?;
                digest(&p)?
            }
        };
        state.files.insert(name, d);
    }
    if let Some(name) = sealed.keys().next() {
        return Err(TrainError::Checkpoint(format!(
            "{}: {name} was reported written but is not there",
            tmp.display()
        )));
    }
    let state_path = tmp.join(STATE_FILE);
    let mut f = File::create(&state_path).map_err(|e| io_err(&state_path, e))?;
    f.write_all(
        serde_json::to_string_pretty(&state)
            .expect("invariant: state serialises")
            .as_bytes(),
    )
    .and_then(|_| f.sync_all())
    .map_err(|e| io_err(&state_path, e))?;
    fsync(&tmp.join(CONFIG_FILE))?;
    if final_dir.exists() {
        fs::remove_dir_all(&final_dir).map_err(|e| io_err(&final_dir, e))?; // incomplete leftover
    }
    fs::rename(&tmp, &final_dir).map_err(|e| io_err(&final_dir, e))?;
    fsync(&root)?;
    prune(&root, keep_last)?;
    Ok(final_dir)
}

/// Completed checkpoints of a run, oldest first.
pub fn list(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>, TrainError> {
    Ok(kiln_load::list_checkpoints(run_dir)?)
}

fn prune(root: &Path, keep_last: usize) -> Result<(), TrainError> {
    let run_dir = root.parent().unwrap_or(root);
    let all = list(run_dir)?;
    let n_remove = all.len().saturating_sub(keep_last.max(1));
    for (_, dir) in all.into_iter().take(n_remove) {
        fs::remove_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
    }
    Ok(())
}

/// Reads and verifies a checkpoint's state: every file must exist with the recorded size and
/// CRC32 (kiln-load's check, shared with `--model` resolution). Errors name the file and what
/// is wrong.
pub fn load_state(dir: &Path) -> Result<CheckpointState, TrainError> {
    kiln_load::verify_checkpoint(dir)?;
    let state_path = dir.join(STATE_FILE);
    let text = fs::read_to_string(&state_path).map_err(|e| {
        TrainError::Checkpoint(format!("{}: cannot read ({e})", state_path.display()))
    })?;
    serde_json::from_str(&text).map_err(|e| {
        TrainError::Checkpoint(format!(
            "{}: corrupt checkpoint state ({e})",
            state_path.display()
        ))
    })
}

/// Keys a resumed run may change: how long it runs and how often it logs, evaluates and
/// saves, where it runs (`dist.*`: checkpoints load on any number of ranks), and the MFU
/// denominator. Everything else (model, data, optimizer, batch, seed, precision...) defines
/// the run: continuing it under other values would silently train a different run.
const RESUMABLE_CHANGES: &[&str] = &[
    "train.steps",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.run_dir",
    "train.peak_flops",
    "dist.",
];

/// Refuses to resume from `checkpoint_dir` when `new_toml` (the config the resumed run would
/// use) changes a key that defines the run, naming each changed key with both values.
pub fn check_resume_config(checkpoint_dir: &Path, new_toml: &str) -> Result<(), TrainError> {
    let path = checkpoint_dir.join(CONFIG_FILE);
    let Ok(saved) = fs::read_to_string(&path) else {
        return Ok(()); // a checkpoint from before configs were saved with it
    };
    let parse = |s: &str, what: &Path| {
        s.parse::<toml::Table>()
            .map_err(|e| TrainError::Config(format!("{}: {e}", what.display())))
    };
    let (old, new) = (
        parse(&saved, &path)?,
        parse(new_toml, Path::new("the new config"))?,
    );
    let (mut old_keys, mut new_keys) = (Vec::new(), Vec::new());
    flatten("", &old, &mut old_keys);
    flatten("", &new, &mut new_keys);
    let old_map: std::collections::BTreeMap<_, _> = old_keys.into_iter().collect();
    let new_map: std::collections::BTreeMap<_, _> = new_keys.into_iter().collect();
    let keys: std::collections::BTreeSet<&String> = old_map.keys().chain(new_map.keys()).collect();
    let none = "(unset)".to_string();
    let changed: Vec<String> = keys
        .into_iter()
        .filter(|k| {
            !RESUMABLE_CHANGES
                .iter()
                .any(|r| k.starts_with(r) && (r.ends_with('.') || k.len() == r.len()))
        })
        .filter(|k| old_map.get(*k) != new_map.get(*k))
        .map(|k| {
            format!(
                "{k}: {} → {}",
                old_map.get(k).unwrap_or(&none),
                new_map.get(k).unwrap_or(&none)
            )
        })
        .collect();
    if changed.is_empty() {
        return Ok(());
    }
    Err(TrainError::Config(format!(
        "--resume would continue {} under a different run: {}. Resume with the run's own \
         settings (only train.steps and the logging, evaluation and checkpoint schedule may \
         change), or start a new run (another run_dir, or --overwrite)",
        checkpoint_dir.display(),
        changed.join("; ")
    )))
}

/// `table` as (dotted key, value as TOML text) pairs, arrays and scalars as leaves.
fn flatten(prefix: &str, table: &toml::Table, out: &mut Vec<(String, String)>) {
    for (k, v) in table {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(t) => flatten(&key, t, out),
            other => out.push((key, other.to_string())),
        }
    }
}
