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

/// Which checkpoints a run keeps: the newest `keep_last`, and the best by a logged metric.
#[derive(Debug, Clone, PartialEq)]
pub struct Retention {
    pub keep_last: usize,
    pub keep_best: Option<BestBy>,
}

/// A metric of `metrics.jsonl` and which way is better.
#[derive(Debug, Clone, PartialEq)]
pub struct BestBy {
    pub key: String,
    pub higher_is_better: bool,
}

impl BestBy {
    /// `min:KEY`, `max:KEY`, or a bare key: minimised when it names a loss, a KL or a
    /// perplexity, maximised otherwise (a reward, an accuracy). An empty key or another
    /// prefix is an error naming `train.keep_best`.
    pub fn parse(spec: &str) -> Result<BestBy, TrainError> {
        let bad = || {
            TrainError::Config(format!(
                "train.keep_best = {spec:?}: give a key of metrics.jsonl (e.g. \"val_loss\" or \"reward\"), optionally as \"min:KEY\" or \"max:KEY\""
            ))
        };
        let (key, higher) = match spec.split_once(':') {
            Some(("min", key)) => (key, false),
            Some(("max", key)) => (key, true),
            Some(_) => return Err(bad()),
            None => {
                let lower = spec.to_ascii_lowercase();
                let minimised = ["loss", "kl", "perplexity", "ppl"]
                    .iter()
                    .any(|w| lower.contains(w));
                (spec, !minimised)
            }
        };
        if key.trim().is_empty() {
            return Err(bad());
        }
        Ok(BestBy {
            key: key.trim().to_string(),
            higher_is_better: higher,
        })
    }
}

impl Retention {
    /// The policy a run's `[train]` section asks for (configs check it when they load).
    pub fn of(train: &crate::config::TrainConfig) -> Result<Retention, TrainError> {
        Ok(Retention {
            keep_last: train.keep_checkpoints,
            keep_best: train.keep_best.as_deref().map(BestBy::parse).transpose()?,
        })
    }
}

/// The file naming the best checkpoint kept by `train.keep_best`.
pub const BEST_FILE: &str = "best.json";

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
    keep: &Retention,
) -> Result<PathBuf, TrainError> {
    save_with(
        run_dir,
        state,
        config_toml,
        |dir| write_files(dir).map(|()| BTreeMap::new()),
        keep,
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
    keep: &Retention,
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
    prune(run_dir, keep)?;
    Ok(final_dir)
}

/// Completed checkpoints of a run, oldest first.
pub fn list(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>, TrainError> {
    Ok(kiln_load::list_checkpoints(run_dir)?)
}

/// Removes all but the newest `keep.keep_last` checkpoints and, with `keep.keep_best`, the
/// best one by its metric (recorded in `checkpoints/best.json`).
fn prune(run_dir: &Path, keep: &Retention) -> Result<(), TrainError> {
    let all = list(run_dir)?;
    let best = match &keep.keep_best {
        Some(by) => best_checkpoint(run_dir, &all, by)?,
        None => None,
    };
    let n_old = all.len().saturating_sub(keep.keep_last.max(1));
    for (step, dir) in all.into_iter().take(n_old) {
        if best.as_ref().is_some_and(|(s, _)| *s == step) {
            continue;
        }
        fs::remove_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
    }
    Ok(())
}

/// The checkpoint with the best value of `by.key`, each checkpoint valued by the last row of
/// `metrics.jsonl` at or before its step that logs the key (checkpoints before the first such
/// row have no value and are never the best; on a tie the later wins). Records it in
/// `checkpoints/best.json`.
fn best_checkpoint(
    run_dir: &Path,
    checkpoints: &[(u64, PathBuf)],
    by: &BestBy,
) -> Result<Option<(u64, f64)>, TrainError> {
    let metrics = run_dir.join(crate::metrics::METRICS_FILE);
    let text = match fs::read_to_string(&metrics) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&metrics, e)),
    };
    // (step, value) in file order; a resumed run may log a step again: the last row wins.
    let mut logged: Vec<(u64, f64)> = Vec::new();
    for line in text.lines() {
        let Ok(row) = serde_json::from_str::<serde_json::Value>(line) else {
            continue; // a line cut by a crash; the metrics writer reports those itself
        };
        if let (Some(step), Some(v)) = (row["step"].as_u64(), row[&by.key].as_f64()) {
            logged.retain(|(s, _)| *s < step);
            logged.push((step, v));
        }
    }
    let mut best: Option<(u64, f64)> = None;
    for (step, _) in checkpoints {
        let Some(&(_, v)) = logged.iter().rev().find(|(s, _)| s <= step) else {
            continue;
        };
        let better = match best {
            None => true,
            Some((_, b)) if by.higher_is_better => v >= b,
            Some((_, b)) => v <= b,
        };
        if better && v.is_finite() {
            best = Some((*step, v));
        }
    }
    if let Some((step, value)) = best {
        let path = checkpoints_dir(run_dir).join(BEST_FILE);
        let record = serde_json::json!({
            "key": by.key, "higher_is_better": by.higher_is_better, "step": step, "value": value,
            "dir": step_dir_name(step),
        });
        let tmp = path.with_extension("json.tmp");
        fs::write(&tmp, record.to_string()).map_err(|e| io_err(&tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| io_err(&path, e))?;
    }
    Ok(best)
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
    "train.keep_best",
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

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: u64) -> CheckpointState {
        CheckpointState {
            format_version: FORMAT_VERSION,
            step,
            tokens_seen: step * 8,
            sampler: WindowSampler {
                seed: 1,
                batch_size: 1,
                ctx: 8,
                next_batch: step,
            },
            dropout_rng: SplitMix64::new(1),
            files: BTreeMap::new(),
        }
    }

    fn steps_kept(run: &Path) -> Vec<u64> {
        list(run).unwrap().into_iter().map(|(s, _)| s).collect()
    }

    #[test]
    fn the_best_checkpoint_by_a_logged_metric_is_kept_with_the_newest() {
        assert_eq!(
            BestBy::parse("val_loss").unwrap(),
            BestBy {
                key: "val_loss".into(),
                higher_is_better: false
            }
        );
        assert!(BestBy::parse("reward").unwrap().higher_is_better);
        assert!(!BestBy::parse("min:reward").unwrap().higher_is_better);
        for bad in ["max:", "", "best:reward"] {
            let e = BestBy::parse(bad).unwrap_err().to_string();
            assert!(
                e.contains("train.keep_best") && e.contains("min:KEY"),
                "{e}"
            );
        }

        for (spec, values, best) in [
            ("val_loss", [3.0, 2.5, 2.8, 2.9], 20),
            ("reward", [0.1, 0.7, 0.3, 0.2], 20),
            ("min:reward", [0.1, 0.7, 0.3, 0.2], 10),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let run = dir.path();
            let key = spec.trim_start_matches("min:");
            let keep = Retention {
                keep_last: 1,
                keep_best: Some(BestBy::parse(spec).unwrap()),
            };
            let mut rows = String::new();
            for (i, v) in values.iter().enumerate() {
                let step = 10 * (i as u64 + 1);
                // A training row without the key in between must not reset the value.
                rows.push_str(&format!("{{\"step\":{step},\"{key}\":{v}}}\n"));
                rows.push_str(&format!("{{\"step\":{},\"lr\":0.1}}\n", step + 5));
                fs::write(run.join(crate::metrics::METRICS_FILE), &rows).unwrap();
                save(run, state(step), "", |_| Ok(()), &keep).unwrap();
            }
            assert_eq!(steps_kept(run), vec![best, 40], "{spec}");
            let record: serde_json::Value = serde_json::from_str(
                &fs::read_to_string(checkpoints_dir(run).join(BEST_FILE)).unwrap(),
            )
            .unwrap();
            assert_eq!(record["step"], best, "{spec}");
        }

        // Without keep_best only the newest stay.
        let dir = tempfile::tempdir().unwrap();
        let keep = Retention {
            keep_last: 2,
            keep_best: None,
        };
        for step in [1, 2, 3] {
            save(dir.path(), state(step), "", |_| Ok(()), &keep).unwrap();
        }
        assert_eq!(steps_kept(dir.path()), vec![2, 3]);
    }
}
