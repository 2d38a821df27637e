//! Test fixtures: a logical MoE layer with distinct values everywhere, written to safetensors
//! files in each layout, and the destination contents expected from it.
#![allow(dead_code)] // each test binary uses a different part of the fixtures

use std::path::{Path, PathBuf};

use fastmoe_load_core::{detect, Checkpoint, CopyPlan, Executor, MoeLayer, ReadMode};
use safetensors::tensor::{Dtype, TensorView};

/// A scratch directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("fastmoe-core-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct Tensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

pub fn tensor_u16(name: &str, shape: &[usize], values: impl Iterator<Item = u16>) -> Tensor {
    let data: Vec<u8> = values.flat_map(u16::to_le_bytes).collect();
    assert_eq!(data.len(), shape.iter().product::<usize>() * 2);
    Tensor {
        name: name.to_string(),
        dtype: Dtype::BF16,
        shape: shape.to_vec(),
        data,
    }
}

pub fn tensor(name: String, dtype: Dtype, shape: &[usize], data: Vec<u8>) -> Tensor {
    Tensor {
        name,
        dtype,
        shape: shape.to_vec(),
        data,
    }
}

/// A checkpoint of `tensors` in one file, with `config` as its config.json.
pub fn open(tensors: &[Tensor], config: Option<&str>) -> (TempDir, Checkpoint) {
    let dir = TempDir::new("quant");
    write(&dir.path().join("model.safetensors"), tensors);
    if let Some(config) = config {
        std::fs::write(dir.path().join("config.json"), config).unwrap();
    }
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    (dir, ckpt)
}

/// The checkpoint's one routed-expert group.
pub fn layer(ckpt: &Checkpoint) -> MoeLayer {
    let mut layers = detect(ckpt, None).unwrap();
    assert_eq!(layers.len(), 1);
    layers.remove(0)
}

/// The bytes `plan` writes into memory poisoned with 0xAA first.
pub fn execute(ckpt: &Checkpoint, plan: &CopyPlan) -> Vec<u8> {
    let mut out = vec![0xAAu8; plan.len()];
    // SAFETY: `out` is exactly the plan's length and ours for the call.
    unsafe {
        Executor::new(2, ReadMode::Map).run(
            ckpt.shards(),
            plan.ops(),
            out.as_mut_ptr(),
            0,
            out.len(),
        )
    }
    .unwrap();
    out
}

pub fn write(path: &Path, tensors: &[Tensor]) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Which matrix of an expert a value belongs to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum M {
    Gate,
    Up,
    Down,
    GateBias,
    UpBias,
    DownBias,
}

/// A logical MoE layer: every element of every matrix has a value of its own.
#[derive(Clone, Copy, Debug)]
pub struct Logical {
    pub experts: usize,
    pub hidden: usize,
    pub inter: usize,
}

impl Logical {
    /// gate/up: (row i, col h); down: (row h, col i); biases: (0, col).
    pub fn value(&self, m: M, e: usize, row: usize, col: usize) -> u16 {
        let key = (m as u64) << 48 ^ (e as u64) << 32 ^ (row as u64) << 16 ^ col as u64;
        let mut x = key.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x ^= x >> 29;
        x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        (x >> 40) as u16
    }

    /// The contents a destination must have: gate rows then up rows of the rank's shard
    /// (w13), the rank's columns of down (w2), and the biases, for each slot's expert.
    pub fn expected(
        &self,
        target: &str,
        tp_rank: usize,
        tp_size: usize,
        experts: &[usize],
    ) -> Vec<u16> {
        let (h, it) = (self.hidden, self.inter / tp_size);
        let first = tp_rank * it;
        let mut out = Vec::new();
        for &e in experts {
            match target {
                "w13" => {
                    for m in [M::Gate, M::Up] {
                        for i in 0..it {
                            for c in 0..h {
                                out.push(self.value(m, e, first + i, c));
                            }
                        }
                    }
                }
                "w2" => {
                    for r in 0..h {
                        for i in 0..it {
                            out.push(self.value(M::Down, e, r, first + i));
                        }
                    }
                }
                "w13_bias" => {
                    for m in [M::GateBias, M::UpBias] {
                        for i in 0..it {
                            out.push(self.value(m, e, 0, first + i));
                        }
                    }
                }
                "w2_bias" => {
                    for c in 0..h {
                        out.push(self.value(M::DownBias, e, 0, c));
                    }
                }
                other => panic!("unknown target {other}"),
            }
        }
        out
    }

    /// Fused tensors under `prefix`: gate_up/down in the given orientation and gate/up
    /// arrangement, with biases if asked.
    pub fn fused(
        &self,
        prefix: &str,
        transposed: bool,
        interleaved: bool,
        biases: bool,
    ) -> Vec<Tensor> {
        let (ne, h, i) = (self.experts, self.hidden, self.inter);
        // Logical gate/up element (j along 2I, c along H).
        let gate_up = |e: usize, j: usize, c: usize| {
            let (m, row) = if interleaved {
                (if j.is_multiple_of(2) { M::Gate } else { M::Up }, j / 2)
            } else if j < i {
                (M::Gate, j)
            } else {
                (M::Up, j - i)
            };
            self.value(m, e, row, c)
        };
        let gate_up_bias = |e: usize, j: usize| {
            let (m, col) = if interleaved {
                (
                    if j.is_multiple_of(2) {
                        M::GateBias
                    } else {
                        M::UpBias
                    },
                    j / 2,
                )
            } else if j < i {
                (M::GateBias, j)
            } else {
                (M::UpBias, j - i)
            };
            self.value(m, e, 0, col)
        };
        let mut tensors = if transposed {
            vec![
                tensor_u16(
                    &format!("{prefix}.gate_up_proj"),
                    &[ne, h, 2 * i],
                    (0..ne).flat_map(move |e| {
                        (0..h).flat_map(move |c| (0..2 * i).map(move |j| gate_up(e, j, c)))
                    }),
                ),
                tensor_u16(
                    &format!("{prefix}.down_proj"),
                    &[ne, i, h],
                    (0..ne).flat_map(move |e| {
                        (0..i).flat_map(move |k| (0..h).map(move |c| self.value(M::Down, e, c, k)))
                    }),
                ),
            ]
        } else {
            vec![
                tensor_u16(
                    &format!("{prefix}.gate_up_proj"),
                    &[ne, 2 * i, h],
                    (0..ne).flat_map(move |e| {
                        (0..2 * i).flat_map(move |j| (0..h).map(move |c| gate_up(e, j, c)))
                    }),
                ),
                tensor_u16(
                    &format!("{prefix}.down_proj"),
                    &[ne, h, i],
                    (0..ne).flat_map(move |e| {
                        (0..h).flat_map(move |c| (0..i).map(move |k| self.value(M::Down, e, c, k)))
                    }),
                ),
            ]
        };
        if biases {
            tensors.push(tensor_u16(
                &format!("{prefix}.gate_up_proj_bias"),
                &[ne, 2 * i],
                (0..ne).flat_map(move |e| (0..2 * i).map(move |j| gate_up_bias(e, j))),
            ));
            tensors.push(tensor_u16(
                &format!("{prefix}.down_proj_bias"),
                &[ne, h],
                (0..ne).flat_map(move |e| (0..h).map(move |c| self.value(M::DownBias, e, 0, c))),
            ));
        }
        tensors
    }

    /// One tensor per expert and matrix: `{prefix}.{e}.{module}.weight` (and `.bias`).
    pub fn per_expert(&self, prefix: &str, modules: [&str; 3], biases: bool) -> Vec<Tensor> {
        let (h, i) = (self.hidden, self.inter);
        let mut tensors = Vec::new();
        for e in 0..self.experts {
            let matrix = |m: M, rows: usize, cols: usize, module: &str| {
                tensor_u16(
                    &format!("{prefix}.{e}.{module}.weight"),
                    &[rows, cols],
                    (0..rows).flat_map(move |r| (0..cols).map(move |c| self.value(m, e, r, c))),
                )
            };
            tensors.push(matrix(M::Gate, i, h, modules[0]));
            tensors.push(matrix(M::Up, i, h, modules[1]));
            tensors.push(matrix(M::Down, h, i, modules[2]));
            if biases {
                for (m, n, module) in [
                    (M::GateBias, i, modules[0]),
                    (M::UpBias, i, modules[1]),
                    (M::DownBias, h, modules[2]),
                ] {
                    tensors.push(tensor_u16(
                        &format!("{prefix}.{e}.{module}.bias"),
                        &[n],
                        (0..n).map(move |c| self.value(m, e, 0, c)),
                    ));
                }
            }
        }
        tensors
    }
}

pub fn to_u16(bytes: &[u8]) -> Vec<u16> {
    bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect()
}
