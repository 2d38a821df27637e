"""SGLang's `FusedMoE` layers as `ExpertLayerSpec`s (`engines.spec`), and filling them
(SGLang 0.5.23).

`fill_expert_layers(model, ckpt, location)` fills every expert layer of an SGLang model that
a checkpoint expert group names, for the layer's own TP rank and expert placement, through
the shared filler, and returns the checkpoint tensor names it consumed, so that the model's
own `load_weights` takes only the others (`engines.sglang_loader` is the model loader built
on it). This module does not import SGLang; it relies on these attributes of an expert layer
(`FusedMoE` and its subclasses), which its tests pin:

- weights `w13_weight [E_local, 2*I/tp, H/pack]` (gate rows, then up rows; gpt-oss's
  interleaved rows stay interleaved) and `w2_weight [E_local, H, I/tp/pack]`, or the WNA16
  schemes' input-first `w13_weight_packed`, `w2_weight_packed`; the module is named as its
  checkpoint experts' prefix (`model.layers.N.mlp.experts`);
- `moe_tp_rank`, `moe_tp_size`; `moe_ep_rank` (or `_expert_storage_rank` under elastic EP),
  `moe_ep_size`; `num_local_experts` and `num_fused_shared_experts` (fused shared-expert
  slots follow the routed ones); `layer_id`, `uses_expert_location`;
- `quant_method` (and, for compressed-tensors, the layer's `scheme`), `weight_load_method`
  (None), `use_triton_kernels`, `use_flashinfer_trtllm_moe`, `use_presharded_weights` (all
  false) and `moe_runner_config.is_gated` (true): the layers whose `weight_loader` writes
  the layout above.

The layers filled, each checked bit for bit against SGLang's own `weight_loader` (and, for
gpt-oss, `GptOssForCausalLM`'s loading) at TP 1 and 2, on EP ranks with redundant experts:

- unquantized (`UnquantizedFusedMoEMethod`) of the checkpoint's dtype;
- fp8 with block scales (`Fp8MoEMethod`, DeepSeek-V3/R1, Qwen3-FP8): `w13_weight_scale_inv
  [E_local, 2*I/tp/128, H/128]`, `w2_weight_scale_inv [E_local, H/128, I/tp/128]` float32
  (SGLang requires I/tp to fall on the blocks);
- ModelOpt NVFP4 (`ModelOptNvFp4FusedMoEMethod`): uint8 weights, `w13_weight_scale` float8
  group scales, `w13_weight_scale_2 [E_local, 2]`, `w2_weight_scale_2 [E_local]`; its input
  scales are left to SGLang's loader (it keeps them for every physical expert, one value for
  gate and up, whichever it reads last);
- compressed-tensors int4 (`CompressedTensorsWNA16MoE`, symmetric, group strategy, Kimi-K2),
  input-first as SGLang transposes them: `w13_weight_packed [E_local, H/8, 2*I/tp]`,
  `w13_weight_scale [E_local, H/group, 2*I/tp]`, `w2_weight_packed [E_local, I/tp/8, H]`,
  `w2_weight_scale [E_local, I/tp/group, H]`, `w13_weight_shape` (the up projection's);
- gpt-oss mxfp4 (`Mxfp4MoEMethod`), as SGLang's gpt-oss loader cuts it: `cdiv(I/32, tp)`
  whole blocks per TP rank (the last fewer) in the leading corner of parameters its kernels
  may round up, and linear EP slices.

Placement, as `FusedMoE.weight_loader` does it: routed slot `s` of EP rank `r` holds
physical expert `p = r * R + s` (`R` routed slots per rank), which is checkpoint (logical)
expert `location.physical_to_logical_map_cpu[layer_id, p]` where SGLang has expert-location
metadata (EPLB, redundant experts; `get_global_expert_location_metadata()`) covering the
layer, else `p`.

Left, with their checkpoint tensors, to the model's `load_weights` (the log says why for
each): other quantization methods and variants (per-tensor fp8, whose single input scale
SGLang takes from whichever of gate and up it reads last; MXFP8 and FP4-expert `Fp8MoEMethod`
layers; NVFP4 quantized online; WNA16 with zero points, which SGLang does not transpose as it
does the weights, or with activation order; per-expert mxfp4); gpt-oss mxfp4 under EPLB
(its loader slices experts linearly); unquantized layers of another dtype than the checkpoint
(no casts); kernels that want another layout (triton-kernels' transposed weights, FlashInfer
TRT-LLM's or a method's up-first rows, pre-sharded or AITER-padded weights). Biases (gpt-oss)
always go through `load_weights`: SGLang keeps the bf16 model's in float32 and zeroes `w2`
biases off TP rank 0 in the model's code. Fused shared-expert slots are filled by
`load_weights` from the checkpoint's `shared_experts`: they are one dense MLP a layer
(1/257 of DeepSeek-V3's expert bytes), not an expert group the copy plans read, and SGLang
may quantize them on the way into FP4 slots or place them per EP rank (DeepEP).
"""

from __future__ import annotations

from typing import Any

import torch

from .._fastmoe_load import RequestError
from ..checkpoint import Checkpoint, MoeLayer
from .spec import ExpertLayerSpec, fill_layer, fill_layers, log_left_to_engine

# SGLang's quantized MoE methods (for compressed-tensors, its per-layer schemes) whose
# `FusedMoE.weight_loader` writes what fastmoe_load writes, checked against SGLang's own
# loading in its environment: DeepSeek-V3-style fp8 block scales, ModelOpt NVFP4,
# compressed-tensors WNA16 int4 (input-first) and gpt-oss mxfp4.
QUANTIZED_METHODS = (
    "Fp8MoEMethod",
    "ModelOptNvFp4FusedMoEMethod",
    "CompressedTensorsWNA16MoE",
    "CompressedTensorsWNA16TritonMoE",
    "Mxfp4MoEMethod",
)

# The WNA16 schemes: SGLang transposes each weight and scale (not zero points) as it loads
# it, so experts land input-first: `w13_weight_packed [E, H/8, 2*I/tp]`, `w13_weight_scale
# [E, H/group, 2*I/tp]`, `w2_weight_packed [E, I/tp/8, H]`, `w2_weight_scale [E,
# I/tp/group, H]`.
K_FIRST_METHODS = ("CompressedTensorsWNA16MoE", "CompressedTensorsWNA16TritonMoE")


def layout_method(layer: torch.nn.Module) -> Any:
    """The method whose layout SGLang's loader follows: a compressed-tensors layer's
    `scheme`, a wrapper's `weight_load_method`, else the layer's `quant_method`."""
    scheme = getattr(layer, "scheme", None)
    if scheme is not None:
        return scheme
    return getattr(layer, "weight_load_method", None) or layer.quant_method


def weight_parameters(layer: torch.nn.Module) -> tuple[str, str]:
    """The layer's gate/up and down weights: `w13_weight`, `w2_weight`, or the WNA16
    schemes' `w13_weight_packed`, `w2_weight_packed`."""
    parameters = getattr(layer, "_parameters", {})
    if "w13_weight_packed" in parameters and "w2_weight_packed" in parameters:
        return "w13_weight_packed", "w2_weight_packed"
    return "w13_weight", "w2_weight"


def _quantized_unverified(layer: torch.nn.Module, group: MoeLayer) -> str | None:
    """Why SGLang's loader may write other values or another arrangement than fastmoe_load
    for the quantized `group` in `layer`, or None."""
    method = layout_method(layer)
    name = type(method).__name__
    quantization = group.quantization
    assert quantization is not None
    if name not in QUANTIZED_METHODS:
        return f"{quantization} experts in a layer of {name}, not a method fastmoe_load fills"
    if getattr(method, "load_up_proj_weight_first", False):
        return f"{quantization} experts with up rows first ({name}.load_up_proj_weight_first)"
    if name == "Fp8MoEMethod":
        if getattr(method, "use_mxfp8", False) or getattr(method, "is_fp4_expert", False):
            return f"{quantization} experts in an MXFP8 or FP4-expert Fp8MoEMethod layer"
        if not method.block_quant or quantization.companion("weight_scale_inv") is None:
            return (
                f"{quantization} experts without block scales (SGLang keeps one input scale "
                "for gate and up, whichever it reads last)"
            )
    if name == "ModelOptNvFp4FusedMoEMethod" and not getattr(
        method.quant_config, "is_checkpoint_nvfp4_serialized", False
    ):
        return f"{quantization} experts quantized online to NVFP4 as SGLang loads them"
    if name in K_FIRST_METHODS:
        if quantization.companion("weight_zero_point") is not None:
            return f"{quantization} experts with zero points (SGLang does not transpose them)"
        if method.strategy != "group" or method.actorder not in (None, "static"):
            return f"{quantization} experts of strategy {method.strategy!r}, actorder " + repr(
                method.actorder
            )
    if name == "Mxfp4MoEMethod":
        # (SGLang builds it for serialized mxfp4 only: online quantization is another class.)
        if not group.format.startswith("fused") or quantization.weights != "mxfp4":
            return f"{quantization} experts other than gpt-oss's fused mxfp4 files"
    return None


def _unverified(layer: torch.nn.Module, group: MoeLayer, experts: list[int]) -> str | None:
    """Why SGLang's own `weight_loader` may write something else into `layer`."""
    method = type(layer.quant_method).__name__
    w13, w2 = (getattr(layer, n) for n in weight_parameters(layer))
    quantized = group.quantization is not None
    quantized_reason = _quantized_unverified(layer, group) if quantized else None
    reasons = [
        (quantized_reason is not None, quantized_reason or ""),
        (not quantized and method != "UnquantizedFusedMoEMethod", f"a layer of {method}"),
        (
            getattr(layer, "weight_load_method", None) is not None,
            "its own weight_load_method",
        ),
        (layer.use_triton_kernels, "triton-kernels' transposed weights"),
        (layer.use_flashinfer_trtllm_moe, "FlashInfer TRT-LLM's up-first rows"),
        (layer.use_presharded_weights, "pre-sharded weights"),
        (not layer.moe_runner_config.is_gated, "a layer that is not gated"),
        (getattr(w13, "_sglang_require_global_experts", False), "every global expert's weights"),
        (
            not quantized and (w13.dtype != group.dtype or w2.dtype != group.dtype),
            f"{w13.dtype} parameters from {group.dtype} experts (SGLang's loader converts; "
            "its adapter does not cast)",
        ),
        (
            _gpt_oss_mxfp4(layer, group) and experts != _linear(layer, group),
            "gpt-oss mxfp4 experts placed otherwise than its loader's linear EP slices "
            "(it reads no expert-location metadata)",
        ),
    ]
    found = [why for refused, why in reasons if refused]
    return f"SGLang's own loader takes {'; '.join(found)}" if found else None


def _gpt_oss_mxfp4(layer: torch.nn.Module, group: MoeLayer) -> bool:
    """gpt-oss's mxfp4 experts, which SGLang's `GptOssForCausalLM` loads itself (whole
    32-value blocks per TP rank, linear EP slices) through `weight_loader`'s copy of all
    experts at once."""
    return (
        type(layout_method(layer)).__name__ == "Mxfp4MoEMethod"
        and group.quantization is not None
        and group.quantization.weights == "mxfp4"
        and group.format.startswith("fused")
    )


def _linear(layer: torch.nn.Module, group: MoeLayer) -> list[int]:
    """The experts of `layer`'s EP rank in SGLang's gpt-oss mxfp4 loader: a linear slice of
    the checkpoint's experts."""
    count = group.num_experts // int(layer.moe_ep_size)
    rank = int(layer.moe_ep_rank)
    return list(range(rank * count, (rank + 1) * count))


def logical_experts(layer: torch.nn.Module, location: Any = None) -> list[int]:
    """The checkpoint expert of each routed slot of `layer`, as SGLang's `weight_loader`
    places them (fused shared-expert slots, which follow, are not included). `location`
    is SGLang's `ExpertLocationMetadata`, or None where it has none."""
    routed = int(layer.num_local_experts) - int(layer.num_fused_shared_experts)
    rank = int(getattr(layer, "_expert_storage_rank", layer.moe_ep_rank))
    physical = list(range(rank * routed, (rank + 1) * routed))
    if not layer.uses_expert_location or location is None:
        return physical
    mapping = location.physical_to_logical_map_cpu
    if layer.layer_id >= mapping.shape[0]:  # SGLang's identity for layers past its map
        return physical
    return [int(e) for e in mapping[layer.layer_id, physical]]


def describe(
    layer: torch.nn.Module, ckpt: Checkpoint, group: MoeLayer, location: Any = None
) -> ExpertLayerSpec:
    """The `ExpertLayerSpec` of the routed slots of an SGLang expert layer for `group`
    (`location`: see `logical_experts`): the weights in the checkpoint's gate/up arrangement
    and, for quantized experts, the scale parameters SGLang's method creates, named
    `w13_{kind}`/`w2_{kind}` after the checkpoint's companions (`w13_weight_scale_inv`,
    `w13_weight_scale`, `w13_weight_scale_2`, `w13_weight_shape`, ...). NVFP4 input scales
    are left to SGLang's loader (`ExpertLayerSpec.left_to_engine`): it keeps them for every
    physical expert, one value for gate and up, whichever it reads last. Biases are left to
    the model's `load_weights`. Raises `RequestError` for a placement naming experts the
    group does not have."""
    mxfp4 = _gpt_oss_mxfp4(layer, group)
    experts = _linear(layer, group) if mxfp4 else logical_experts(layer, location)
    bad = sorted({e for e in experts if not 0 <= e < group.num_experts})
    if bad:
        raise RequestError(
            f"{ckpt.path}: layer {layer.layer_id} places experts {bad} that `{group.prefix}` "
            f"(of {group.num_experts} experts) does not have"
        )
    # Against the layer's own placement: gpt-oss's loader may not place what it holds.
    unverified = _unverified(layer, group, logical_experts(layer, location))
    w13, w2 = weight_parameters(layer)
    names = {"w13": w13, "w2": w2}
    left_to_engine: tuple[str, ...] = ()
    quantization = group.quantization
    for companion in quantization.companions if quantization else ():
        for target in ("w13", "w2"):
            names[f"{target}_{companion.kind}"] = f"{target}_{companion.kind}"
        if companion.kind == "input_scale":
            left_to_engine += ("w13_input_scale", "w2_input_scale")
    slots = len(experts)
    parameters = {
        dest: getattr(layer, name).data[:slots]
        for dest, name in names.items()
        if dest not in left_to_engine and isinstance(getattr(layer, name, None), torch.Tensor)
    }
    split: dict[str, Any] = {}
    if mxfp4:
        # SGLang's gpt-oss loader: each TP rank takes cdiv(I/32, tp) whole blocks (the last
        # fewer), copied into the leading corner of parameters its kernels may round up.
        inter, tp_rank, tp_size = group.intermediate_size, layer.moe_tp_rank, layer.moe_tp_size
        chunk = -(-inter // 32 // tp_size) * 32
        first = min(tp_rank * chunk, inter)
        split = {"shard": (first, min(chunk, inter - first)), "padding": "corner"}
    return ExpertLayerSpec(
        group=group,
        parameters=parameters,
        names={k: v for k, v in names.items() if k not in left_to_engine},
        tp_rank=int(layer.moe_tp_rank),
        tp_size=int(layer.moe_tp_size),
        experts=experts,
        interleaved=group.interleaved,
        unverified=unverified,
        k_first=type(layout_method(layer)).__name__ in K_FIRST_METHODS,
        left_to_engine=left_to_engine,
        **split,
    )


def fill_expert_layer(
    layer: torch.nn.Module, ckpt: Checkpoint, group: MoeLayer, location: Any = None
) -> list[str]:
    """Fills the routed experts of the SGLang layer from `group` for the layer's TP rank and
    expert placement (see `describe`); returns the checkpoint tensor names consumed (biases
    are not). Everything is checked before the first byte is written (`RequestError`)."""
    return fill_layer(ckpt, describe(layer, ckpt, group, location))


def fill_expert_layers(model: torch.nn.Module, ckpt: Checkpoint, location: Any = None) -> set[str]:
    """Fills every SGLang expert layer named as a checkpoint expert group that fastmoe_load
    fills exactly as SGLang would (`ExpertLayerSpec.unfillable`; `location`: see
    `logical_experts`), all through one staging pipeline and all checked before the first
    byte is written (`fill_layers`); returns the checkpoint tensor names consumed. The others
    are logged, each with why, and left to the model's `load_weights`."""
    modules = dict(model.named_modules())
    specs = []
    left_to_model: list[str] = []
    for group in ckpt.moe_layers():
        layer = modules.get(group.prefix)
        parameters = getattr(layer, "_parameters", {})
        if layer is None or not all(n in parameters for n in weight_parameters(layer)):
            left_to_model.append(f"`{group.prefix}`: names no expert layer of this rank")
            continue
        spec = describe(layer, ckpt, group, location)
        reason = spec.unfillable()
        if reason is not None:
            left_to_model.append(f"`{group.prefix}`: {reason}")
            continue
        specs.append(spec)
    consumed = set(fill_layers(ckpt, specs))
    log_left_to_engine(ckpt, model, left_to_model)
    return consumed
