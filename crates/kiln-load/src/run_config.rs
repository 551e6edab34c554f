//! The parts of a kiln run config (`config.toml`) that loading a model needs: the `[model]`
//! section (a preset with overrides, or every field written out as the trainer resolves it) and
//! `[data] dataset` (whose `tokenizer.json` is the fallback tokenizer). The whole run config,
//! with its other sections, is kiln-train's `RunConfig`.

use std::path::{Path, PathBuf};

use kiln_model::ModelConfig;

use crate::LoadError;

/// The model part of a run config file.
#[derive(Debug, Clone, PartialEq)]
pub struct RunModel {
    /// The `config.toml` read.
    pub config_file: PathBuf,
    pub model: ModelConfig,
    /// `[data] dataset`, as written (relative paths are relative to where the run was started).
    pub dataset: Option<PathBuf>,
}

/// Turns a `[model]` TOML table into a [`ModelConfig`]: `preset = "tiny"` starts from a named
/// preset and the keys next to it override it; unknown keys are refused by name. The result is
/// not validated (see [`ModelConfig::validate`]).
pub fn model_from_toml(section: toml::Value) -> Result<ModelConfig, LoadError> {
    let toml::Value::Table(mut table) = section else {
        return Err(LoadError::ModelSection("[model] must be a table".into()));
    };
    if let Some(preset) = table.remove("preset") {
        let name = preset
            .as_str()
            .ok_or_else(|| LoadError::ModelSection("[model] preset must be a string".into()))?;
        let base = ModelConfig::preset(name)?;
        let mut merged = toml::Table::try_from(&base).expect("invariant: ModelConfig serialises");
        merged.extend(table);
        table = merged;
    }
    toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| LoadError::ModelSection(format!("[model] {}", e.message())))
}

/// Reads the `[model]` (validated) and `[data] dataset` of a run config file.
pub fn read_run_model(config_file: &Path) -> Result<RunModel, LoadError> {
    let cfg_err = |msg: String| LoadError::Config {
        path: config_file.to_path_buf(),
        msg,
    };
    let text = std::fs::read_to_string(config_file).map_err(|e| LoadError::io(config_file, e))?;
    let mut root: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| cfg_err(format!("invalid TOML: {}", e.message())))?;
    let section = root
        .remove("model")
        .ok_or_else(|| cfg_err("missing section [model]".into()))?;
    let model = model_from_toml(section).map_err(|e| cfg_err(e.to_string()))?;
    model.validate().map_err(|e| cfg_err(e.to_string()))?;
    let dataset = root
        .get("data")
        .and_then(|d| d.get("dataset"))
        .and_then(|d| d.as_str())
        .map(PathBuf::from);
    Ok(RunModel {
        config_file: config_file.to_path_buf(),
        model,
        dataset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(text: &str) -> toml::Value {
        toml::Value::Table(text.parse().unwrap())
    }

    #[test]
    fn preset_with_overrides_and_named_errors() {
        let m = model_from_toml(section("preset = \"tiny\"\ndim = 128")).unwrap();
        assert_eq!(m.dim, 128);
        assert_eq!(m.n_layers, ModelConfig::tiny().n_layers);
        // The resolved form (every field written out) reads back to the same config.
        let resolved = toml::Value::try_from(m.resolved()).unwrap();
        assert_eq!(model_from_toml(resolved).unwrap(), m.resolved());
        let e = model_from_toml(section("preset = \"huge\"")).unwrap_err();
        assert!(e.to_string().contains("huge"), "{e}");
        let e = model_from_toml(section("preset = \"tiny\"\ndimm = 3")).unwrap_err();
        assert!(
            e.to_string().contains("[model]") && e.to_string().contains("dimm"),
            "{e}"
        );
        let e = model_from_toml(section("preset = 3")).unwrap_err();
        assert!(e.to_string().contains("preset must be a string"), "{e}");
    }

    #[test]
    fn run_config_file_model_and_dataset() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.toml");
        std::fs::write(
            &p,
            "[model]\npreset = \"tiny\"\n[data]\ndataset = \"data/x\"\n[train]\nsteps = 1\n",
        )
        .unwrap();
        let r = read_run_model(&p).unwrap();
        assert_eq!(r.model, ModelConfig::tiny());
        assert_eq!(r.dataset, Some(PathBuf::from("data/x")));
        std::fs::write(&p, "[data]\ndataset = \"d\"\n").unwrap();
        let e = read_run_model(&p).unwrap_err().to_string();
        assert!(e.contains("config.toml") && e.contains("[model]"), "{e}");
        std::fs::write(&p, "[model]\npreset = \"tiny\"\nn_heads = 7\n").unwrap();
        let e = read_run_model(&p).unwrap_err().to_string();
        assert!(e.contains("config.toml"), "{e}");
    }
}
