//! The Python exception tree. Every error of the core maps to exactly one class, all
//! rooted at `FastMoeLoadError` (a `ValueError`).

use fastmoe_load_core::Error;
use pyo3::create_exception;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

create_exception!(
    fastmoe_load,
    FastMoeLoadError,
    PyValueError,
    "Base class of every error fastmoe_load raises."
);
create_exception!(
    fastmoe_load,
    HeaderError,
    FastMoeLoadError,
    "A safetensors file is corrupt or truncated."
);
create_exception!(
    fastmoe_load,
    CheckpointError,
    FastMoeLoadError,
    "A checkpoint is unreadable or inconsistent: missing shard, bad index or config, I/O failure."
);
create_exception!(
    fastmoe_load,
    TensorNotFoundError,
    FastMoeLoadError,
    "A tensor or expert group that the checkpoint does not hold."
);
create_exception!(
    fastmoe_load,
    LayoutError,
    FastMoeLoadError,
    "Routed-expert tensors that do not form a layout fastmoe_load reads."
);
create_exception!(
    fastmoe_load,
    RequestError,
    FastMoeLoadError,
    "A load request that does not fit the checkpoint: shapes, dtypes, ranks, expert ids."
);
create_exception!(
    fastmoe_load,
    FileChangedError,
    FastMoeLoadError,
    "A shard was truncated, replaced or rewritten after the checkpoint was opened."
);

pub fn to_py(error: Error) -> PyErr {
    let message = error.to_string();
    match error {
        Error::Io { .. } | Error::Checkpoint { .. } => CheckpointError::new_err(message),
        Error::Header { .. } => HeaderError::new_err(message),
        Error::TensorNotFound { .. } => TensorNotFoundError::new_err(message),
        Error::Layout { .. } => LayoutError::new_err(message),
        Error::Request { .. } => RequestError::new_err(message),
        Error::FileChanged { .. } => FileChangedError::new_err(message),
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("FastMoeLoadError", py.get_type::<FastMoeLoadError>())?;
    m.add("HeaderError", py.get_type::<HeaderError>())?;
    m.add("CheckpointError", py.get_type::<CheckpointError>())?;
    m.add("TensorNotFoundError", py.get_type::<TensorNotFoundError>())?;
    m.add("LayoutError", py.get_type::<LayoutError>())?;
    m.add("RequestError", py.get_type::<RequestError>())?;
    m.add("FileChangedError", py.get_type::<FileChangedError>())?;
    Ok(())
}
