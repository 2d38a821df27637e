//! Matching a group's companion tensors against its weights: each one's grid, dtype and
//! shape, checked against what the weights and `config.json` say.

use std::collections::BTreeMap;

use safetensors::tensor::Dtype;

use super::companion::{Companion, CompanionTensors, Quantization};
use super::config::QuantConfig;
use super::grid::Grid;
use super::scheme::{
    companion_kind, is_quantized_weight, CompanionKind, Packing, Values, COMPANION_KINDS,
    SCALE_DTYPES, SCALE_DTYPES_TEXT,
};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::shard::TensorEntry;

/// One stored tensor: its name and entry.
pub(crate) type Found<'c> = (&'c str, &'c TensorEntry);

/// Companions of a per-expert group as found by name: `kind -> [expert][gate, up, down]`.
pub(crate) type PerExpertFound<'c> = BTreeMap<&'static str, Vec<[Option<Found<'c>>; 3]>>;

fn layout_error(ckpt: &Checkpoint, prefix: &str, reason: String) -> Error {
    Error::Layout {
        path: ckpt.path().to_path_buf(),
        prefix: prefix.to_string(),
        reason,
    }
}

/// What a group's weights look like, for matching companions against them.
pub(crate) struct Weights<'a> {
    pub prefix: &'a str,
    pub hidden: usize,
    pub inter: usize,
    pub dtype: Dtype,
    /// Values per stored element along the input dimension (see
    /// [`packing`](super::scheme::packing)).
    pub pack: usize,
    /// Values per stored element along the output dimension (AWQ's `32 / bits`), else 1.
    pub out_pack: usize,
    /// Weights and block companions stored input-first, `[in, out]` (GPTQ, AWQ).
    pub k_first: bool,
    pub packing: &'static Packing,
}

impl Weights<'_> {
    /// `(rows, cols)` of gate/up (`slot` 0, 1) or down (`slot` 2).
    fn dims(&self, slot: usize) -> (usize, usize) {
        if slot < 2 {
            (self.inter, self.hidden)
        } else {
            (self.hidden, self.inter)
        }
    }

    /// A companion's stored `shape` as the `[rows, cols]` of its grid over the `[out, in]`
    /// matrix: input-first files store it transposed.
    fn oriented(&self, shape: &[usize]) -> Vec<usize> {
        match shape {
            [a, b] if self.k_first => vec![*b, *a],
            _ => shape.to_vec(),
        }
    }
}

/// The grid of companion `name` of shape `shape` over a `rows × cols` weight, or an error
/// that says which shapes would fit.
fn grid_of(
    ckpt: &Checkpoint,
    w: &Weights,
    config: Option<&QuantConfig>,
    name: &str,
    shape: &[usize],
    (rows, cols): (usize, usize),
) -> Result<Grid> {
    let block = config
        .and_then(|c| c.block)
        .unwrap_or(w.packing.default_block);
    let scheme = config.and_then(|c| c.scheme);
    let blocks = Grid::Block {
        rows: block.0,
        cols: block.1,
    };
    let grid = Grid::of_shape(shape, rows, cols, block, scheme);
    let only_blocks = w.packing.block_scales_only;
    let grid = grid.filter(|g| !only_blocks || *g == blocks);
    grid.ok_or_else(|| {
        let (br, bc) = blocks.shape(rows, cols);
        let others = if only_blocks {
            ""
        } else {
            &format!(", [{rows}, 1] (one per row) or a scalar (one per tensor)")
        };
        layout_error(
            ckpt,
            w.prefix,
            format!(
                "`{name}` has shape {shape:?}, which is no scale grid of its [{rows}, {cols}] \
                 weight: expected [{br}, {bc}] ({}×{} blocks){others}",
                block.0, block.1
            ),
        )
    })
}

/// The grid of compressed-tensors' zero points `name` over a `rows × cols` packed integer
/// weight. `pack_to_int32(zero_point, bits, packed_dim=0)` packs `32 / bits` points of
/// consecutive rows into each int32, one per group of columns: `[rows/pack, cols/group]`, so
/// that one stored value spans `pack` rows and `group` columns, and a TP split of the rows
/// must fall on whole packs (vLLM's `w13_weight_zero_point [E, 2·I/tp/pack, H/group]`).
fn zero_point_grid(
    ckpt: &Checkpoint,
    w: &Weights,
    config: Option<&QuantConfig>,
    name: &str,
    entry: &TensorEntry,
    (rows, cols): (usize, usize),
) -> Result<Grid> {
    let pack = w.pack.max(w.out_pack);
    let group = config
        .filter(|c| c.scheme == Some("group"))
        .and_then(|c| c.block)
        .map(|(_, group)| group)
        .filter(|_| pack > 1)
        .ok_or_else(|| {
            layout_error(
                ckpt,
                w.prefix,
                format!(
                    "`{name}`: zero points are loaded beside packed integer weights with group \
                     scales (compressed-tensors `pack-quantized`, `strategy: group`; GPTQ; AWQ) \
                     only"
                ),
            )
        })?;
    let grid = Grid::Block {
        rows: pack,
        cols: group,
    };
    let (r, c) = grid.shape(rows, cols);
    if entry.dtype != Dtype::I32 || w.oriented(&entry.shape) != [r, c] {
        let stored = w.oriented(&[r, c]);
        return Err(layout_error(
            ckpt,
            w.prefix,
            format!(
                "`{name}` is {} {:?}; the zero points of a [{rows}, {cols}] weight are I32 \
                 {stored:?} ({pack} rows packed in each int32, one per {group}-value group{})",
                entry.dtype,
                entry.shape,
                if w.k_first {
                    ", stored input-first"
                } else {
                    ""
                }
            ),
        ));
    }
    Ok(grid)
}

/// A `weight_shape` must record the `[rows, cols]` (in values) of the weight it rides with:
/// a packed weight's own shape counts stored elements, so this is what says how many values
/// it holds.
fn check_weight_shape(
    ckpt: &Checkpoint,
    w: &Weights,
    name: &str,
    entry: &TensorEntry,
    (rows, cols): (usize, usize),
) -> Result<()> {
    let (shard, _) = ckpt.tensor(name)?;
    let mut bytes = vec![0u8; entry.end - entry.start];
    ckpt.shards()[shard].read_at(entry.start, &mut bytes)?;
    let width = bytes.len() / 2;
    let recorded: Vec<i64> = bytes
        .chunks_exact(width)
        .map(|b| match *b {
            [a, b, c, d] => i64::from(i32::from_le_bytes([a, b, c, d])),
            _ => i64::from_le_bytes(b.try_into().expect("8 bytes of an I64")),
        })
        .collect();
    let expected = [rows as i64, cols as i64];
    if recorded != expected {
        return Err(layout_error(
            ckpt,
            w.prefix,
            format!(
                "`{name}` records the weight as {recorded:?}, but its weight holds {expected:?} \
                 values"
            ),
        ));
    }
    Ok(())
}

/// The quantization of a per-expert group from the companions found beside its weights.
pub(crate) fn per_expert(
    ckpt: &Checkpoint,
    w: &Weights,
    modules: [&str; 3],
    found: PerExpertFound,
) -> Result<Option<Quantization>> {
    let config = QuantConfig::from_config(ckpt.config());
    let mut companions = Vec::new();
    for (kind, experts) in found {
        let kind = companion_kind(kind).expect("only known kinds are collected");
        let mut names: [Vec<String>; 3] = Default::default();
        let mut grid = None;
        let mut dtypes = Vec::new();
        for (e, slots) in experts.iter().enumerate() {
            for (slot, tensor) in slots.iter().enumerate() {
                let Some((name, entry)) = tensor else {
                    return Err(layout_error(
                        ckpt,
                        w.prefix,
                        format!(
                            "`{}.{e}.{}.{}` is missing (other experts have one)",
                            w.prefix, modules[slot], kind.name
                        ),
                    ));
                };
                let dims = w.dims(slot);
                let this = match kind.values {
                    Values::WeightShape => {
                        // compressed-tensors writes `torch.tensor(weight.shape)`: int64 today.
                        if entry.shape != [2] || !matches!(entry.dtype, Dtype::I32 | Dtype::I64) {
                            return Err(layout_error(
                                ckpt,
                                w.prefix,
                                format!(
                                    "`{name}` is {} {:?}; a weight_shape is I64 or I32 [2]",
                                    entry.dtype, entry.shape
                                ),
                            ));
                        }
                        check_weight_shape(ckpt, w, name, entry, dims)?;
                        Grid::Whole(2)
                    }
                    Values::ZeroPoints => {
                        zero_point_grid(ckpt, w, config.as_ref(), name, entry, dims)?
                    }
                    // One value for the matrix, whatever grids the weight scales may take
                    // (AMD Quark's static input scales beside block-only MX scales).
                    Values::ActivationScale if entry.shape.iter().product::<usize>() == 1 => {
                        Grid::Tensor
                    }
                    Values::Scales | Values::ActivationScale => grid_of(
                        ckpt,
                        w,
                        config.as_ref(),
                        name,
                        &w.oriented(&entry.shape),
                        dims,
                    )?,
                };
                if kind.values == Values::ActivationScale && this != Grid::Tensor {
                    return Err(layout_error(
                        ckpt,
                        w.prefix,
                        format!(
                            "`{name}` has shape {:?}; an input scale is a scalar",
                            entry.shape
                        ),
                    ));
                }
                match grid {
                    None => grid = Some(this),
                    Some(g) if g != this => {
                        return Err(layout_error(
                            ckpt,
                            w.prefix,
                            format!(
                                "`{name}` has {} scales, other `{}` tensors of the group {} scales",
                                this.scheme(),
                                kind.name,
                                g.scheme()
                            ),
                        ))
                    }
                    Some(_) => {}
                }
                dtypes.push((*name, entry.dtype));
                names[slot].push(name.to_string());
            }
        }
        companions.push(Companion {
            kind,
            merged_w13: kind.merged_w13
                && !(kind.values == Values::ActivationScale && w.packing.separate_w13_input_scales),
            grid: grid.unwrap_or(Grid::Tensor),
            dtype: one_dtype(ckpt, w, &dtypes, kind)?,
            tensors: CompanionTensors::PerExpert(names),
        });
    }
    finish(ckpt, w, config, companions)
}

/// The quantization of a fused group: the companions transformers v5 writes beside its
/// `gate_up`/`down` tensors (`gate_up_proj_scale_inv [E, 2·ceil(I/128), ceil(H/128)]`, ...),
/// and `mx_scales`, the names of mxfp4 weights' scales (gpt-oss' `gate_up_proj_scales
/// [E, 2I, H/32]`, `down_proj_scales`), where the group is mxfp4. Scales of transposed
/// tensors are refused, and so are those of interleaved ones unless they are per row.
pub(crate) fn fused(
    ckpt: &Checkpoint,
    w: &Weights,
    (gate_up, down): (&str, &str),
    mx_scales: Option<(String, String)>,
    num_experts: usize,
    (transposed, interleaved): (bool, bool),
) -> Result<Option<Quantization>> {
    let config = QuantConfig::from_config(ckpt.config());
    let weight_scale = companion_kind("weight_scale").expect("a known kind");
    let candidates = COMPANION_KINDS
        .iter()
        .filter_map(|kind| {
            let suffix = kind.fused_suffix?;
            Some((
                kind,
                (format!("{gate_up}{suffix}"), format!("{down}{suffix}")),
            ))
        })
        .chain(mx_scales.map(|names| (weight_scale, names)));
    let mut companions = Vec::new();
    for (kind, names) in candidates {
        let (g, d) = match (ckpt.tensor(&names.0), ckpt.tensor(&names.1)) {
            (Err(_), Err(_)) => continue,
            (Ok((_, g)), Ok((_, d))) => (g, d),
            _ => {
                return Err(layout_error(
                    ckpt,
                    w.prefix,
                    format!("only one of `{}` and `{}` is present", names.0, names.1),
                ))
            }
        };
        let unsupported = || {
            layout_error(
                ckpt,
                w.prefix,
                format!(
                    "`{}`: scales of transposed fused experts, or block scales of interleaved \
                     ones, are not supported",
                    names.0
                ),
            )
        };
        if transposed {
            return Err(unsupported());
        }
        let bad = |name: &str, shape: &[usize], expected: String| {
            layout_error(
                ckpt,
                w.prefix,
                format!("`{name}` has shape {shape:?}; expected {expected}"),
            )
        };
        let grid = if kind.merged_w13 {
            for (name, entry) in [(&names.0, g), (&names.1, d)] {
                if entry.shape != [num_experts] {
                    return Err(bad(name, &entry.shape, format!("[{num_experts}]")));
                }
            }
            Grid::Tensor
        } else {
            if d.shape.len() != 3 || d.shape[0] != num_experts {
                return Err(bad(
                    &names.1,
                    &d.shape,
                    format!("[{num_experts}, rows, cols]"),
                ));
            }
            let grid = grid_of(ckpt, w, config.as_ref(), &names.1, &d.shape[1..], w.dims(2))?;
            let (r, c) = grid.shape(w.inter, w.hidden);
            if g.shape != [num_experts, 2 * r, c] {
                return Err(bad(
                    &names.0,
                    &g.shape,
                    format!(
                        "[{num_experts}, {}, {c}]: the {} grid of `{}`, for gate and for up",
                        2 * r,
                        grid.scheme(),
                        names.1
                    ),
                ));
            }
            if interleaved && grid.step(true).is_some_and(|rows| rows > 1) {
                return Err(unsupported());
            }
            grid
        };
        companions.push(Companion {
            kind,
            merged_w13: kind.merged_w13,
            grid,
            dtype: one_dtype(ckpt, w, &[(&names.0, g.dtype), (&names.1, d.dtype)], kind)?,
            tensors: CompanionTensors::Fused {
                gate_up: names.0,
                down: names.1,
            },
        });
    }
    finish(ckpt, w, config, companions)
}

fn one_dtype(
    ckpt: &Checkpoint,
    w: &Weights,
    dtypes: &[(&str, Dtype)],
    kind: &CompanionKind,
) -> Result<Dtype> {
    let (first_name, first) = dtypes[0];
    if let Some((name, other)) = dtypes.iter().find(|(_, d)| *d != first) {
        return Err(layout_error(
            ckpt,
            w.prefix,
            format!("`{first_name}` is {first} but `{name}` is {other}"),
        ));
    }
    // Activation scales are floats whatever the weights' scales are stored as (AMD Quark's
    // float32 input scales beside e8m0 MX scales).
    let (allowed, text) = match kind.values {
        Values::ActivationScale => (&SCALE_DTYPES[..], SCALE_DTYPES_TEXT),
        _ => (w.packing.scale_dtypes, w.packing.scale_dtypes_text),
    };
    if !kind.values.integer() && !allowed.contains(&first) {
        return Err(layout_error(
            ckpt,
            w.prefix,
            format!("`{first_name}` is {first}; {text}"),
        ));
    }
    Ok(first)
}

/// Checks the companions against the weights and the config.
fn finish(
    ckpt: &Checkpoint,
    w: &Weights,
    config: Option<QuantConfig>,
    companions: Vec<Companion>,
) -> Result<Option<Quantization>> {
    let err = |reason: String| layout_error(ckpt, w.prefix, reason);
    let weight_scales: Vec<&Companion> =
        companions.iter().filter(|c| c.kind.weight_scale).collect();
    // int8 weights are quantized where the config declares them so (`int-quantized`).
    let int8 = w.dtype == Dtype::I8 && config.as_ref().and_then(|c| c.int_bits) == Some(8);
    let quantized = is_quantized_weight(w.dtype) || w.pack > 1 || w.out_pack > 1 || int8;
    if companions.is_empty() {
        return if quantized {
            Err(err(format!(
                "the experts' weights are {} but have no scales beside them (`weight_scale_inv` \
                 or `weight_scale`); without them the values mean nothing",
                w.dtype
            )))
        } else {
            Ok(None)
        };
    }
    let first = companions[0].tensor_names()[0];
    if !quantized {
        return Err(err(format!(
            "the experts have scales (`{first}`) but their weights are {}, not float8, int8 or \
             packed integers or fp4",
            w.dtype
        )));
    }
    let scale = match weight_scales.as_slice() {
        [one] => *one,
        [] => return Err(err(format!("`{first}` has no weight scale beside it"))),
        [a, b, ..] => {
            return Err(err(format!(
                "both `{}` and `{}` are present: one weight scale per weight",
                a.tensor_names()[0],
                b.tensor_names()[0]
            )))
        }
    };
    if let Some(QuantConfig {
        method,
        scheme: Some(scheme),
        ..
    }) = &config
    {
        if scale.grid.scheme() != *scheme {
            return Err(err(format!(
                "config.json declares {method} with {scheme} scales, but `{}` holds {} scales",
                scale.tensor_names()[0],
                scale.grid.scheme()
            )));
        }
    }
    if let Some(QuantConfig {
        symmetric: Some(symmetric),
        ..
    }) = &config
    {
        match (
            symmetric,
            companions
                .iter()
                .find(|c| c.kind.values == Values::ZeroPoints),
        ) {
            (false, None) => {
                return Err(err(
                    "config.json declares asymmetric integer weights (`symmetric: false`), but \
                     they have no `weight_zero_point` beside them: the checkpoint lacks its \
                     zero points, or config.json misstates `symmetric`"
                        .into(),
                ))
            }
            (true, Some(zp)) => {
                return Err(err(format!(
                    "`{}` holds zero points, but config.json declares symmetric integer weights",
                    zp.tensor_names()[0]
                )))
            }
            _ => {}
        }
    }
    Ok(Some(Quantization {
        method: config.map_or_else(|| w.packing.method.to_string(), |c| c.method),
        companions,
    }))
}
