//! `Checkpoint`: an open checkpoint with its copy threads; `ShardBuffer`: one shard's mapping
//! exported through the buffer protocol, so torch views keep it alive; `MoeLayerInfo`.

use std::ffi::c_int;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use fastmoe_load_core::quant::{companion_kind, Grid, QuantConfig};
use fastmoe_load_core::{
    unsupported_groups, Checkpoint, CopyPlan, Executor, LoadRequest, MatrixView, MoeLayer, Part,
    ReadMode, Shard, Target,
};
use pyo3::exceptions::PyValueError;
use pyo3::ffi;
use pyo3::prelude::*;

use crate::errors::{to_py, CheckpointError, RequestError};
use crate::plan::PyCopyPlan;
use crate::state::State;

/// Copy threads used when the caller does not choose: beyond 16, threads mostly contend for
/// memory bandwidth.
const MAX_DEFAULT_THREADS: usize = 16;

#[pyclass(name = "Checkpoint", module = "fastmoe_load._fastmoe_load", frozen)]
pub struct PyCheckpoint {
    path: PathBuf,
    state: RwLock<Option<Arc<State>>>,
}

impl PyCheckpoint {
    fn state(&self) -> PyResult<Arc<State>> {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        state.clone().ok_or_else(|| {
            CheckpointError::new_err(format!("{}: the checkpoint is closed", self.path.display()))
        })
    }
}

fn part(name: &str) -> PyResult<Part> {
    Ok(match name {
        "w1" => Part::Gate,
        "w3" => Part::Up,
        "w2" => Part::Down,
        "b1" => Part::GateBias,
        "b3" => Part::UpBias,
        "b2" => Part::DownBias,
        other => {
            return Err(PyValueError::new_err(format!(
                "unknown expert matrix `{other}`"
            )))
        }
    })
}

/// A destination by its vLLM name: `w13`, `w2`, their biases, or `w13_{kind}`/`w2_{kind}`
/// for a companion kind (`w13_weight_scale_inv`, ...).
fn target(name: &str) -> PyResult<Target> {
    let companion = |kind: &str| companion_kind(kind).map(|k| k.name);
    Ok(match name {
        "w13" => Target::W13,
        "w2" => Target::W2,
        "w13_bias" => Target::W13Bias,
        "w2_bias" => Target::W2Bias,
        other => match (other.strip_prefix("w13_"), other.strip_prefix("w2_")) {
            (Some(kind), _) if companion(kind).is_some() => {
                Target::W13Companion(companion(kind).unwrap_or_default())
            }
            (_, Some(kind)) if companion(kind).is_some() => {
                Target::W2Companion(companion(kind).unwrap_or_default())
            }
            _ => {
                return Err(PyValueError::new_err(format!(
                    "unknown destination `{other}`"
                )))
            }
        },
    })
}

#[pymethods]
impl PyCheckpoint {
    #[new]
    #[pyo3(signature = (path, *, num_threads=None, interleaved=None, io="mmap", prefetch=false))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        num_threads: Option<usize>,
        interleaved: Option<bool>,
        io: &str,
        prefetch: bool,
    ) -> PyResult<Self> {
        let mode = match io {
            "pread" => ReadMode::Read,
            "mmap" => ReadMode::Map,
            other => {
                return Err(PyValueError::new_err(format!(
                    "io must be 'pread' or 'mmap', not {other:?}"
                )))
            }
        };
        let ckpt = py.detach(|| Checkpoint::open(&path)).map_err(to_py)?;
        let threads = num_threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(1, usize::from)
                .min(MAX_DEFAULT_THREADS)
        });
        let executor = Executor::new(threads, mode).with_prefetch(prefetch);
        let state = State::new(ckpt, executor, interleaved);
        Ok(PyCheckpoint {
            path,
            state: RwLock::new(Some(Arc::new(state))),
        })
    }

    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    #[getter]
    fn closed(&self) -> bool {
        self.state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
    }

    #[getter]
    fn num_threads(&self) -> PyResult<usize> {
        Ok(self.state()?.executor.threads())
    }

    #[getter]
    fn prefetch(&self) -> PyResult<bool> {
        Ok(self.state()?.executor.prefetch())
    }

    #[getter]
    fn io(&self) -> PyResult<&'static str> {
        Ok(match self.state()?.executor.mode() {
            ReadMode::Read => "pread",
            ReadMode::Map => "mmap",
        })
    }

    /// Drops this handle's hold on the files; views and plans made from it stay valid.
    fn close(&self) {
        self.state.write().unwrap_or_else(|p| p.into_inner()).take();
    }

    fn keys(&self) -> PyResult<Vec<String>> {
        Ok(self
            .state()?
            .ckpt
            .entries()
            .map(|(n, _)| n.to_string())
            .collect())
    }

    fn __contains__(&self, name: &str) -> PyResult<bool> {
        Ok(self.state()?.ckpt.contains(name))
    }

    /// `(shard index, dtype, shape, start, end)`: the tensor's bytes are `[start, end)` of
    /// the shard file.
    fn tensor_info(&self, name: &str) -> PyResult<(usize, String, Vec<usize>, usize, usize)> {
        let state = self.state()?;
        let (shard, entry) = state.ckpt.tensor(name).map_err(to_py)?;
        // A view of a file truncated since open would raise SIGBUS when read.
        state.ckpt.check_intact([shard]).map_err(to_py)?;
        Ok((
            shard,
            entry.dtype.to_string(),
            entry.shape.clone(),
            entry.start,
            entry.end,
        ))
    }

    fn shard(&self, index: usize) -> PyResult<ShardBuffer> {
        let state = self.state()?;
        let shard = state
            .ckpt
            .shards()
            .get(index)
            .ok_or_else(|| PyValueError::new_err(format!("shard {index} out of range")))?;
        Ok(ShardBuffer {
            shard: shard.clone(),
        })
    }

    fn shard_paths(&self) -> PyResult<Vec<PathBuf>> {
        Ok(self
            .state()?
            .ckpt
            .shards()
            .iter()
            .map(|s| s.path().to_path_buf())
            .collect())
    }

    /// `model_type` from `config.json` (also under `text_config`), if there is one.
    #[getter]
    fn model_type(&self) -> PyResult<Option<String>> {
        Ok(self.state()?.ckpt.model_type().map(String::from))
    }

    /// `config.json` as text, if the checkpoint has one.
    fn config_json(&self) -> PyResult<Option<String>> {
        Ok(self.state()?.ckpt.config().map(|c| c.to_string()))
    }

    fn moe_layers(&self) -> PyResult<Vec<MoeLayerInfo>> {
        Ok(self
            .state()?
            .layers()?
            .iter()
            .map(MoeLayerInfo::from)
            .collect())
    }

    /// Groups that look like routed experts but cannot be loaded:
    /// `[(prefix, tensor names, reason)]`.
    fn unsupported_groups(&self) -> PyResult<Vec<(String, Vec<String>, String)>> {
        let state = self.state()?;
        Ok(unsupported_groups(&state.ckpt, state.detected()?)
            .into_iter()
            .map(|g| (g.prefix, g.tensors, g.reason))
            .collect())
    }

    /// The quantization scheme `config.json` declares, by name, where fastmoe_load does not
    /// load it (`mxfp4`, `modelopt NVFP4`, ...).
    #[getter]
    fn unsupported_quantization(&self) -> PyResult<Option<String>> {
        Ok(QuantConfig::unsupported(self.state()?.ckpt.config()))
    }

    fn layer(&self, prefix: &str) -> PyResult<MoeLayerInfo> {
        Ok(MoeLayerInfo::from(self.state()?.layer(prefix)?))
    }

    /// Where one matrix of one expert lies, or with `kind`, that matrix's companion (its
    /// scales): `(tensor, offset, rows, cols, row_stride, col_stride)`, in elements of the
    /// tensor.
    #[pyo3(signature = (prefix, name, expert, kind=None))]
    fn matrix(
        &self,
        prefix: &str,
        name: &str,
        expert: usize,
        kind: Option<&str>,
    ) -> PyResult<(String, usize, usize, usize, usize, usize)> {
        let state = self.state()?;
        let layer = state.layer(prefix)?;
        let part = part(name)?;
        let m = match kind {
            None => layer.matrix(part, expert),
            Some(kind) => layer.companion_matrix(kind, part, expert),
        };
        let m = m.ok_or_else(|| {
            let what = kind.map_or_else(|| format!("`{name}`"), |k| format!("`{k}` of `{name}`"));
            RequestError::new_err(format!(
                "{}: experts at `{prefix}`: no {what} for expert {expert} (the layer has {} experts{}{})",
                self.path.display(),
                layer.num_experts,
                if layer.has_bias() { "" } else { ", no biases" },
                match &layer.quantization {
                    None => ", no scales".to_string(),
                    Some(q) => format!(
                        ", companions {}",
                        q.companions.iter().map(|c| c.kind.name).collect::<Vec<_>>().join(", ")
                    ),
                }
            ))
        })?;
        Ok((
            m.tensor,
            m.offset,
            m.rows,
            m.cols,
            m.row_stride,
            m.col_stride,
        ))
    }

    /// The plan that copies tensor `name` whole, or its `rank`-th of `size` equal slices
    /// along `dim`.
    #[pyo3(signature = (name, *, dim=None, rank=0, size=1))]
    fn tensor_plan(
        &self,
        name: &str,
        dim: Option<usize>,
        rank: usize,
        size: usize,
    ) -> PyResult<PyCopyPlan> {
        let state = self.state()?;
        let plan =
            CopyPlan::tensor(&state.ckpt, name, dim.map(|d| (d, rank, size))).map_err(to_py)?;
        Ok(PyCopyPlan::new(plan, state.clone()))
    }

    /// The plan that copies `rows` runs of `cols` contiguous elements of tensor `name`, the
    /// first at element `offset` and each `row_stride` elements after the one before, packed:
    /// a strided view such as a weight loader's narrowing selects.
    #[pyo3(signature = (name, *, offset, rows, cols, row_stride))]
    fn view_plan(
        &self,
        name: &str,
        offset: usize,
        rows: usize,
        cols: usize,
        row_stride: usize,
    ) -> PyResult<PyCopyPlan> {
        let state = self.state()?;
        let view = MatrixView {
            tensor: name.to_string(),
            offset,
            rows,
            cols,
            row_stride,
            col_stride: 1,
        };
        let plan = CopyPlan::view(&state.ckpt, &view).map_err(to_py)?;
        Ok(PyCopyPlan::new(plan, state.clone()))
    }

    /// The plan that fills destination `target` for one TP rank and list of experts; with
    /// `stored_order`, the same bytes in the order a transposed group stores them (see
    /// `CopyPlan::stored_order`); with `interleaved`, gate and up interleaved in the w13
    /// targets (see `CopyPlan::interleaved`); with `k_first`, each expert's destination
    /// transposed, input-first (see `CopyPlan::k_first`); with `shard = (first, len)`, the
    /// rank's rows of the intermediate dimension where they are not the even split (see
    /// `LoadRequest::shard`).
    #[pyo3(signature = (
        prefix, target_name, *, tp_rank, tp_size, experts, stored_order=false, interleaved=false,
        k_first=false, shard=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn plan(
        &self,
        py: Python<'_>,
        prefix: &str,
        target_name: &str,
        tp_rank: usize,
        tp_size: usize,
        experts: Vec<usize>,
        stored_order: bool,
        interleaved: bool,
        k_first: bool,
        shard: Option<(usize, usize)>,
    ) -> PyResult<PyCopyPlan> {
        let state = self.state()?;
        let layer = state.layer(prefix)?;
        let target = target(target_name)?;
        let request = LoadRequest {
            tp_rank,
            tp_size,
            experts: &experts,
            shard,
        };
        let build = match (stored_order, interleaved, k_first) {
            (true, false, false) => CopyPlan::stored_order,
            (false, true, false) => CopyPlan::interleaved,
            (false, false, true) => CopyPlan::k_first,
            (false, false, false) => CopyPlan::new,
            _ => {
                return Err(PyValueError::new_err(
                    "a plan is in stored order, interleaved or input-first: one of them",
                ))
            }
        };
        let plan = py
            .detach(|| build(&state.ckpt, layer, target, &request))
            .map_err(to_py)?;
        Ok(PyCopyPlan::new(plan, state.clone()))
    }
}

/// One shard's private mapping, exported as a writable buffer: writes land in this
/// process's copy-on-write pages, never in the file.
#[pyclass(module = "fastmoe_load._fastmoe_load", frozen)]
pub struct ShardBuffer {
    shard: Arc<Shard>,
}

#[pymethods]
impl ShardBuffer {
    fn __len__(&self) -> usize {
        self.shard.len()
    }

    #[getter]
    fn path(&self) -> PathBuf {
        self.shard.path().to_path_buf()
    }

    /// # Safety
    /// Called by the interpreter with a valid `view` to fill.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let shard = &slf.get().shard;
        let (ptr, len) = (shard.view_ptr().map_err(to_py)?, shard.len());
        let len = isize::try_from(len).map_err(|_| PyValueError::new_err("shard too large"))?;
        // SAFETY: the mapping is `len` bytes, writable (private) and lives as long as this
        // object, which the buffer view references until it is released.
        let rc = unsafe { ffi::PyBuffer_FillInfo(view, slf.as_ptr(), ptr.cast(), len, 0, flags) };
        if rc == -1 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }
}

#[pyclass(module = "fastmoe_load._fastmoe_load", frozen, get_all)]
pub struct MoeLayerInfo {
    prefix: String,
    format: &'static str,
    num_experts: usize,
    hidden_size: usize,
    intermediate_size: usize,
    dtype: String,
    bias_dtype: Option<String>,
    tensor_names: Vec<String>,
    /// `quant_method`, or None for unquantized experts.
    quant_method: Option<String>,
    /// Values per stored weight element along the input dimension (2 for NVFP4).
    pack: usize,
    /// Values per stored weight element along the output dimension (AWQ's 8), else 1.
    out_pack: usize,
    /// Weights and block companions stored input-first, `[in, out]` (GPTQ, AWQ).
    k_first: bool,
    /// Tensors of the group that no destination takes (GPTQ's `g_idx`).
    discarded: Vec<String>,
    companions: Vec<CompanionInfo>,
}

/// One kind of companion tensor of a quantized group.
#[pyclass(module = "fastmoe_load._fastmoe_load", frozen, get_all)]
#[derive(Clone)]
pub struct CompanionInfo {
    /// `weight_scale_inv`, `weight_scale`, `input_scale`, `weight_scale_2`, `weight_shape` or
    /// `weight_zero_point`.
    kind: &'static str,
    /// `block`, `group`, `channel`, `tensor` or `whole`.
    scheme: &'static str,
    /// `(rows, cols)` of weight entries per value, for block and group scales; `(1, n)` for
    /// `n` values describing the whole matrix.
    block: Option<(usize, usize)>,
    dtype: String,
    /// vLLM keeps one value per expert for gate and up together.
    merged_w13: bool,
    /// The suffix transformers gives the fused form after `gate_up_proj`/`down_proj`
    /// (`_scale_inv`), if it has one.
    fused_suffix: Option<&'static str>,
}

impl From<&MoeLayer> for MoeLayerInfo {
    fn from(layer: &MoeLayer) -> Self {
        MoeLayerInfo {
            prefix: layer.prefix.clone(),
            format: layer.format(),
            num_experts: layer.num_experts,
            hidden_size: layer.hidden_size,
            intermediate_size: layer.intermediate_size,
            dtype: layer.dtype.to_string(),
            bias_dtype: layer.bias_dtype.map(|d| d.to_string()),
            tensor_names: layer.tensor_names().into_iter().map(String::from).collect(),
            quant_method: layer.quantization.as_ref().map(|q| q.method.clone()),
            pack: layer.pack,
            out_pack: layer.out_pack(),
            k_first: layer.k_first(),
            discarded: layer.discarded().to_vec(),
            companions: layer
                .quantization
                .iter()
                .flat_map(|q| &q.companions)
                .map(|c| CompanionInfo {
                    kind: c.kind.name,
                    scheme: c.grid.scheme(),
                    block: match c.grid {
                        Grid::Block { rows, cols } => Some((rows, cols)),
                        Grid::Whole(n) => Some((1, n)),
                        Grid::Row | Grid::Tensor => None,
                    },
                    dtype: c.dtype.to_string(),
                    merged_w13: c.merged_w13,
                    fused_suffix: c.kind.fused_suffix,
                })
                .collect(),
        }
    }
}
