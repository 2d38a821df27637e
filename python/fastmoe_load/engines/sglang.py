"""SGLang's `FusedMoE` layers as `ExpertLayerSpec`s (`engines.spec`), and filling them
(SGLang 0.5.23).

`fill_expert_layers(model, ckpt, location)` fills every expert layer of an SGLang model that
a checkpoint expert group names, for the layer's own TP rank and expert placement, through
the shared filler, and returns the checkpoint tensor names it consumed, so that the model's
own `load_weights` takes only the others (`engines.sglang_loader` is the model loader built
on it). This
module does not import SGLang; it relies on these attributes of an expert layer (`FusedMoE`
and its subclasses), which its tests pin:

- parameters `w13_weight [E_local, 2*I/tp, H]` (gate rows, then up rows; gpt-oss's
  interleaved rows stay interleaved) and `w2_weight [E_local, H, I/tp]`; the module is named
  as its checkpoint experts' prefix (`model.layers.N.mlp.experts`);
- `moe_tp_rank`, `moe_tp_size`; `moe_ep_rank` (or `_expert_storage_rank` under elastic EP);
  `num_local_experts` and `num_fused_shared_experts` (fused shared-expert slots follow the
  routed ones); `layer_id`, `uses_expert_location`;
- `quant_method` (an `UnquantizedFusedMoEMethod`), `weight_load_method` (None),
  `use_triton_kernels`, `use_flashinfer_trtllm_moe`, `use_presharded_weights` (all false)
  and `moe_runner_config.is_gated` (true): the layers whose `weight_loader` writes the
  layout above.

Placement, as `FusedMoE.weight_loader` does it: routed slot `s` of EP rank `r` holds
physical expert `p = r * R + s` (`R` routed slots per rank), which is checkpoint (logical)
expert `location.physical_to_logical_map_cpu[layer_id, p]` where SGLang has expert-location
metadata (EPLB, redundant experts; `get_global_expert_location_metadata()`) covering the
layer, else `p`.

Layers other than these are left, with their checkpoint tensors, to the model's
`load_weights`: quantized ones, those of another dtype than the checkpoint (no casts), those
whose kernels want another layout (triton-kernels' transposed weights, FlashInfer TRT-LLM's
up-first rows, pre-sharded or padded weights). Biases (gpt-oss) always go through
`load_weights`: SGLang keeps them in float32 and zeroes `w2` biases off TP rank 0 in the
model's code; fastmoe_load never casts. Fused shared-expert slots are filled by
`load_weights` from the checkpoint's `shared_experts`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .._fastmoe_load import RequestError
from ..checkpoint import Checkpoint, MoeLayer
from .spec import ExpertLayerSpec, fill_layer

logger = logging.getLogger("fastmoe_load")


def _unverified(layer: torch.nn.Module, group: MoeLayer) -> str | None:
    """Why SGLang's own `weight_loader` may write something else into `layer`."""
    method = type(layer.quant_method).__name__
    w13 = layer.w13_weight
    reasons = [
        (group.quantization is not None, f"{group.quantization} experts"),
        (method != "UnquantizedFusedMoEMethod", f"a layer of {method}"),
        (getattr(layer, "weight_load_method", None) is not None, "its own weight_load_method"),
        (layer.use_triton_kernels, "triton-kernels' transposed weights"),
        (layer.use_flashinfer_trtllm_moe, "FlashInfer TRT-LLM's up-first rows"),
        (layer.use_presharded_weights, "pre-sharded weights"),
        (not layer.moe_runner_config.is_gated, "a layer that is not gated"),
        (getattr(w13, "_sglang_require_global_experts", False), "every global expert's weights"),
        (
            w13.dtype != group.dtype or layer.w2_weight.dtype != group.dtype,
            f"{w13.dtype} parameters from {group.dtype} experts (SGLang's loader converts; "
            "its adapter does not cast)",
        ),
    ]
    found = [why for refused, why in reasons if refused]
    return f"SGLang's own loader takes {'; '.join(found)}" if found else None


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
    (`location`: see `logical_experts`): `w13_weight` and `w2_weight` in the checkpoint's
    gate/up arrangement; biases are left to the model's `load_weights`. Raises
    `RequestError` for a placement naming experts the group does not have."""
    experts = logical_experts(layer, location)
    bad = sorted({e for e in experts if not 0 <= e < group.num_experts})
    if bad:
        raise RequestError(
            f"{ckpt.path}: layer {layer.layer_id} places experts {bad} that `{group.prefix}` "
            f"(of {group.num_experts} experts) does not have"
        )
    slots = len(experts)
    return ExpertLayerSpec(
        group=group,
        parameters={"w13": layer.w13_weight.data[:slots], "w2": layer.w2_weight.data[:slots]},
        names={"w13": "w13_weight", "w2": "w2_weight"},
        tp_rank=int(layer.moe_tp_rank),
        tp_size=int(layer.moe_tp_size),
        experts=experts,
        interleaved=group.interleaved,
        unverified=_unverified(layer, group),
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
    `logical_experts`); returns the checkpoint tensor names consumed. The others are logged,
    each with why, and left to the model's `load_weights`."""
    modules = dict(model.named_modules())
    consumed: set[str] = set()
    left_to_model: list[str] = []
    for group in ckpt.moe_layers():
        layer = modules.get(group.prefix)
        parameters = getattr(layer, "_parameters", {})
        if "w13_weight" not in parameters or "w2_weight" not in parameters:
            left_to_model.append(f"`{group.prefix}`: names no expert layer of this rank")
            continue
        spec = describe(layer, ckpt, group, location)
        reason = spec.unfillable()
        if reason is not None:
            left_to_model.append(f"`{group.prefix}`: {reason}")
            continue
        consumed.update(fill_layer(ckpt, spec))
    if left_to_model:
        logger.info(
            "%s: %d expert group(s) left to %s.load_weights:\n  %s",
            ckpt.path,
            len(left_to_model),
            type(model).__name__,
            "\n  ".join(left_to_model),
        )
    return consumed
