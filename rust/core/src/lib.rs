//! The core of fastmoe_load: safetensors shards mapped into memory, routed-expert layouts,
//! and copy plans executed by a thread pool. Pure Rust, no Python and no CUDA: the Python
//! binding hands it destination pointers (CPU tensors or pinned staging buffers).

pub mod checkpoint;
pub mod error;
pub mod exec;
mod fault;
pub mod layout;
pub mod plan;
pub mod quant;
pub mod shard;
pub mod unsupported;

pub use checkpoint::Checkpoint;
pub use error::{Error, Result};
pub use exec::{Executor, ReadMode, Ticket};
pub use layout::{detect, detect_groups, Detected, FailedGroup, MatrixView, MoeLayer, Part};
pub use plan::{CopyOp, CopyPlan, LoadRequest, Target};
pub use quant::{Companion, CompanionKind, Grid, Quantization};
pub use safetensors::tensor::Dtype;
pub use shard::{Shard, TensorEntry};
pub use unsupported::{unsupported_groups, UnsupportedGroup};
