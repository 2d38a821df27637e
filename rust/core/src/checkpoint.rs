//! A checkpoint: one safetensors file, or a directory of shards with or without
//! `model.safetensors.index.json`, plus `config.json` when present.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::shard::{Shard, TensorEntry};

pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const CONFIG_FILE: &str = "config.json";

#[derive(Debug)]
pub struct Checkpoint {
    path: PathBuf,
    shards: Vec<Arc<Shard>>,
    /// name -> (shard, position in that shard's tensor list)
    index: HashMap<String, (usize, usize)>,
    config: Option<serde_json::Value>,
    /// Opened as one file of a sharded checkpoint: the tensors its directory's index
    /// places in the other files, by name (empty otherwise).
    elsewhere: BTreeMap<String, String>,
}

#[derive(serde::Deserialize)]
struct IndexFile {
    weight_map: BTreeMap<String, String>,
}

impl Checkpoint {
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, "open", e))?;
        let (shard_paths, expected, config_path, elsewhere) = if meta.is_dir() {
            let (shards, expected) = shard_paths_of_dir(path)?;
            (shards, expected, path.join(CONFIG_FILE), BTreeMap::new())
        } else {
            let dir = path.parent().unwrap_or(Path::new("."));
            let elsewhere = stored_beside(path, dir);
            (
                vec![path.to_path_buf()],
                None,
                dir.join(CONFIG_FILE),
                elsewhere,
            )
        };
        let shards = shard_paths
            .iter()
            .map(|p| Shard::open(p).map(Arc::new))
            .collect::<Result<Vec<_>>>()?;

        let mut index = HashMap::new();
        for (s, shard) in shards.iter().enumerate() {
            for (t, (name, _)) in shard.tensors().iter().enumerate() {
                if let Some((other, _)) = index.insert(name.clone(), (s, t)) {
                    return Err(Error::Checkpoint {
                        path: path.to_path_buf(),
                        reason: format!(
                            "tensor `{name}` is stored twice, in {} and in {}",
                            shards[other].path().display(),
                            shard.path().display()
                        ),
                    });
                }
            }
        }
        if let Some(expected) = expected {
            check_index_matches(path, &expected, &index, &shards)?;
        }
        let config = read_config(&config_path)?;
        Ok(Checkpoint {
            path: path.to_path_buf(),
            shards,
            index,
            config,
            elsewhere,
        })
    }

    /// The path the checkpoint was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn shards(&self) -> &[Arc<Shard>] {
        &self.shards
    }

    /// Tensors in file order, shard by shard.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &TensorEntry)> {
        self.shards
            .iter()
            .flat_map(|s| s.tensors().iter().map(|(n, e)| (n.as_str(), e)))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The shard index and location of a tensor.
    pub fn tensor(&self, name: &str) -> Result<(usize, &TensorEntry)> {
        let &(s, t) = self.index.get(name).ok_or_else(|| Error::TensorNotFound {
            path: self.path.clone(),
            name: name.to_string(),
        })?;
        Ok((s, &self.shards[s].tensors()[t].1))
    }

    pub fn config(&self) -> Option<&serde_json::Value> {
        self.config.as_ref()
    }

    /// `model_type` from `config.json`, also where it sits under `text_config`.
    pub fn model_type(&self) -> Option<&str> {
        let config = self.config.as_ref()?;
        config
            .get("model_type")
            .or_else(|| config.get("text_config")?.get("model_type"))
            .and_then(|v| v.as_str())
    }

    /// What the first shard that records `key` in its `__metadata__` says.
    pub fn recorded(&self, key: &str) -> Option<(&str, &Path)> {
        self.shards
            .iter()
            .find_map(|s| Some((s.metadata().get(key)?.as_str(), s.path())))
    }

    /// The other files of its checkpoint that hold tensors under `prefix.`, where this is
    /// one file of a sharded checkpoint (its directory's index says so); empty otherwise.
    pub fn shards_elsewhere(&self, prefix: &str) -> BTreeSet<&str> {
        let inside = format!("{prefix}.");
        self.elsewhere
            .range(inside.clone()..)
            .take_while(|(name, _)| name.starts_with(&inside))
            .map(|(_, file)| file.as_str())
            .collect()
    }

    /// Fails if any of the given shards changed on disk since open.
    pub fn check_intact(&self, shards: impl IntoIterator<Item = usize>) -> Result<()> {
        shards
            .into_iter()
            .try_for_each(|s| self.shards[s].check_intact())
    }
}

type ShardList = (Vec<PathBuf>, Option<BTreeMap<String, String>>);

/// The tensors that the index beside `file` places in other files, where that index lists
/// `file` as one of its shards: opened alone, such a file holds part of a checkpoint. An
/// index that cannot be read says nothing about `file`, which opens as the file it is.
fn stored_beside(file: &Path, dir: &Path) -> BTreeMap<String, String> {
    let Some(name) = file.file_name().and_then(|n| n.to_str()) else {
        return BTreeMap::new();
    };
    let index = std::fs::read(dir.join(INDEX_FILE))
        .ok()
        .and_then(|text| serde_json::from_slice::<IndexFile>(&text).ok());
    match index {
        Some(index) if index.weight_map.values().any(|f| f == name) => index
            .weight_map
            .into_iter()
            .filter(|(_, f)| f != name)
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// The shards of a directory: those the index names, else every `*.safetensors` file.
fn shard_paths_of_dir(dir: &Path) -> Result<ShardList> {
    let index_path = dir.join(INDEX_FILE);
    if index_path.exists() {
        let text = std::fs::read(&index_path).map_err(|e| Error::io(&index_path, "read", e))?;
        let index: IndexFile = serde_json::from_slice(&text).map_err(|e| Error::Checkpoint {
            path: index_path.clone(),
            reason: format!("not a safetensors index ({e})"),
        })?;
        let mut files = BTreeSet::new();
        for (tensor, file) in &index.weight_map {
            let relative = Path::new(file);
            let plain = relative
                .components()
                .all(|c| matches!(c, Component::Normal(_)));
            if !plain {
                return Err(Error::Checkpoint {
                    path: index_path,
                    reason: format!("tensor `{tensor}` points to `{file}`, outside the checkpoint"),
                });
            }
            if files.insert(file.as_str()) && !dir.join(relative).is_file() {
                return Err(Error::Checkpoint {
                    path: index_path,
                    reason: format!(
                        "shard `{file}` (holding `{tensor}`) is missing from {}",
                        dir.display()
                    ),
                });
            }
        }
        if files.is_empty() {
            return Err(Error::Checkpoint {
                path: index_path,
                reason: "the index names no tensors".into(),
            });
        }
        let paths = files.into_iter().map(|f| dir.join(f)).collect();
        return Ok((paths, Some(index.weight_map)));
    }
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, "list", e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors") && p.is_file())
        .collect();
    if paths.is_empty() {
        return Err(Error::Checkpoint {
            path: dir.to_path_buf(),
            reason: format!("no {INDEX_FILE} and no *.safetensors file"),
        });
    }
    paths.sort();
    Ok((paths, None))
}

fn check_index_matches(
    path: &Path,
    expected: &BTreeMap<String, String>,
    index: &HashMap<String, (usize, usize)>,
    shards: &[Arc<Shard>],
) -> Result<()> {
    for (tensor, file) in expected {
        let found = index.get(tensor).map(|&(s, _)| shards[s].path());
        if found != Some(&path.join(file)) {
            return Err(Error::Checkpoint {
                path: path.join(INDEX_FILE),
                reason: match found {
                    None => {
                        format!("tensor `{tensor}` is listed in `{file}`, which does not hold it")
                    }
                    Some(other) => format!(
                        "tensor `{tensor}` is listed in `{file}` but stored in {}",
                        other.display()
                    ),
                },
            });
        }
    }
    Ok(())
}

fn read_config(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read(path).map_err(|e| Error::io(path, "read", e))?;
    let value: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| Error::Checkpoint {
            path: path.to_path_buf(),
            reason: format!("not valid JSON ({e})"),
        })?;
    if !value.is_object() {
        return Err(Error::Checkpoint {
            path: path.to_path_buf(),
            reason: "not a JSON object".into(),
        });
    }
    Ok(Some(value))
}
