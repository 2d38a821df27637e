//! `State`: what an open checkpoint owns, shared by the `Checkpoint` handle and every plan
//! made from it. Its own module so that `checkpoint` and `plan` both depend on it and not on
//! each other.

use std::sync::OnceLock;

use fastmoe_load_core::{detect_groups, Checkpoint, Detected, Executor, MoeLayer};
use pyo3::prelude::*;

use crate::errors::{to_py, TensorNotFoundError};

/// Everything an open checkpoint owns; shared with the plans made from it, so a plan stays
/// usable (and its files mapped) after `close()`.
pub struct State {
    pub ckpt: Checkpoint,
    pub executor: Executor,
    interleaved: Option<bool>,
    detected: OnceLock<Detected>,
}

impl State {
    pub fn new(ckpt: Checkpoint, executor: Executor, interleaved: Option<bool>) -> Self {
        State {
            ckpt,
            executor,
            interleaved,
            detected: OnceLock::new(),
        }
    }

    /// The routed-expert groups, those that load and those that cannot, detected on first
    /// use.
    pub fn detected(&self) -> PyResult<&Detected> {
        if let Some(detected) = self.detected.get() {
            return Ok(detected);
        }
        let detected = detect_groups(&self.ckpt, self.interleaved).map_err(to_py)?;
        Ok(self.detected.get_or_init(|| detected))
    }

    /// The routed-expert groups that load.
    pub fn layers(&self) -> PyResult<&[MoeLayer]> {
        Ok(&self.detected()?.layers)
    }

    /// The group at `prefix`; for a group that cannot be loaded, the `LayoutError` saying why.
    pub fn layer(&self, prefix: &str) -> PyResult<&MoeLayer> {
        let detected = self.detected()?;
        if let Some(error) = detected.error(&self.ckpt, prefix) {
            return Err(to_py(error));
        }
        let layers = &detected.layers;
        layers.iter().find(|l| l.prefix == prefix).ok_or_else(|| {
            let known: Vec<&str> = layers.iter().map(|l| l.prefix.as_str()).take(4).collect();
            TensorNotFoundError::new_err(format!(
                "{}: no routed-expert group at `{prefix}` (the checkpoint has {} groups{}{})",
                self.ckpt.path().display(),
                layers.len(),
                if known.is_empty() { "" } else { ", e.g. " },
                known.join(", ")
            ))
        })
    }
}
