"""vLLM's `FusedMoE` layers as `ExpertLayerSpec`s (`engines.spec`), and filling them.

`describe(layer, ckpt, prefix)` reads what a vLLM `FusedMoE` layer knows about itself;
`load_fused_moe_layer(layer, ckpt, prefix)` fills its parameters through the shared filler,
so that an engine's own `load_weights` only handles the names this returns. The layer is
vLLM's `FusedMoE`, or, from vLLM 0.33 on, the `MoERunner` that `FusedMoEFactory` builds
(whose experts are its `routed_experts`). It relies on these attributes of the experts
module:

- `w13_weight [E_local, 2*I/tp, H]`, `w2_weight [E_local, H, I/tp]` (named
  `w13_weight_packed`, `w2_weight_packed` by compressed-tensors' `WNA16` method, int32 of
  eight int4 values along the input dimension: `[E_local, 2*I/tp, H/8]`; `w13_qweight`,
  `w2_qweight` by the GPTQ and AWQ methods: the Marlin ones keep each expert input-first,
  `K_FIRST_METHODS`, with `w13_scales`, `w13_qzeros`, ...; `MoeWNA16Method` keeps them
  output-first in bytes, `w13_qweight [E_local, 2*I/tp, H/2]` uint8 (int8: `H`),
  `w13_scales [E_local, 2*I/tp, H/g]`, `w13_qzeros [E_local, I/tp, H/g]` uint8 where its
  config has zero points, on its served group `g`, see `engines.wna16`), and for gpt-oss
  `w13_bias [E_local, 2*I/tp]`, `w2_bias [E_local, H]`;
- for quantized checkpoints, the scale parameters vLLM's fp8 and NVFP4 MoE methods
  (`Fp8MoEMethod`, `CompressedTensorsW8A8Fp8MoEMethod`, `ModelOptNvFp4FusedMoE`) create,
  named `w13_{kind}` and `w2_{kind}` after the checkpoint's companions:
  `w13_weight_scale_inv`/`w2_weight_scale_inv` (block scales), `w13_weight_scale`/
  `w2_weight_scale` (per channel or tensor; NVFP4's 16-value groups),
  `w13_weight_scale_2`/`w2_weight_scale_2` (NVFP4's global scales), `w13_weight_shape`/
  `w2_weight_shape` (compressed-tensors' `[rows, cols]`, float32, the up projection's),
  `w13_weight_zero_point`/`w2_weight_zero_point` (asymmetric int4's int32 zero points,
  `[E_local, 2*I/tp/8, H/group]` and `[E_local, H/8, I/tp/group]`),
  `w13_input_scale`/`w2_input_scale`; float32 parameters take bfloat16 or UE8M0 scales
  converted exactly, as vLLM's `copy_` does. NVFP4 methods whose kernels quantize with the
  scales of all experts (FlashInfer's, `use_global_sf`) keep input scales for every
  physical expert, redundant (EPLB) ones included (`[P, 2]`, `[P]`), on every EP rank:
  those are filled for every physical expert, from its logical expert;
- `tp_rank`, `tp_size` (or `moe_config.tp_rank`, `moe_config.tp_size`): the layer's MoE
  tensor-parallel rank and size;
- `expert_map` (optional): a tensor of one entry per physical (global) expert, holding its
  local slot or -1; absent or None without expert parallelism;
- `moe_config.activation`, `moe_config.is_act_and_mul`, `moe_config.tp_shard_with_padding`
  and the `quant_method`'s class name, `use_global_sf` and `weight_scale_refine`: what
  decides whether vLLM's own loading writes what fastmoe_load writes (`QUANTIZED_METHODS`);
- for `MoeWNA16Method`, its `quant_config` (`linear_quant_method` `gptq`, `awq` or
  `awq_marlin`, `weight_bits`, `has_zp`) and the layer's `group_size` (the checkpoint's
  group halved by `create_weights` until it divides I/tp and H): the conversion
  (`wna16_of`). A layer whose config does not match the checkpoint (another format, width
  or group) is refused (`RequestError`), and left to vLLM by `load_format="fastmoe"` with
  that reason.

Physical experts beyond the checkpoint's (EPLB redundant experts) are replicas of logical
expert `physical % num_experts`, as vLLM places them initially, unless
`logical_of_physical` says otherwise.

How gate and up are arranged in `w13_weight` is the layer's to say, not the checkpoint's:
vLLM's gpt-oss activation (`moe_config.activation` `swigluoai`) reads them interleaved, every
other activation gate rows then up rows. The copy plans write the layer's arrangement
whatever the checkpoint's (interleaved gpt-oss files, or the same rewritten concatenated by
`convert`, as its shards record); a layer that names no activation keeps the checkpoint's.
vLLM adds `w2_bias` once before the all-reduce, so TP ranks other than 0 hold zeros there;
this adapter does the same. vLLM's gpt-oss layers may be padded (sizes rounded up for some
kernels): their parameters take the rank's values in their leading corner, as vLLM's
gpt-oss loading leaves them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .._fastmoe_load import RequestError
from ..checkpoint import Checkpoint, MoeLayer
from .spec import BIASES, ExpertLayerSpec, fill_layer
from .wna16 import Wna16

# vLLM's quantized MoE methods whose weights and scales fastmoe_load fills as their
# weight_loader does (checked against vLLM's own loading in its environment).
QUANTIZED_METHODS = (
    "Fp8MoEMethod",
    "CompressedTensorsW8A8Fp8MoEMethod",
    "ModelOptNvFp4FusedMoE",
    "CompressedTensorsWNA16MoEMethod",
    "GptOssMxfp4MoEMethod",
    # Per-expert OCP MX: DeepSeek-V4's and Kimi-K3's mxfp4 experts (`Mxfp4MoEMethod`), AMD
    # Quark's (`QuarkOCP_MX_MoEMethod`), MXFP8 (ModelOpt, compressed-tensors).
    "Mxfp4MoEMethod",
    "QuarkOCP_MX_MoEMethod",
    "ModelOptMxFp8FusedMoE",
    "CompressedTensorsW8A8Mxfp8MoEMethod",
    # GPTQ and AWQ into their Marlin methods (input-first), compressed-tensors int8 and NVFP4.
    "AutoGPTQMoEMethod",
    "AutoAWQMoEMethod",
    # GPTQ and AWQ where Marlin cannot serve the layer (output-first bytes, `engines.wna16`).
    "MoeWNA16Method",
    "CompressedTensorsW8A8Int8MoEMethod",
    "CompressedTensorsW4A4Nvfp4MoEMethod",
)

# vLLM's methods that keep each expert input-first (`is_transposed`), as GPTQ and AWQ files
# store them: `w13_qweight [E, H/8, 2I/tp]` (AWQ `[E, H, 2I/tp/8]`), `w13_scales [E, H/group,
# 2I/tp]`, `w13_qzeros [E, H/group, 2I/tp/8]`, ...
K_FIRST_METHODS = ("AutoGPTQMoEMethod", "AutoAWQMoEMethod")


def experts_module(layer: Any) -> Any:
    """The module holding the expert parameters: a `MoERunner`'s `routed_experts`, or the
    layer itself."""
    return getattr(layer, "routed_experts", layer)


# The names of an expert layer's gate/up and down weights: `w13_weight`, `w2_weight`,
# `w13_weight_packed`, `w2_weight_packed` (compressed-tensors' packed integer weights), or
# `w13_qweight`, `w2_qweight` (GPTQ's and AWQ's, in their Marlin and MoeWNA16 methods).
WEIGHT_PARAMETERS = (
    ("w13_weight", "w2_weight"),
    ("w13_weight_packed", "w2_weight_packed"),
    ("w13_qweight", "w2_qweight"),
)


def weight_parameters(layer: Any) -> tuple[str, str]:
    """The names of the layer's gate/up and down weights (`WEIGHT_PARAMETERS`)."""
    layer = experts_module(layer)
    for names in WEIGHT_PARAMETERS:
        if all(isinstance(getattr(layer, n, None), torch.Tensor) for n in names):
            return names
    return WEIGHT_PARAMETERS[1]


def _logical(num_experts: int, logical_of_physical: Sequence[int] | None) -> Any:
    """The checkpoint (logical) expert of a physical expert: vLLM's initial placement
    (redundant experts replicate `physical % num_experts`) unless `logical_of_physical`
    says otherwise."""
    if logical_of_physical is None:
        return lambda p: p % num_experts
    return lambda p: int(logical_of_physical[p])


def fused_shared_slots(layer: Any) -> int:
    """How many fused shared-expert slots follow the routed ones in `layer`'s expert
    parameters (vLLM's `fuse_shared_experts`, `num_fused_shared_experts`: ROCm AITER's, and
    DeepSeek-V4's where it fuses them). The model's `load_weights` fills them from the
    checkpoint's shared experts (quantizing them where the routed experts are quantized
    otherwise), never from the routed group: the adapter leaves them alone."""
    manager = getattr(experts_module(layer), "expert_map_manager", None)
    return int(getattr(manager, "num_fused_shared_experts", 0) or 0)


def local_experts_of(
    layer: Any, num_experts: int, logical_of_physical: Sequence[int] | None = None
) -> list[int]:
    """The checkpoint (logical) expert of each routed local slot of `layer` (fused
    shared-expert slots, which follow, are not included)."""
    layer = experts_module(layer)
    slots = getattr(layer, weight_parameters(layer)[0]).shape[0] - fused_shared_slots(layer)
    expert_map = getattr(layer, "expert_map", None)
    if expert_map is None:
        physical = list(range(slots))
    else:
        physical = [-1] * slots
        for expert, slot in enumerate(torch.as_tensor(expert_map).tolist()):
            if 0 <= slot < slots:
                physical[slot] = expert
        if -1 in physical:
            raise RequestError(f"expert_map leaves local slot {physical.index(-1)} empty")
    logical = _logical(num_experts, logical_of_physical)
    return [logical(p) for p in physical]


def global_experts_of(
    layer: Any, num_experts: int, logical_of_physical: Sequence[int] | None = None
) -> list[int]:
    """The checkpoint (logical) expert of every physical (global) expert of `layer`'s MoE
    layer, redundant (EPLB) experts included: the rows of tables vLLM keeps for all
    experts on every rank."""
    layer = experts_module(layer)
    expert_map = getattr(layer, "expert_map", None)
    if expert_map is None:
        physical = getattr(layer, weight_parameters(layer)[0]).shape[0]
    else:
        physical = len(expert_map)
    logical = _logical(num_experts, logical_of_physical)
    return [logical(p) for p in range(physical)]


def wants_interleaved(layer: Any, group: MoeLayer) -> bool:
    """Whether `layer` keeps gate and up interleaved in `w13_weight` (vLLM's `swigluoai`)."""
    layer = experts_module(layer)
    config = getattr(layer, "moe_config", None)
    activation = getattr(layer, "activation", None) or getattr(config, "activation", None)
    if activation is None:
        return group.interleaved
    return getattr(activation, "value", activation) == "swigluoai"


def tensor_parallel(layer: Any) -> tuple[int, int]:
    """The layer's MoE tensor-parallel `(rank, size)`."""
    layer = experts_module(layer)
    parallel = layer if hasattr(layer, "tp_rank") else layer.moe_config
    return int(parallel.tp_rank), int(parallel.tp_size)


def _method_name(layer: Any) -> str:
    return type(getattr(layer, "quant_method", None)).__name__


def _unquantized(layer: Any) -> bool:
    """`UnquantizedFusedMoEMethod` or a subclass (named, so that vLLM need not be imported)."""
    method = type(getattr(layer, "quant_method", None))
    return any(cls.__name__ == "UnquantizedFusedMoEMethod" for cls in method.__mro__)


def _global_input_scales(layer: Any, group: MoeLayer) -> bool:
    """NVFP4 methods whose kernels quantize with the scales of all experts (FlashInfer's,
    `use_global_sf`) keep input scales for every global expert on every EP rank."""
    method = getattr(layer, "quant_method", None)
    quantization = group.quantization
    return bool(
        getattr(method, "use_global_sf", False)
        and quantization is not None
        and quantization.companion("input_scale") is not None
    )


def _unverified(layer: Any, group: MoeLayer) -> str | None:
    """Why vLLM's own loading may write something else into `layer` than fastmoe_load."""
    moe_config = getattr(layer, "moe_config", None)
    method = _method_name(layer)
    if not getattr(moe_config, "is_act_and_mul", True):
        return "gate and up are not both in w13 (is_act_and_mul is false)"
    if group.quantization is None:
        if not _unquantized(layer):
            return f"unquantized experts in a layer of {method}"
        return None
    if method not in QUANTIZED_METHODS:
        return (
            f"{group.quantization} experts in a layer of {method}, not a method fastmoe_load fills"
        )
    return None


def wna16_of(layer: Any) -> Wna16 | None:
    """How a `MoeWNA16Method` layer keeps GPTQ or AWQ experts: from its quantization config
    (`linear_quant_method`, `weight_bits`, `has_zp`) and the group it serves (the layer's
    `group_size`, halved by `create_weights` until it divides I/tp and H); None for another
    method."""
    layer = experts_module(layer)
    method = getattr(layer, "quant_method", None)
    if type(method).__name__ != "MoeWNA16Method":
        return None
    config = method.quant_config
    linear = str(config.linear_quant_method)
    return Wna16(
        method="awq" if linear in ("awq", "awq_marlin") else linear,
        bits=int(config.weight_bits),
        group_size=int(layer.group_size),
        zero_points=bool(config.has_zp),
    )


def _split(layer: Any, group: MoeLayer) -> dict[str, Any]:
    """How vLLM splits and places the rank's share of `group` in `layer`: the `shard`,
    `padding`, `pad_fill` and `scale_refine` of its `ExpertLayerSpec`.

    - gpt-oss mxfp4 (`GptOssRoutedExperts` with `GptOssMxfp4MoEMethod`): vLLM's gpt-oss
      loader gives each rank `cdiv(I/32, tp)` whole 32-value blocks, the last rank fewer,
      in the leading corner of parameters its kernels may round up.
    - fp8 block scales where `I/tp` cuts the blocks (`fused_moe/oracle/fp8.py`): either a
      refined square grid (`Fp8MoEMethod.weight_scale_refine`, the scales upsampled), or
      block-aligned TP (`moe_config.tp_shard_with_padding`): each rank takes whole blocks,
      `round_up(I/tp, block)` rows, the last ranks short or empty, in parameters of that
      size whose padding is zero (weights) and one (scales).
    - otherwise the even split, placed as `FusedMoE.weight_loader` places values in
      parameters its kernels round up: gate and up each at the start of their half of `w13`.
    """
    moe_config = getattr(layer, "moe_config", None)
    method = getattr(layer, "quant_method", None)
    tp_rank, tp_size = tensor_parallel(layer)
    inter = group.intermediate_size
    if type(method).__name__ == "MoeWNA16Method":  # parameters of the rank's exact sizes
        return {}
    if type(layer).__name__ == "GptOssRoutedExperts":
        # Its bf16 path copies whole parameters: neither padding nor uneven splits load.
        if _method_name(layer) != "GptOssMxfp4MoEMethod":
            return {}
        if tp_size == 1:
            return {"padding": "corner"}
        chunk = -(-inter // 32 // tp_size) * 32
        first = min(tp_rank * chunk, inter)
        return {"shard": (first, min(chunk, inter - first)), "padding": "corner"}
    refine = getattr(method, "weight_scale_refine", None)
    quantization = group.quantization
    block = quantization.block_size if quantization is not None else None
    if refine is not None and block is not None:
        return {"scale_refine": block[0] // refine[0], "padding": "halves"}
    if getattr(moe_config, "tp_shard_with_padding", False):
        chunk = int(moe_config.intermediate_size_per_partition)
        first = min(tp_rank * chunk, inter)
        return {
            "shard": (first, min(chunk, inter - first)),
            "padding": "halves",
            "pad_fill": True,
        }
    return {"padding": "halves"}


def describe(
    layer: Any,
    ckpt: Checkpoint,
    prefix: str,
    *,
    logical_of_physical: Sequence[int] | None = None,
) -> ExpertLayerSpec:
    """The `ExpertLayerSpec` of a vLLM `FusedMoE` layer (or `MoERunner`) for the checkpoint's
    experts at `prefix`, from the attributes listed in this module's docstring."""
    layer = experts_module(layer)
    group = ckpt.experts(prefix)
    w13, w2 = weight_parameters(layer)
    names = {"w13": w13, "w2": w2}
    if group.has_bias and all(isinstance(getattr(layer, b, None), torch.Tensor) for b in BIASES):
        names |= {b: b for b in BIASES}
    global_experts: tuple[str, ...] = ()
    global_rows: list[int] = []
    wna16 = wna16_of(layer)
    if group.quantization is not None:
        for companion in group.quantization.companions:
            for target in ("w13", "w2"):
                names[f"{target}_{companion.kind}"] = f"{target}_{companion.kind}"
        if wna16 is not None:  # symmetric GPTQ's zero points: empty placeholders, dropped
            names = {d: n for d, n in names.items() if d in wna16.destinations()}
        if _global_input_scales(layer, group):
            global_experts = ("w13_input_scale", "w2_input_scale")
            global_rows = global_experts_of(layer, group.num_experts, logical_of_physical)
    experts = local_experts_of(layer, group.num_experts, logical_of_physical)
    # Fused shared-expert slots follow the routed ones: only the routed slots are filled.
    routed = len(experts) if fused_shared_slots(layer) else None
    parameters = {
        dest: getattr(layer, name).data[: None if dest in global_experts else routed]
        for dest, name in names.items()
        if isinstance(getattr(layer, name, None), torch.Tensor)
    }
    tp_rank, tp_size = tensor_parallel(layer)
    return ExpertLayerSpec(
        group=group,
        parameters=parameters,
        names=names,
        tp_rank=tp_rank,
        tp_size=tp_size,
        experts=experts,
        interleaved=wants_interleaved(layer, group),
        global_experts=global_experts,
        global_rows=global_rows,
        w2_bias_first_rank=True,
        # vLLM refuses compressed-tensors input scales that differ between gate and up.
        merged_must_agree=_method_name(layer).startswith("CompressedTensors"),
        unverified=_unverified(layer, group),
        k_first=_method_name(layer) in K_FIRST_METHODS,
        wna16=wna16,
        **_split(layer, group),
    )


def load_fused_moe_layer(
    layer: Any,
    ckpt: Checkpoint,
    prefix: str,
    *,
    logical_of_physical: Sequence[int] | None = None,
) -> list[str]:
    """Fills a vLLM `FusedMoE` layer with the experts at `prefix` (weights, biases and
    scales) for the layer's own TP rank and expert placement (see `describe`); returns the
    checkpoint tensor names it consumed. The whole layer is checked before the first byte
    is written (`RequestError`). Parameters of another dtype than the checkpoint's are
    converted as vLLM's own loader converts them (`copy_`)."""
    return fill_layer(ckpt, describe(layer, ckpt, prefix, logical_of_physical=logical_of_physical))
