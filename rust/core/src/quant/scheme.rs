//! The quantization schemes fastmoe_load loads, as tables: the companion tensors they write
//! ([`COMPANION_KINDS`]), how their weights pack values ([`PACKINGS`]), and what their
//! `quantization_config` declares ([`METHODS`]), and the names only schemes it does not load
//! write ([`FOREIGN_QUANT_SUFFIXES`]). A new scheme is new rows here; the code that matches
//! companions against weights (`quant::detect`) reads only these rows.

use safetensors::tensor::Dtype;
use serde_json::Value;

/// The block of weight entries one block scale covers when neither `config.json` nor the
/// file says otherwise: every block-scaled fp8 release (DeepSeek-V3/R1, Kimi-K2, Qwen3-FP8,
/// MiniMax-M2) uses 128 × 128.
pub const DEFAULT_BLOCK: (usize, usize) = (128, 128);

/// Values of an mxfp4 block (the OCP MX block size), which one e8m0 scale covers.
pub const MX_BLOCK: usize = 32;

/// Values of a row one NVFP4 block scale covers, unless `config.json` says otherwise.
const NVFP4_GROUP: usize = 16;

/// What a companion kind's values are: this decides how they lie over the weight and what
/// they may be stored as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Values {
    /// Scales, on whichever grid their shape fits.
    Scales,
    /// Scales of the activations, which have no rows or columns to follow: one per matrix.
    ActivationScale,
    /// compressed-tensors' `[rows, cols]` of a packed weight, integers read back and checked
    /// against the weight (a `Grid::Whole(2)`).
    WeightShape,
    /// Integer zero points, `32 / bits` rows' points to an int32 (see `zero_point_grid`).
    ZeroPoints,
}

impl Values {
    /// Integers rather than scales: no scale dtype applies to them.
    pub fn integer(self) -> bool {
        matches!(self, Values::WeightShape | Values::ZeroPoints)
    }
}

/// A kind of companion tensor, by the name it has in checkpoints (the suffix after a
/// per-expert weight's module, `….gate_proj.weight_scale_inv`) and in vLLM (`w13_{kind}`).
#[derive(Debug, PartialEq, Eq)]
pub struct CompanionKind {
    pub name: &'static str,
    /// The suffix of the fused form transformers v5 writes after `gate_up_proj`/`down_proj`.
    pub fused_suffix: Option<&'static str>,
    /// The weight's own scale (as opposed to an activation scale): required by fp8 weights.
    pub weight_scale: bool,
    /// vLLM keeps one value per expert for gate and up together (`w13_input_scale [E]`):
    /// both projections read the same activations. It keeps the up projection's, the last
    /// of the two its loader sees in name order.
    pub merged_w13: bool,
    pub values: Values,
}

pub const COMPANION_KINDS: [CompanionKind; 10] = [
    CompanionKind {
        name: "weight_scale_inv",
        fused_suffix: Some("_scale_inv"),
        weight_scale: true,
        merged_w13: false,
        values: Values::Scales,
    },
    CompanionKind {
        name: "weight_scale",
        fused_suffix: None,
        weight_scale: true,
        merged_w13: false,
        values: Values::Scales,
    },
    CompanionKind {
        name: "input_scale",
        fused_suffix: Some("_activation_scale"),
        weight_scale: false,
        merged_w13: true,
        values: Values::ActivationScale,
    },
    // NVFP4's global (per-tensor) scale beside its 16-value block scales `weight_scale`.
    CompanionKind {
        name: "weight_scale_2",
        fused_suffix: None,
        weight_scale: false,
        merged_w13: false,
        values: Values::Scales,
    },
    // compressed-tensors' `[rows, cols]` of a packed weight, as int32; vLLM keeps one per
    // expert for gate and up (`w13_weight_shape [E, 2]`, the up projection's).
    CompanionKind {
        name: "weight_shape",
        fused_suffix: None,
        weight_scale: false,
        merged_w13: true,
        values: Values::WeightShape,
    },
    // compressed-tensors' zero points of asymmetric integer weights: int32s of `32 / bits`
    // rows' points each, one per group of columns (a `Grid::Block`, see `zero_point_grid`).
    CompanionKind {
        name: "weight_zero_point",
        fused_suffix: None,
        weight_scale: false,
        merged_w13: false,
        values: Values::ZeroPoints,
    },
    // GPTQ's and AWQ's group scales, `[in/group, out]` (stored input-first, see
    // [`K_FIRST_PACKINGS`]); vLLM's `w13_scales`/`w2_scales`.
    CompanionKind {
        name: "scales",
        fused_suffix: None,
        weight_scale: true,
        merged_w13: false,
        values: Values::Scales,
    },
    // GPTQ's and AWQ's zero points, `[in/group, out/pack]`: `32 / bits` output rows' points
    // an int32 (a `Grid::Block` of `(pack, group)`, stored input-first); vLLM's `w13_qzeros`.
    CompanionKind {
        name: "qzeros",
        fused_suffix: None,
        weight_scale: false,
        merged_w13: false,
        values: Values::ZeroPoints,
    },
    // compressed-tensors NVFP4's per-tensor global scale beside its 16-value group scales
    // (ModelOpt's `weight_scale_2`); vLLM keeps gate's and up's,
    // `w13_weight_global_scale [E, 2]`.
    CompanionKind {
        name: "weight_global_scale",
        fused_suffix: None,
        weight_scale: false,
        merged_w13: false,
        values: Values::Scales,
    },
    // compressed-tensors NVFP4's activation global scale (ModelOpt's `input_scale`); vLLM
    // keeps gate's and up's, `w13_input_global_scale [E, 2]`.
    CompanionKind {
        name: "input_global_scale",
        fused_suffix: None,
        weight_scale: false,
        merged_w13: false,
        values: Values::ActivationScale,
    },
];

/// Per-tensor scales beside uint8 weights that make them NVFP4 (two e2m1 values a byte):
/// ModelOpt's `weight_scale_2`, compressed-tensors' `weight_global_scale`.
pub const NVFP4_GLOBAL_SCALES: [&str; 2] = ["weight_scale_2", "weight_global_scale"];

pub fn companion_kind(name: &str) -> Option<&'static CompanionKind> {
    COMPANION_KINDS.iter().find(|k| k.name == name)
}

/// Dtypes a scale may be stored in: converted exactly to vLLM's float32 parameters, or kept
/// (NVFP4's float8 e4m3 block scales, which vLLM keeps as they are).
pub const SCALE_DTYPES: [Dtype; 5] = [
    Dtype::F32,
    Dtype::BF16,
    Dtype::F16,
    Dtype::F8_E8M0,
    Dtype::F8_E4M3,
];

pub const SCALE_DTYPES_TEXT: &str = "scales are F32, BF16, F16, F8_E8M0 or F8_E4M3";

/// Values one stored weight element holds along the input dimension, by what the group is:
/// 1 for float weights, 2 for NVFP4 (two e2m1 values a byte, recognised by its
/// `weight_scale_2` beside `uint8` weights), `32 / bits` for compressed-tensors'
/// `weight_packed` int32 (`int_bits`: the bits of its values, where the group's weights are
/// so named); `None` for integer weights of a scheme the loader does not know.
pub fn packing(weight: Dtype, has_weight_scale_2: bool, int_bits: Option<usize>) -> Option<usize> {
    match (weight, int_bits) {
        (d, _) if is_float(d) => Some(1),
        (Dtype::U8, _) if has_weight_scale_2 => Some(2),
        (Dtype::I32, Some(bits)) if bits > 0 && 32 % bits == 0 && bits < 32 => Some(32 / bits),
        // compressed-tensors' `int-quantized` int8, one value an element.
        (Dtype::I8, Some(8)) => Some(1),
        _ => None,
    }
}

/// Weight dtypes that need a weight scale to mean anything.
pub fn is_quantized_weight(dtype: Dtype) -> bool {
    matches!(
        dtype,
        Dtype::F8_E4M3 | Dtype::F8_E5M2 | Dtype::F8_E4M3FNUZ | Dtype::F8_E5M2FNUZ
    )
}

/// Floating-point dtypes: what a weight is unless it packs quantized values into integers.
pub fn is_float(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64)
        || is_quantized_weight(dtype)
}

/// Names (last components, or suffixes of a fused tensor's name) that only quantization
/// schemes the loader does not know write beside their weights.
pub const FOREIGN_QUANT_SUFFIXES: [&str; 12] = [
    "weight_packed",
    "weight_scale_2",
    "weight_shape",
    "weight_zero_point",
    "weight_g_idx",
    "qweight",
    "qzeros",
    "g_idx",
    "_blocks",
    "_scales",
    "absmax",
    "quant_state",
];

/// How a group's stored weights hold their values, and what follows for their companions.
#[derive(Debug, PartialEq, Eq)]
pub struct Packing {
    /// Values per stored element along the input dimension (see [`packing`]); `None` where
    /// the bits of the values decide it.
    pub pack: Option<usize>,
    /// Told apart by the names of the tensors (mxfp4's `_blocks`), not by their dtype.
    pub by_names: bool,
    /// `quant_method` of such a group where `config.json` names none.
    pub method: &'static str,
    /// The scale block where neither `config.json` nor the file says otherwise.
    pub default_block: (usize, usize),
    /// Its scales form that block grid and no other (no per-row or per-tensor scales).
    pub block_scales_only: bool,
    /// Dtypes its scales may be stored in, and how an error says so.
    pub scale_dtypes: &'static [Dtype],
    pub scale_dtypes_text: &'static str,
    /// vLLM keeps gate's and up's input scales apart (`w13_input_scale [E, 2]`), against
    /// the kind's `merged_w13`.
    pub separate_w13_input_scales: bool,
}

/// In the order [`Packing::find`] tries them.
pub const PACKINGS: [Packing; 4] = [
    // Float weights, fp8 ones with scales beside them.
    Packing {
        pack: Some(1),
        by_names: false,
        method: "fp8",
        default_block: DEFAULT_BLOCK,
        block_scales_only: false,
        scale_dtypes: &SCALE_DTYPES,
        scale_dtypes_text: SCALE_DTYPES_TEXT,
        separate_w13_input_scales: false,
    },
    // gpt-oss' mxfp4: blocks of 32 e2m1 values two a byte, one e8m0 byte scale per block.
    Packing {
        pack: Some(2),
        by_names: true,
        method: "mxfp4",
        default_block: (1, MX_BLOCK),
        block_scales_only: true,
        scale_dtypes: &[Dtype::U8],
        scale_dtypes_text: "mxfp4 scales are e8m0 bytes, U8",
        separate_w13_input_scales: false,
    },
    // NVFP4: e2m1 values two a byte, float8 scales per 16 values of a row.
    Packing {
        pack: Some(2),
        by_names: false,
        method: "modelopt",
        default_block: (1, NVFP4_GROUP),
        block_scales_only: false,
        scale_dtypes: &SCALE_DTYPES,
        scale_dtypes_text: SCALE_DTYPES_TEXT,
        separate_w13_input_scales: true,
    },
    // compressed-tensors' `pack-quantized` integers, `32 / bits` to an int32.
    Packing {
        pack: None,
        by_names: false,
        method: "compressed-tensors",
        default_block: DEFAULT_BLOCK,
        block_scales_only: false,
        scale_dtypes: &SCALE_DTYPES,
        scale_dtypes_text: SCALE_DTYPES_TEXT,
        separate_w13_input_scales: false,
    },
];

impl Packing {
    /// The packing of weights holding `pack` values an element, `by_names` where their
    /// names said what they are.
    pub fn find(by_names: bool, pack: usize) -> &'static Packing {
        let fits = |p: &&Packing| p.by_names == by_names && p.pack.is_none_or(|n| n == pack);
        PACKINGS
            .iter()
            .find(fits)
            .unwrap_or(&PACKINGS[PACKINGS.len() - 1])
    }
}

/// Integer weights stored input-first (`[in, out]` rather than `[out, in]`), with their group
/// scales and zero points, as GPTQ and AWQ write them per expert and matrix (`qweight`,
/// `scales`, `qzeros`). The weight's views and the companions' grids are those of the
/// `[out, in]` matrix all the same; only the strides differ, so a TP split and the copy plans
/// treat them as any other scheme, and a plan may land them input-first too
/// (`CopyPlan::k_first`), as vLLM's GPTQ and AWQ Marlin methods keep them.
#[derive(Debug, PartialEq, Eq)]
pub struct KFirstPacking {
    /// The `quant_method` that writes them.
    pub method: &'static str,
    /// `32 / bits` values an int32 along the output dimension (AWQ's `[in, out/8]`), rather
    /// than along the input dimension (GPTQ's `[in/8, out]`).
    pub packed_along_output: bool,
    /// Per-matrix tensors the engines read no values from, which ride with the group (and
    /// are consumed with it): GPTQ's `g_idx [in]`, each input's group, trivial unless
    /// `desc_act` (which vLLM 0.33 and later refuse, and so does fastmoe_load); vLLM's
    /// checkpoint mapper drops `.g_idx`.
    pub discarded: &'static [&'static str],
}

pub const K_FIRST_PACKINGS: [KFirstPacking; 2] = [
    KFirstPacking {
        method: "gptq",
        packed_along_output: false,
        discarded: &["g_idx"],
    },
    // AWQ (GEMM version) packs eight values of consecutive outputs in the order
    // 0, 4, 1, 5, 2, 6, 3, 7 within each int32: whole int32s move as they are.
    KFirstPacking {
        method: "awq",
        packed_along_output: true,
        discarded: &[],
    },
];

/// The input-first packing of groups whose `quant_method` is `method`, if any.
pub fn k_first_packing(method: Option<&str>) -> Option<&'static KFirstPacking> {
    K_FIRST_PACKINGS.iter().find(|p| Some(p.method) == method)
}

/// What a method's `quantization_config` declares about the weights' scales.
#[derive(Debug, Default)]
pub struct Declared {
    /// The scale block, when block- or group-scaled.
    pub block: Option<(usize, usize)>,
    /// The weight scale's strategy (`block`, `group`, `channel`, `tensor`), if stated.
    pub scheme: Option<&'static str>,
    /// `num_bits` of integer weights packed into int32s.
    pub int_bits: Option<usize>,
    /// `symmetric` of those integer weights: asymmetric ones carry zero points.
    pub symmetric: Option<bool>,
    /// The variant it declares, by name, where fastmoe_load does not load it.
    pub unsupported: Option<String>,
}

/// A `quant_method` of `config.json`, and how to read the rest of its `quantization_config`.
pub struct Method {
    pub name: &'static str,
    pub read: fn(&Value) -> Declared,
}

/// The `quant_method`s fastmoe_load knows; any other is declared and not loaded.
pub const METHODS: [Method; 7] = [
    Method {
        name: "fp8",
        read: fp8,
    },
    Method {
        name: "fbgemm_fp8",
        read: |_| Declared {
            scheme: Some("channel"),
            ..Declared::default()
        },
    },
    // gpt-oss: one e8m0 scale per 32 values of a row.
    Method {
        name: "mxfp4",
        read: |_| Declared {
            block: Some((1, MX_BLOCK)),
            scheme: Some("group"),
            ..Declared::default()
        },
    },
    Method {
        name: "modelopt",
        read: modelopt,
    },
    Method {
        name: "compressed-tensors",
        read: compressed_tensors,
    },
    Method {
        name: "gptq",
        read: gptq,
    },
    Method {
        name: "awq",
        read: awq,
    },
];

fn pair(v: &Value) -> Option<(usize, usize)> {
    match v.as_array()?.as_slice() {
        [r, c] => Some((r.as_u64()? as usize, c.as_u64()? as usize)),
        _ => None,
    }
}

fn text(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str).map(str::to_string)
}

fn fp8(q: &Value) -> Declared {
    let block = q.get("weight_block_size").and_then(pair);
    Declared {
        block,
        scheme: Some(if block.is_some() { "block" } else { "tensor" }),
        ..Declared::default()
    }
}

fn modelopt(q: &Value) -> Declared {
    let field = |k: &str| q.get(k).or_else(|| q.get("quantization")?.get(k));
    match field("quant_algo").and_then(Value::as_str) {
        Some("FP8") => Declared {
            scheme: Some("tensor"),
            ..Declared::default()
        },
        Some("NVFP4") => {
            let group = field("group_size")
                .and_then(Value::as_u64)
                .map_or(NVFP4_GROUP, |g| g as usize);
            Declared {
                block: Some((1, group)),
                scheme: Some("group"),
                ..Declared::default()
            }
        }
        // One e8m0 scale per 32 values of a row (MiniMax-M3-MXFP8).
        Some("MXFP8") => Declared {
            block: Some((1, MX_BLOCK)),
            scheme: Some("group"),
            ..Declared::default()
        },
        Some(algo) => Declared {
            unsupported: Some(format!("modelopt {algo}")),
            ..Declared::default()
        },
        None => Declared {
            unsupported: Some("modelopt without quant_algo".into()),
            ..Declared::default()
        },
    }
}

fn compressed_tensors(q: &Value) -> Declared {
    let weights = || {
        q.get("config_groups")
            .and_then(Value::as_object)
            .into_iter()
            .flat_map(|groups| groups.values())
            .filter_map(|g| g.get("weights"))
    };
    let format = q.get("format").and_then(Value::as_str);
    // Zero points are loaded where they are packed per group of columns.
    let packed = |w: &Value| {
        format == Some("pack-quantized")
            && w.get("type").and_then(Value::as_str) == Some("int")
            && match w.get("symmetric").and_then(Value::as_bool) {
                Some(true) => true,
                Some(false) => w.get("strategy").and_then(Value::as_str) == Some("group"),
                None => false,
            }
    };
    // `int-quantized` int8 with one float scale per output channel (W8A8 int8 presets).
    let int8_channels = |w: &Value| {
        format == Some("int-quantized")
            && w.get("type").and_then(Value::as_str) == Some("int")
            && w.get("num_bits").and_then(Value::as_u64) == Some(8)
            && w.get("symmetric").and_then(Value::as_bool) == Some(true)
            && w.get("strategy").and_then(Value::as_str) == Some("channel")
    };
    // Activation order by group (`weight_g_idx` beside the weights): vLLM 0.33 and later
    // refuse it; `weight` (static) order leaves the groups in place and loads as any other.
    let act_order = weights().find_map(|w| match w.get("actorder").and_then(Value::as_str) {
        Some(order @ ("group" | "dynamic")) => Some(order.to_string()),
        _ => None,
    });
    let unsupported = weights()
        .find(|w| {
            w.get("type").and_then(Value::as_str) != Some("float")
                && !packed(w)
                && !int8_channels(w)
        })
        .map(|other| {
            let bits = other.get("num_bits").and_then(Value::as_u64);
            let kind = text(other.get("type")).unwrap_or_else(|| "untyped".into());
            let format = text(q.get("format")).unwrap_or_else(|| "unnamed format".into());
            match bits {
                Some(bits) => format!("compressed-tensors {kind}{bits} {format}"),
                None => format!("compressed-tensors {kind} {format}"),
            }
        })
        .or_else(|| {
            act_order.map(|order| {
                let format = text(q.get("format")).unwrap_or_else(|| "unnamed format".into());
                format!("compressed-tensors {format} with activation order (actorder: {order})")
            })
        });
    // The weights of the first float or int group; experts are `Linear` targets.
    let first =
        weights().find(|w| matches!(w.get("type").and_then(Value::as_str), Some("float" | "int")));
    let field = |k: &str| first.and_then(|w| w.get(k));
    let (mut int_bits, mut symmetric) = (None, None);
    if field("type").and_then(Value::as_str) == Some("int") {
        int_bits = field("num_bits")
            .and_then(Value::as_u64)
            .map(|b| b as usize);
        symmetric = field("symmetric").and_then(Value::as_bool);
    }
    let group = field("group_size").and_then(Value::as_u64);
    let (block, scheme) = match field("strategy").and_then(Value::as_str) {
        Some("block") => (field("block_structure").and_then(pair), Some("block")),
        Some("group") => (group.map(|g| (1, g as usize)), Some("group")),
        // NVFP4's groups with a global scale per tensor beside them.
        Some("tensor_group") => (group.map(|g| (1, g as usize)), Some("group")),
        Some("channel") => (None, Some("channel")),
        Some("tensor") => (None, Some("tensor")),
        _ => (None, None),
    };
    Declared {
        block,
        scheme,
        int_bits,
        symmetric,
        unsupported,
    }
}

/// The name DeepSeek-V4 gives every weight's scale, `….experts.0.w1.scale`, whatever the
/// weight's scheme: which companion kind it is depends on the weights beside it
/// ([`bare_scale_kind`]).
pub const BARE_SCALE: &str = "scale";

/// The companion kind a bare `scale` beside an expert weight packing `pack` values an element
/// stands for, as vLLM's DeepSeek-V4 loader renames it (its weights mapper): `weight_scale`
/// beside packed fp4 experts (`expert_dtype: fp4`, its `Mxfp4MoEMethod`), `weight_scale_inv`
/// beside fp8 ones (`expert_dtype: fp8`, block scales for its `Fp8MoEMethod`).
pub fn bare_scale_kind(pack: usize) -> &'static str {
    if pack > 1 {
        "weight_scale"
    } else {
        "weight_scale_inv"
    }
}

/// How OCP MX scales are stored: `float8_e8m0fnu`, or the same exponent bytes as `uint8`
/// (gpt-oss, AMD Quark, compressed-tensors). Either way they are moved as bytes: a numeric
/// conversion to `uint8` would turn 2^-7 into 0.
pub const E8M0_DTYPES: [Dtype; 2] = [Dtype::U8, Dtype::F8_E8M0];

/// Values one stored element of a `weight_shape` weight of dtype `weight` holds along the
/// input dimension where its weight scale (`scale` of shape `scale_shape`) makes it OCP MX:
/// 2 for bytes of two e2m1 values (MXFP4: `uint8`, or DeepSeek-V4's `int8`-typed bytes)
/// beside e8m0 scales, 1 for float8 e4m3 weights beside e8m0 scales of one per 32 values of
/// a row (MXFP8; float8 weights beside e8m0 128 × 128 block scales are block fp8, not MX).
/// `None` where the scale is no MX scale.
pub fn mx_packing(
    weight: Dtype,
    weight_shape: &[usize],
    scale: Dtype,
    scale_shape: &[usize],
) -> Option<usize> {
    if !E8M0_DTYPES.contains(&scale) {
        return None;
    }
    match (weight, weight_shape, scale_shape) {
        (Dtype::U8 | Dtype::I8, _, _) => Some(2),
        (Dtype::F8_E4M3, [rows, cols], [scale_rows, scale_cols])
            if rows == scale_rows
                && cols.is_multiple_of(MX_BLOCK)
                && cols / MX_BLOCK == *scale_cols =>
        {
            Some(1)
        }
        _ => None,
    }
}

const MX_SCALE_DTYPES_TEXT: &str = "MX scales are e8m0: F8_E8M0, or its bytes as U8";

/// Per-expert OCP MX weights (one e8m0 scale per 32 values of a row), told apart by their
/// scales ([`mx_packing`]) rather than by their names, in the order [`Packing::find_mx`]
/// tries them.
pub const MX_PACKINGS: [Packing; 2] = [
    // MXFP4: DeepSeek-V4 (`w1.weight` int8-typed bytes, `w1.scale` float8_e8m0fnu), Kimi-K3
    // (compressed-tensors `mxfp4-pack-quantized`, `weight_packed`), AMD Quark OCP MX.
    Packing {
        pack: Some(2),
        by_names: false,
        method: "mxfp4",
        default_block: (1, MX_BLOCK),
        block_scales_only: true,
        scale_dtypes: &E8M0_DTYPES,
        scale_dtypes_text: MX_SCALE_DTYPES_TEXT,
        separate_w13_input_scales: false,
    },
    // MXFP8: float8 e4m3 weights (ModelOpt MXFP8, compressed-tensors W8A8 MXFP8, MiniMax-M3).
    Packing {
        pack: Some(1),
        by_names: false,
        method: "mxfp8",
        default_block: (1, MX_BLOCK),
        block_scales_only: true,
        scale_dtypes: &E8M0_DTYPES,
        scale_dtypes_text: MX_SCALE_DTYPES_TEXT,
        separate_w13_input_scales: false,
    },
];

impl Packing {
    /// The OCP MX packing of weights holding `pack` values an element (see [`mx_packing`]).
    pub fn find_mx(pack: usize) -> Option<&'static Packing> {
        MX_PACKINGS.iter().find(|p| p.pack == Some(pack))
    }

    /// Whether this is one of the per-expert OCP MX packings ([`MX_PACKINGS`]).
    pub fn is_mx(&self) -> bool {
        MX_PACKINGS.iter().any(|p| std::ptr::eq(p, self))
    }
}

/// `expert_dtype` of DeepSeek-V4's `config.json`, which says what its routed experts are
/// whatever the rest of `quantization_config` declares (its fp8 block scales are the dense
/// layers'): top level (V4), under `text_config`, or inside `quantization_config` (V4.1).
pub const EXPERT_DTYPE_KEY: &str = "expert_dtype";

/// `model_type`s whose experts are fp4 where `config.json` names no `expert_dtype`, as
/// vLLM's DeepSeek-V4 quantization config defaults it.
pub const EXPERT_DTYPE_MODEL_TYPES: [&str; 2] = ["deepseek_v4", "deepseek_v41"];

/// What `expert_dtype` (with `moe_quant_algo`, which DeepSeek-V4 NVFP4 re-releases add)
/// makes of the experts' scales, over what `quant_method` declares for the dense layers.
pub fn expert_dtype_declares(
    method: &str,
    expert_dtype: &str,
    moe_quant_algo: Option<&str>,
    declared: &mut Declared,
) {
    match (
        expert_dtype,
        moe_quant_algo.map(str::to_ascii_uppercase).as_deref(),
    ) {
        ("fp8", _) => {}
        ("fp4", Some("NVFP4")) => {
            declared.block = Some((1, NVFP4_GROUP));
            declared.scheme = Some("group");
        }
        ("fp4", None | Some("")) => {
            declared.block = Some((1, MX_BLOCK));
            declared.scheme = Some("group");
        }
        (other, algo) => {
            let algo = algo
                .map(|a| format!(", moe_quant_algo {a}"))
                .unwrap_or_default();
            declared.unsupported = Some(format!("{method} with expert_dtype {other}{algo}"));
        }
    }
}

/// AMD Quark: the weight spec of `global_quant_config`. OCP MX weights (`dtype` `fp4` or
/// `fp8_e4m3`, `qscheme: per_group`, `group_size: 32`, e8m0 scales) are loaded; any other
/// Quark scheme is declared and not.
fn quark(q: &Value) -> Declared {
    let weight = q.get("global_quant_config").and_then(|g| g.get("weight"));
    let field = |k: &str| weight.and_then(|w| w.get(k));
    let dtype = field("dtype").and_then(Value::as_str);
    let qscheme = field("qscheme").and_then(Value::as_str);
    let group = field("group_size").and_then(Value::as_u64);
    let scale = field("scale_format").and_then(Value::as_str);
    match (dtype, qscheme, group, scale) {
        (Some("fp4" | "fp8_e4m3"), Some("per_group"), Some(32), None | Some("e8m0")) => Declared {
            block: Some((1, MX_BLOCK)),
            scheme: Some("group"),
            ..Declared::default()
        },
        _ => Declared {
            unsupported: Some(match (dtype, qscheme) {
                (Some(d), Some(s)) => format!("quark {d} {s}"),
                _ => "quark without one global weight spec".into(),
            }),
            ..Declared::default()
        },
    }
}

/// `quant_method`s of OCP MX releases, beside [`METHODS`]: AMD Quark, and MiniMax's own
/// `mxfp8` (ModelOpt's MXFP8 on-disk format under another name).
pub const MX_METHODS: [Method; 2] = [
    Method {
        name: "quark",
        read: quark,
    },
    Method {
        name: "mxfp8",
        read: |_| Declared {
            block: Some((1, MX_BLOCK)),
            scheme: Some("group"),
            ..Declared::default()
        },
    },
];

/// The group scales GPTQ and AWQ declare, `bits` values an int32, with their zero points
/// always beside the weights (GPTQ writes them for symmetric weights too, and vLLM loads them
/// either way): `symmetric` stays unstated so that their presence is not held against it.
fn int_groups(method: &str, bits: Option<u64>, group: Option<i64>) -> Declared {
    let unsupported = match (bits, group) {
        (Some(4 | 8), Some(g)) if g > 0 => None,
        (Some(b), Some(g)) if g <= 0 => Some(format!(
            "{method} int{b} with one group per output (group_size {g})"
        )),
        (Some(b), _) => Some(format!("{method} int{b}")),
        (None, _) => Some(format!("{method} without bits")),
    };
    Declared {
        block: group.filter(|g| *g > 0).map(|g| (1, g as usize)),
        scheme: Some("group"),
        int_bits: bits.map(|b| b as usize),
        symmetric: None,
        unsupported,
    }
}

/// GPTQ (AutoGPTQ, GPTQModel, AutoRound's GPTQ export, Qwen's own `*-GPTQ-Int4`):
/// `bits`, `group_size`, `desc_act`, `sym`. Activation order (`desc_act` with groups) permutes
/// the groups by `g_idx`; vLLM 0.33 and later refuse such checkpoints.
fn gptq(q: &Value) -> Declared {
    let bits = q.get("bits").and_then(Value::as_u64);
    let group = q.get("group_size").and_then(Value::as_i64);
    let mut declared = int_groups("gptq", bits, group);
    let desc_act = q.get("desc_act").and_then(Value::as_bool) == Some(true);
    // GPTQModel's per-module overrides may give experts other bits or groups than the
    // top-level fields say.
    let dynamic = q
        .get("dynamic")
        .and_then(Value::as_object)
        .is_some_and(|rules| !rules.is_empty());
    if declared.unsupported.is_none() {
        let bits = bits.unwrap_or(0);
        if desc_act {
            declared.unsupported = Some(format!("gptq int{bits} with activation order (desc_act)"));
        } else if dynamic {
            declared.unsupported = Some(format!(
                "gptq int{bits} with per-module overrides (dynamic)"
            ));
        }
    }
    declared
}

/// AWQ (AutoAWQ, llm-awq): `bits` (or `w_bit`), `group_size` (or `q_group_size`),
/// `zero_point`, `version`. Only the GEMM packing is loaded; GEMV packs another way.
fn awq(q: &Value) -> Declared {
    let field = |a: &str, b: &str| q.get(a).or_else(|| q.get(b));
    let bits = field("bits", "w_bit").and_then(Value::as_u64);
    let group = field("group_size", "q_group_size").and_then(Value::as_i64);
    let mut declared = int_groups("awq", bits, group);
    let version = q.get("version").and_then(Value::as_str).unwrap_or("gemm");
    if declared.unsupported.is_none() {
        if !version.eq_ignore_ascii_case("gemm") {
            declared.unsupported = Some(format!("awq {version}"));
        } else if bits != Some(4) {
            declared.unsupported = Some(format!("awq int{}", bits.unwrap_or(0)));
        } else if field("zero_point", "zero_point").and_then(Value::as_bool) == Some(false) {
            declared.unsupported = Some("awq without zero points".into());
        }
    }
    declared
}
