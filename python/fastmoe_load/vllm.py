"""Filling vLLM `FusedMoE` layers from a checkpoint.

`load_fused_moe_layer(layer, ckpt, prefix)` reads what a vLLM `FusedMoE` layer knows about
itself and fills its parameters, so that an engine's own `load_weights` only handles the
names this returns. The layer is vLLM's `FusedMoE`, or, from vLLM 0.33 on, the `MoERunner`
that `FusedMoEFactory` builds (whose experts are its `routed_experts`). It relies on these
attributes of the experts module:

- `w13_weight [E_local, 2*I/tp, H]`, `w2_weight [E_local, H, I/tp]` (named
  `w13_weight_packed`, `w2_weight_packed` by compressed-tensors' `WNA16` method, int32 of
  eight int4 values along the input dimension: `[E_local, 2*I/tp, H/8]`), and for gpt-oss
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
  scales of all experts (FlashInfer's, `use_global_sf`) keep input scales for every global
  expert (`[E, 2]`, `[E]`) on every EP rank: those are filled for every expert;
- `tp_rank`, `tp_size` (or `moe_config.tp_rank`, `moe_config.tp_size`): the layer's MoE
  tensor-parallel rank and size;
- `expert_map` (optional): a tensor of one entry per physical (global) expert, holding its
  local slot or -1; absent or None without expert parallelism.

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

from ._fastmoe_load import RequestError
from .checkpoint import Checkpoint, MoeLayer
from .loader import destination_shapes, load_fused_moe


def weight_parameters(layer: Any) -> tuple[str, str]:
    """The names of the layer's gate/up and down weights: `w13_weight`, `w2_weight`, or
    `w13_weight_packed`, `w2_weight_packed` (compressed-tensors' packed integer weights)."""
    layer = getattr(layer, "routed_experts", layer)
    names = ("w13_weight", "w2_weight")
    if not all(isinstance(getattr(layer, n, None), torch.Tensor) for n in names):
        names = ("w13_weight_packed", "w2_weight_packed")
    return names


def local_experts_of(
    layer: Any, num_experts: int, logical_of_physical: Sequence[int] | None = None
) -> list[int]:
    """The checkpoint (logical) expert of each local slot of `layer`."""
    layer = getattr(layer, "routed_experts", layer)
    slots = getattr(layer, weight_parameters(layer)[0]).shape[0]
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
    if logical_of_physical is None:
        return [p % num_experts for p in physical]
    return [int(logical_of_physical[p]) for p in physical]


def wants_interleaved(layer: Any, group: MoeLayer) -> bool:
    """Whether `layer` keeps gate and up interleaved in `w13_weight` (vLLM's `swigluoai`)."""
    layer = getattr(layer, "routed_experts", layer)
    config = getattr(layer, "moe_config", None)
    activation = getattr(layer, "activation", None) or getattr(config, "activation", None)
    if activation is None:
        return group.interleaved
    return getattr(activation, "value", activation) == "swigluoai"


def scale_parameters(layer: Any, group: MoeLayer) -> dict[str, torch.Tensor]:
    """The layer's parameters for the checkpoint group's companions (`w13_weight_scale_inv`,
    ...), by name; raises `RequestError` naming any the layer lacks. Input scales of a
    method that keeps them for all global experts (`use_global_sf`) are left out: see
    `_fill_global_input_scales`."""
    if group.quantization is None:
        return {}
    layer = getattr(layer, "routed_experts", layer)
    names = [f"{t}_{c.kind}" for c in group.quantization.companions for t in ("w13", "w2")]
    missing = [n for n in names if not isinstance(getattr(layer, n, None), torch.Tensor)]
    if missing:
        raise RequestError(
            f"experts at `{group.prefix}` are {group.quantization}, but the layer has no "
            f"{', '.join(missing)}: build it with the checkpoint's quantization config"
        )
    if _global_input_scales(layer):
        names = [n for n in names if not n.endswith("input_scale")]
    return {n: getattr(layer, n).data for n in names}


def _global_input_scales(layer: Any) -> bool:
    return bool(getattr(getattr(layer, "quant_method", None), "use_global_sf", False))


def _fill_global_input_scales(layer: Any, group: MoeLayer) -> None:
    """`w13_input_scale [E, 2]` (gate's, up's) and `w2_input_scale [E]` of every global
    expert, as vLLM's loader fills them for a `use_global_sf` method: scalars, copied from
    the zero-copy views after checking the shapes."""
    w13, w2 = layer.w13_input_scale.data, layer.w2_input_scale.data
    n = group.num_experts
    if tuple(w13.shape) != (n, 2) or tuple(w2.shape) != (n,):
        raise RequestError(
            f"experts at `{group.prefix}`: global input scales of shapes {tuple(w13.shape)} "
            f"and {tuple(w2.shape)}, expected ({n}, 2) and ({n},)"
        )
    with torch.no_grad():
        for e in range(n):
            for column, matrix in enumerate(("w1", "w3")):
                w13[e, column] = group.companion("input_scale", matrix, e).reshape(())
            w2[e] = group.companion("input_scale", "w2", e).reshape(())


def tensor_parallel(layer: Any) -> tuple[int, int]:
    """The layer's MoE tensor-parallel `(rank, size)`."""
    layer = getattr(layer, "routed_experts", layer)
    parallel = layer if hasattr(layer, "tp_rank") else layer.moe_config
    return int(parallel.tp_rank), int(parallel.tp_size)


def destinations_of(layer: Any, group: MoeLayer) -> dict[str, tuple[torch.Tensor, tuple[int, ...]]]:
    """The layer's parameter for each destination `load_fused_moe` fills, with the shape of
    the values it takes there."""
    _, tp_size = tensor_parallel(layer)
    slots = getattr(layer, weight_parameters(layer)[0]).shape[0]
    exact = destination_shapes(group, slots, tp_size)
    w13, w2 = weight_parameters(layer)
    params = {"w13": getattr(layer, w13).data, "w2": getattr(layer, w2).data}
    b13, b2 = getattr(layer, "w13_bias", None), getattr(layer, "w2_bias", None)
    if group.has_bias and b13 is not None and b2 is not None:
        params |= {"w13_bias": b13.data, "w2_bias": b2.data}
    params |= scale_parameters(layer, group)
    return {name: (tensor, exact[name][0]) for name, tensor in params.items()}


def load_fused_moe_layer(
    layer: Any,
    ckpt: Checkpoint,
    prefix: str,
    *,
    logical_of_physical: Sequence[int] | None = None,
) -> list[str]:
    """Fills a vLLM `FusedMoE` layer with the experts at `prefix` (weights, biases and
    scales) for the layer's own TP rank and expert placement; returns the checkpoint tensor
    names it consumed. Parameters of another dtype than the checkpoint's are converted as
    vLLM's own loader converts them (`copy_`). Parameters larger than the rank's values
    (vLLM's gpt-oss layers round sizes up for some kernels) take them in their leading
    corner, as vLLM's gpt-oss loading leaves them, the rest untouched."""
    layer = getattr(layer, "routed_experts", layer)
    group = ckpt.experts(prefix)
    experts = local_experts_of(layer, group.num_experts, logical_of_physical)
    tp_rank, tp_size = tensor_parallel(layer)
    targets = destinations_of(layer, group)
    # A padded parameter takes its values through scratch on its device, then in its corner.
    scratch = {
        name: torch.empty(shape, dtype=tensor.dtype, device=tensor.device)
        for name, (tensor, shape) in targets.items()
        if tuple(tensor.shape) != shape
    }
    destinations = {name: scratch.get(name, tensor) for name, (tensor, _) in targets.items()}
    biases = {k: destinations[k] for k in ("w13_bias", "w2_bias") if k in destinations}
    scales: dict[str, torch.Tensor | None] = {
        k: v for k, v in destinations.items() if k not in ("w13", "w2", *biases)
    }
    quantization = group.quantization
    global_input_scales = bool(
        quantization and quantization.companion("input_scale") and _global_input_scales(layer)
    )
    if global_input_scales:  # every global expert's, filled below
        scales |= {"w13_input_scale": None, "w2_input_scale": None}
    load_fused_moe(
        ckpt,
        prefix,
        destinations["w13"],
        destinations["w2"],
        tp_rank=tp_rank,
        tp_size=tp_size,
        local_experts=experts,
        scales=scales,
        allow_cast=True,
        w13_interleaved=wants_interleaved(layer, group),
        **biases,
    )
    if global_input_scales:
        _fill_global_input_scales(layer, group)
    with torch.no_grad():
        if "w2_bias" in destinations and tp_rank > 0:
            destinations["w2_bias"].zero_()  # added once, before the all-reduce over TP ranks
        for name, values in scratch.items():
            target = targets[name][0]
            target[tuple(slice(0, n) for n in values.shape)].copy_(values)
    return list(group.tensor_names)
