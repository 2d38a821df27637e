//! Checks and lookups shared by the group finders.

use safetensors::tensor::Dtype;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::shard::{elem_bytes, TensorEntry};

pub(super) fn layout_error(ckpt: &Checkpoint, prefix: &str, reason: String) -> Error {
    Error::Layout {
        path: ckpt.path().to_path_buf(),
        prefix: prefix.to_string(),
        reason,
    }
}

pub(super) fn entry<'c>(ckpt: &'c Checkpoint, name: &str) -> Option<&'c TensorEntry> {
    ckpt.tensor(name).ok().map(|(_, e)| e)
}

/// All entries (at least one) must share one dtype, and it must be sliceable per element.
pub(super) fn same_dtype(
    ckpt: &Checkpoint,
    prefix: &str,
    entries: &[(&str, &TensorEntry)],
) -> Result<Dtype> {
    let (first_name, first) = (entries[0].0, entries[0].1.dtype);
    if let Some((name, other)) = entries.iter().find(|(_, e)| e.dtype != first) {
        return Err(layout_error(
            ckpt,
            prefix,
            format!(
                "mixes dtypes: `{first_name}` is {first}, `{name}` is {}",
                other.dtype
            ),
        ));
    }
    if elem_bytes(first).is_none() {
        return Err(layout_error(
            ckpt,
            prefix,
            format!("dtype {first} packs several values per byte and cannot be sliced per element"),
        ));
    }
    Ok(first)
}
