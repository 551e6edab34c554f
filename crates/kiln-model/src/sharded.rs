//! Sharded tensor files: each rank of a distributed run writes the pieces of the tensors it
//! holds (`"{name}@{start}"`: elements `start..start + len` of the flattened tensor) into its
//! own safetensors file, and a manifest (`shards.json`) lists the tensors' shapes and the
//! files. Reading assembles every tensor whole from the pieces, whatever the number of ranks
//! that wrote them, so a checkpoint of N ranks loads onto M ranks (or one process) and is a
//! model like any other for generate, eval and export.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::ModelError;

pub const SHARD_MANIFEST: &str = "shards.json";
pub const SHARD_FORMAT: &str = "kiln-sharded/1";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShardManifest {
    pub format: String,
    pub world_size: usize,
    /// The strategy that wrote it ("ddp", "zero1", "fsdp"), for information.
    pub strategy: String,
    /// Every tensor of the model and its shape.
    pub tensors: BTreeMap<String, Vec<usize>>,
    /// Per prefix ("model", "optimizer"): the files, one per rank.
    pub files: BTreeMap<String, Vec<String>>,
}

impl ShardManifest {
    pub fn file_name(prefix: &str, rank: usize, world: usize) -> String {
        format!("{prefix}-{rank:05}-of-{world:05}.safetensors")
    }

    /// The manifest of `tensors` written by `world` ranks, each into one file per prefix
    /// ([`ShardManifest::file_name`]).
    pub fn per_rank(
        world: usize,
        strategy: &str,
        tensors: impl IntoIterator<Item = (String, Vec<usize>)>,
        prefixes: &[&str],
    ) -> Self {
        let files = prefixes
            .iter()
            .map(|p| {
                let names = (0..world).map(|r| Self::file_name(p, r, world)).collect();
                (p.to_string(), names)
            })
            .collect();
        Self {
            format: SHARD_FORMAT.into(),
            world_size: world,
            strategy: strategy.into(),
            tensors: tensors.into_iter().collect(),
            files,
        }
    }
}

/// One piece of a tensor: elements `start..start + values.len()` of `name` (flattened).
pub fn piece_key(name: &str, start: usize) -> String {
    format!("{name}@{start}")
}

/// Writes `pieces` (`(key, 1-D tensor)`, see [`piece_key`]) to `path`.
pub fn write_pieces(path: &Path, pieces: Vec<(String, Tensor)>) -> Result<(), ModelError> {
    let map: HashMap<String, Tensor> = pieces.into_iter().collect();
    candle_core::safetensors::save(&map, path).map_err(|e| ModelError::Weights {
        path: path.display().to_string(),
        msg: e.to_string(),
    })
}

pub fn read_manifest(dir: &Path) -> Result<ShardManifest, ModelError> {
    let path = dir.join(SHARD_MANIFEST);
    let err = |msg: String| ModelError::Weights {
        path: path.display().to_string(),
        msg,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| err(e.to_string()))?;
    let m: ShardManifest = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    if m.format != SHARD_FORMAT {
        return Err(err(format!(
            "format {:?}, this kiln reads {SHARD_FORMAT:?}",
            m.format
        )));
    }
    Ok(m)
}

/// Assembles the tensors of `prefix` ("model", or "optimizer" whose keys are `m.NAME` /
/// `v.NAME`) from every rank's file: each element must come from exactly one piece.
pub fn read_sharded(
    dir: &Path,
    manifest: &ShardManifest,
    prefix: &str,
    device: &Device,
) -> Result<HashMap<String, Tensor>, ModelError> {
    let files = manifest
        .files
        .get(prefix)
        .ok_or_else(|| ModelError::Weights {
            path: dir.join(SHARD_MANIFEST).display().to_string(),
            msg: format!("no {prefix:?} files listed"),
        })?;
    let mut whole: BTreeMap<String, (Vec<usize>, Vec<f32>, usize)> = BTreeMap::new();
    for file in files {
        let path = dir.join(file);
        let bad = |msg: String| ModelError::Weights {
            path: path.display().to_string(),
            msg,
        };
        let pieces =
            candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| bad(e.to_string()))?;
        for (key, piece) in pieces {
            let (name, start) = key
                .rsplit_once('@')
                .and_then(|(n, s)| Some((n, s.parse::<usize>().ok()?)))
                .ok_or_else(|| bad(format!("{key:?} is not NAME@START")))?;
            let base = name
                .strip_prefix("m.")
                .or_else(|| name.strip_prefix("v."))
                .filter(|_| prefix != "model")
                .unwrap_or(name);
            let shape = manifest
                .tensors
                .get(base)
                .ok_or_else(|| bad(format!("piece of {base:?}, which the manifest lacks")))?;
            let numel: usize = shape.iter().product();
            let values = piece
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            if start + values.len() > numel {
                return Err(bad(format!(
                    "{key:?}: {} elements from {start} overrun the tensor's {numel}",
                    values.len()
                )));
            }
            let entry = whole
                .entry(name.to_string())
                .or_insert_with(|| (shape.clone(), vec![0.0; numel], 0));
            entry.1[start..start + values.len()].copy_from_slice(&values);
            entry.2 += values.len();
        }
    }
    let mut out = HashMap::new();
    for (name, (shape, values, covered)) in whole {
        if covered != values.len() {
            return Err(ModelError::Weights {
                path: dir.display().to_string(),
                msg: format!(
                    "{prefix} shards hold {covered} of the {} elements of {name:?}",
                    values.len()
                ),
            });
        }
        out.insert(name, Tensor::from_vec(values, shape, device)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(world: usize) -> ShardManifest {
        ShardManifest {
            format: SHARD_FORMAT.into(),
            world_size: world,
            strategy: "fsdp".into(),
            tensors: [("w".to_string(), vec![2, 3]), ("b".to_string(), vec![3])]
                .into_iter()
                .collect(),
            files: [(
                "model".to_string(),
                (0..world)
                    .map(|r| ShardManifest::file_name("model", r, world))
                    .collect(),
            )]
            .into_iter()
            .collect(),
        }
    }

    fn piece(values: &[f32]) -> Tensor {
        Tensor::new(values, &Device::Cpu).unwrap()
    }

    #[test]
    fn pieces_of_two_ranks_assemble_whole_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let m = manifest(2);
        // w = 0..6 split 4 / 2, b whole on rank 1.
        write_pieces(
            &dir.path().join(&m.files["model"][0]),
            vec![(piece_key("w", 0), piece(&[0., 1., 2., 3.]))],
        )
        .unwrap();
        write_pieces(
            &dir.path().join(&m.files["model"][1]),
            vec![
                (piece_key("w", 4), piece(&[4., 5.])),
                (piece_key("b", 0), piece(&[7., 8., 9.])),
            ],
        )
        .unwrap();
        let t = read_sharded(dir.path(), &m, "model", &Device::Cpu).unwrap();
        assert_eq!(
            t["w"].to_vec2::<f32>().unwrap(),
            vec![vec![0., 1., 2.], vec![3., 4., 5.]]
        );
        assert_eq!(t["b"].to_vec1::<f32>().unwrap(), vec![7., 8., 9.]);
    }

    #[test]
    fn a_missing_piece_or_a_foreign_tensor_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let m = manifest(1);
        let file = dir.path().join(&m.files["model"][0]);
        write_pieces(&file, vec![(piece_key("w", 0), piece(&[0., 1., 2., 3.]))]).unwrap();
        let e = read_sharded(dir.path(), &m, "model", &Device::Cpu).unwrap_err();
        assert!(
            e.to_string().contains("hold 4 of the 6 elements of \"w\""),
            "{e}"
        );
        write_pieces(&file, vec![(piece_key("z", 0), piece(&[0.]))]).unwrap();
        let e = read_sharded(dir.path(), &m, "model", &Device::Cpu).unwrap_err();
        assert!(e.to_string().contains("which the manifest lacks"), "{e}");
        write_pieces(&file, vec![(piece_key("b", 2), piece(&[0., 1.]))]).unwrap();
        let e = read_sharded(dir.path(), &m, "model", &Device::Cpu).unwrap_err();
        assert!(e.to_string().contains("overrun"), "{e}");
    }
}
