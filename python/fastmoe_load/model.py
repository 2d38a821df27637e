"""`load_model`: fill every weight of a model (transformers v5 or any `nn.Module` whose names
match the checkpoint's) from a checkpoint: routed experts through the copy plans, dense
tensors through the same threads and, on a GPU, the same pinned asynchronous pipeline."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ._fastmoe_load import RequestError
from .checkpoint import Checkpoint, MoeLayer
from .checkpoint import open as open_checkpoint
from .loader import Destination, fill, load_fused_moe, plan_destinations
from .placement import Strategy, expert_placement
from .progress import Progress

logger = logging.getLogger("fastmoe_load")


@dataclass
class ModelLoadReport:
    """What `load_model` did. `missing`: model weights the checkpoint did not provide (left as
    they were, or initialised by the model's own init if the model was on the meta device);
    `unexpected`: checkpoint tensors no weight took; `mismatched`: names found on both sides
    whose shapes do not fit, with the reason."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: dict[str, str] = field(default_factory=dict)
    expert_groups: int = 0
    bytes: int = 0
    seconds: float = 0.0

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")


@dataclass
class _Experts:
    """One checkpoint expert group and the model module it fills."""

    layer: MoeLayer
    module: torch.nn.Module
    path: str
    experts: list[int]
    transposed: bool
    interleaved: bool


def load_model(
    model: torch.nn.Module,
    ckpt: Checkpoint | str | os.PathLike[str],
    *,
    device: torch.device | str | None = None,
    tp_rank: int = 0,
    tp_size: int = 1,
    ep_rank: int = 0,
    ep_size: int = 1,
    placement: Strategy = "linear",
    expert_tp_rank: int | None = None,
    expert_tp_size: int | None = None,
    strict: bool = False,
    progress: bool | None = None,
) -> ModelLoadReport:
    """Fills `model`'s parameters and persistent buffers from `ckpt` (an open checkpoint or a
    path) on `device` (default: where the model is; a model on the meta device is
    materialised there first).

    Routed experts are matched to the model's expert modules in any checkpoint layout and
    written in the model's own layout. With `tp_size > 1` or `ep_size > 1` the model is
    expected to hold this rank's shards (expert modules sized for the rank's experts, and
    dense weights sliced along the one dimension where their shape differs from the
    checkpoint's). The experts are sliced by `expert_tp_rank` of `expert_tp_size` (default:
    `tp_rank` of `tp_size`); vLLM's expert parallelism, for one, keeps attention TP-sharded
    and experts whole (`expert_tp_size=1`) while `ep_size` places them. Names are matched
    through transformers' own checkpoint conversion rules for transformers models. Dtypes
    must match exactly: nothing is cast.

    Everything is matched and planned before a byte is written; with `strict=True`, missing,
    unexpected or mismatched names raise `RequestError` and the model stays untouched.
    A progress line shows on a terminal for loads longer than a second (`progress=False`, or
    `FASTMOE_LOAD_PROGRESS=0`, turns it off).
    """
    if not isinstance(model, torch.nn.Module):
        raise RequestError(f"load_model needs a torch.nn.Module, got {type(model).__name__}")
    own = not isinstance(ckpt, Checkpoint)
    checkpoint = open_checkpoint(ckpt) if own else ckpt
    try:
        return _load(
            model,
            checkpoint,
            device,
            (tp_rank, tp_size),
            (
                tp_rank if expert_tp_rank is None else expert_tp_rank,
                tp_size if expert_tp_size is None else expert_tp_size,
            ),
            ep_rank,
            ep_size,
            placement,
            strict,
            progress,
        )
    finally:
        if own:
            checkpoint.close()


def _load(
    model: torch.nn.Module,
    ckpt: Checkpoint,
    device: torch.device | str | None,
    dense_tp: tuple[int, int],
    expert_tp: tuple[int, int],
    ep_rank: int,
    ep_size: int,
    placement: Strategy,
    strict: bool,
    progress: bool | None,
) -> ModelLoadReport:
    target = _target_device(model, device)
    rename = _renamer(model)
    weights = model.state_dict(keep_vars=True)
    report = ModelLoadReport()

    groups, consumed = _match_experts(
        model, ckpt, rename, expert_tp[1], ep_size, ep_rank, placement, report
    )
    dense = _match_dense(ckpt, rename, weights, consumed, *dense_tp, report)
    filled = {name for g in groups for name in _expert_weight_names(g)} | {d.name for d in dense}
    report.missing = sorted(
        name for name, t in weights.items() if name not in filled and not _tied(t, filled, weights)
    )
    report.loaded = sorted(filled)
    if strict and (report.missing or report.unexpected or report.mismatched):
        raise RequestError(
            f"{ckpt.path}: the model and the checkpoint do not match: {_summary(report)}"
        )
    for name, reason in report.mismatched.items():
        logger.warning("not loaded: %s (%s)", name, reason)
    if report.missing:
        logger.info("model weights not in the checkpoint: %s", ", ".join(report.missing[:10]))
    if report.unexpected:
        logger.info(
            "checkpoint tensors the model has no place for: %s", ", ".join(report.unexpected[:10])
        )

    tensors = [*model.parameters(), *model.buffers()]
    materialise = any(t.device.type == "meta" for t in tensors)
    if materialise or any(t.device != target for t in tensors):
        # Fresh memory for a model on the meta device; a real model moves with its values.
        model.to_empty(device=target) if materialise else model.to(target)
        weights = model.state_dict(keep_vars=True)
        dense = [Destination(d.name, weights[d.name].detach(), d.plan) for d in dense]

    # Groups the model keeps in vLLM's layout are planned straight into their weights and
    # go through the pipeline with the dense tensors; the others (transposed, interleaved)
    # are loaded one by one through scratch tensors and rearranged on the device.
    native = [g for g in groups if not g.transposed and not g.interleaved]
    direct = dense + [d for g in native for d in _plan_experts(ckpt, g, *expert_tp)]
    rearranged = [g for g in groups if g not in native]
    total = sum(d.plan.nbytes for d in direct) + sum(_module_bytes(g) for g in rearranged)
    start = time.perf_counter()
    with Progress(total, "load", enabled=progress) as bar:
        report.bytes = fill(ckpt, direct, progress=bar)
        for group in rearranged:
            report.bytes += _fill_rearranged(ckpt, group, *expert_tp, target, bar)
        if target.type == "cuda":
            torch.cuda.current_stream(target).synchronize()
    report.seconds = time.perf_counter() - start
    report.expert_groups = len(groups)

    loaded = {id(weights[name]) for name in filled if name in weights}
    for tensor in weights.values():
        if id(tensor) in loaded:
            tensor._is_hf_initialized = True  # type: ignore[attr-defined]
    if materialise and hasattr(model, "initialize_weights"):
        model.initialize_weights()  # what the checkpoint lacks: non-persistent buffers, ...
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    logger.info(
        "loaded %d tensors and %d expert groups, %.2f GB in %.3f s (%.1f GB/s)",
        len(dense),
        len(groups),
        report.bytes / 1e9,
        report.seconds,
        report.gb_per_s,
    )
    return report


def _target_device(model: torch.nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        target = torch.device(device)
    else:
        real = [p.device for p in model.parameters() if p.device.type != "meta"]
        target = real[0] if real else torch.device("cpu")
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    return target


def _renamer(model: torch.nn.Module) -> Callable[[str], str]:
    """Checkpoint name -> model name, through transformers' checkpoint conversion rules
    (e.g. Mixtral's `block_sparse_moe` -> `mlp`); the identity for other models."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key

        transforms = get_model_conversion_mapping(model)
    except Exception:  # not a transformers model, or a transformers without these rules
        return lambda name: name
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    prefix = getattr(model, "base_model_prefix", None)
    meta = model.state_dict()

    def rename(name: str) -> str:
        return rename_source_key(name, renamings, converters, prefix, meta)[0]

    return rename


def _match_experts(
    model: torch.nn.Module,
    ckpt: Checkpoint,
    rename: Callable[[str], str],
    tp_size: int,
    ep_size: int,
    ep_rank: int,
    placement: Strategy,
    report: ModelLoadReport,
) -> tuple[list[_Experts], set[str]]:
    """Each checkpoint expert group and the model's expert module it fills, checked against
    the rank's expected shapes and dtypes."""
    groups, consumed = [], set()
    for layer in ckpt.moe_layers():
        path, module = _experts_module(model, rename(layer.tensor_names[0]))
        if module is None:
            report.unexpected.extend(layer.tensor_names)
            continue
        consumed.update(layer.tensor_names)
        experts = expert_placement(layer.num_experts, ep_size, ep_rank, placement)
        transposed, interleaved = _module_layout(module, layer)
        group = _Experts(layer, module, path, experts, transposed, interleaved)
        problems = _expert_mismatches(group, tp_size)
        if problems:
            report.mismatched.update(problems)
            continue
        groups.append(group)
        logger.info("experts %s (%s) -> %s", layer.prefix, layer.format, path)
    return groups, consumed


def _expert_mismatches(group: _Experts, tp_size: int) -> dict[str, str]:
    """What keeps the module from taking the rank's experts: shapes and dtypes by weight."""
    layer, n = group.layer, len(group.experts)
    h, inter = layer.hidden_size, layer.intermediate_size
    if inter % tp_size:
        return {f"{group.path}.gate_up_proj": f"I={inter} does not split over tp_size={tp_size}"}
    shard = inter // tp_size
    t = group.transposed
    expected = {
        "gate_up_proj": ((n, h, 2 * shard) if t else (n, 2 * shard, h), layer.dtype),
        "down_proj": ((n, shard, h) if t else (n, h, shard), layer.dtype),
    }
    if layer.has_bias and hasattr(group.module, "gate_up_proj_bias"):
        expected["gate_up_proj_bias"] = ((n, 2 * shard), layer.bias_dtype)
        expected["down_proj_bias"] = ((n, h), layer.bias_dtype)
    problems = {}
    for name, (shape, dtype) in expected.items():
        weight = getattr(group.module, name)
        if tuple(weight.shape) != shape or weight.dtype != dtype:
            problems[f"{group.path}.{name}"] = (
                f"{tuple(weight.shape)} {weight.dtype}, rank's experts {shape} {dtype}"
            )
    return problems


def _experts_module(model: torch.nn.Module, key: str) -> tuple[str, torch.nn.Module | None]:
    """The nearest module above weight name `key` that holds fused experts, and its path.
    A per-expert name that no conversion rule renamed (`...experts.0.w1.weight`) finds it too."""
    path = key
    while path:
        path = path.rpartition(".")[0]
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        weight = getattr(module, "gate_up_proj", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 3:
            return path, module
    return key, None


def _module_layout(module: torch.nn.Module, layer: MoeLayer) -> tuple[bool, bool]:
    """(transposed, interleaved) of a model's fused expert module: `gate_up_proj [E, H, 2I]`
    or `[E, 2I, H]`, gate/up halves or alternating rows. transformers states it on its expert
    modules; otherwise the shape decides, and a square shape is refused."""
    transposed = getattr(module, "is_transposed", None)
    if transposed is None:
        rows, cols = module.gate_up_proj.shape[1:]
        if rows == cols and type(module).__name__ != "Llama4TextExperts":
            raise RequestError(
                f"cannot tell whether {type(module).__name__}.gate_up_proj of shape "
                f"{tuple(module.gate_up_proj.shape)} is [E, 2I, H] or [E, H, 2I]"
            )
        # Llama 4's experts predate the flag and are transposed.
        transposed = rows == cols or rows == layer.hidden_size
    return bool(transposed), not getattr(module, "is_concatenated", True)


def _expert_weight_names(group: _Experts) -> list[str]:
    names = ["gate_up_proj", "down_proj"]
    if group.layer.has_bias:
        names += ["gate_up_proj_bias", "down_proj_bias"]
    return [f"{group.path}.{n}" for n in names if hasattr(group.module, n)]


def _match_dense(
    ckpt: Checkpoint,
    rename: Callable[[str], str],
    weights: dict[str, torch.Tensor],
    consumed: set[str],
    tp_rank: int,
    tp_size: int,
    report: ModelLoadReport,
) -> list[Destination]:
    """A plan for each checkpoint tensor outside the expert groups that has a model weight:
    whole, or the rank's slice along the one dimension where the shapes differ by tp_size."""
    destinations = []
    for name in ckpt.keys():
        if name in consumed:
            continue
        key = rename(name)
        weight = weights.get(key)
        if weight is None:
            report.unexpected.append(name)
            continue
        source = ckpt.tensor(name)
        if weight.dtype != source.dtype:
            report.mismatched[key] = f"dtype {weight.dtype}, checkpoint {source.dtype}: no cast"
            continue
        shard = _shard_dim(tuple(source.shape), tuple(weight.shape), tp_size)
        if shard is None:
            report.mismatched[key] = (
                f"shape {tuple(weight.shape)}, checkpoint {tuple(source.shape)}"
            )
            continue
        if not weight.is_contiguous():
            report.mismatched[key] = "not contiguous"
            continue
        if shard < 0:
            plan = ckpt._handle.tensor_plan(name)
        else:
            plan = ckpt._handle.tensor_plan(name, dim=shard, rank=tp_rank, size=tp_size)
        plan.check_intact()
        destinations.append(Destination(key, weight.detach(), plan))
    return destinations


def _shard_dim(source: tuple[int, ...], target: tuple[int, ...], tp_size: int) -> int | None:
    """-1 if the shapes are equal, the dimension a TP shard is cut along, or None."""
    if source == target:
        return -1
    if len(source) != len(target) or tp_size < 2:
        return None
    differ = [d for d, (s, t) in enumerate(zip(source, target, strict=True)) if s != t]
    if len(differ) == 1 and source[differ[0]] == target[differ[0]] * tp_size:
        return differ[0]
    return None


def _tied(tensor: torch.Tensor, filled: set[str], weights: dict[str, torch.Tensor]) -> bool:
    """Whether `tensor` is a weight being loaded under another name (tied embeddings)."""
    return any(weights[n] is tensor for n in filled if n in weights)


def _summary(report: ModelLoadReport) -> str:
    parts = []
    for label, names in (("missing", report.missing), ("unexpected", report.unexpected)):
        if names:
            parts.append(
                f"{len(names)} {label} ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
            )
    if report.mismatched:
        items = [f"{k}: {v}" for k, v in list(report.mismatched.items())[:5]]
        parts.append(f"{len(report.mismatched)} mismatched ({'; '.join(items)})")
    return "; ".join(parts)


def _plan_experts(
    ckpt: Checkpoint, group: _Experts, tp_rank: int, tp_size: int
) -> list[Destination]:
    """Plans of a group whose module has vLLM's layout, straight into its weights."""
    m = group.module
    with_bias = group.layer.has_bias and hasattr(m, "gate_up_proj_bias")
    return plan_destinations(
        ckpt,
        group.layer.prefix,
        m.gate_up_proj.data,
        m.down_proj.data,
        tp_rank=tp_rank,
        tp_size=tp_size,
        local_experts=group.experts,
        w13_bias=m.gate_up_proj_bias.data if with_bias else None,
        w2_bias=m.down_proj_bias.data if with_bias else None,
    )


def _module_bytes(group: _Experts) -> int:
    """Bytes a group's expert weights hold (what loading them writes)."""
    return sum(
        getattr(group.module, name[len(group.path) + 1 :]).nbytes
        for name in _expert_weight_names(group)
    )


def _fill_rearranged(
    ckpt: Checkpoint,
    group: _Experts,
    tp_rank: int,
    tp_size: int,
    target: torch.device,
    progress: Progress,
) -> int:
    """Loads a group into scratch tensors in vLLM's layout, then rearranges them into the
    module's own (transposed and/or interleaved) layout on the device."""
    layer = group.layer
    n, shard, h = len(group.experts), layer.intermediate_size // tp_size, layer.hidden_size
    w13 = torch.empty(n, 2 * shard, h, dtype=layer.dtype, device=target)
    w2 = torch.empty(n, h, shard, dtype=layer.dtype, device=target)
    b13 = b2 = None
    if layer.has_bias and hasattr(group.module, "gate_up_proj_bias"):
        b13 = torch.empty(n, 2 * shard, dtype=layer.bias_dtype, device=target)
        b2 = torch.empty(n, h, dtype=layer.bias_dtype, device=target)
    stats = load_fused_moe(
        ckpt,
        layer.prefix,
        w13,
        w2,
        tp_rank=tp_rank,
        tp_size=tp_size,
        local_experts=group.experts,
        w13_bias=b13,
        w2_bias=b2,
        progress=progress,
    )
    _rearrange(group, w13, w2, b13, b2, shard)
    return stats.bytes


@torch.no_grad()
def _rearrange(
    group: _Experts,
    w13: torch.Tensor,
    w2: torch.Tensor,
    b13: torch.Tensor | None,
    b2: torch.Tensor | None,
    shard: int,
) -> None:
    """Writes vLLM-layout experts into a transposed and/or interleaved module, on the device
    (in stream order after the load)."""
    m = group.module
    gate, up = w13[:, :shard], w13[:, shard:]
    if group.transposed:
        gate, up = gate.transpose(1, 2), up.transpose(1, 2)  # [E, H, I]
        m.down_proj.copy_(w2.transpose(1, 2))
    else:
        m.down_proj.copy_(w2)
    axis = 2 if group.transposed else 1  # the 2I axis of gate_up_proj
    if group.interleaved:
        pairs = m.gate_up_proj.unflatten(axis, (shard, 2))
        pairs.select(axis + 1, 0).copy_(gate)
        pairs.select(axis + 1, 1).copy_(up)
    else:
        m.gate_up_proj.copy_(torch.cat([gate, up], dim=axis))
    if b13 is not None and b2 is not None:
        if group.interleaved:
            pairs = m.gate_up_proj_bias.unflatten(1, (shard, 2))
            pairs[:, :, 0].copy_(b13[:, :shard])
            pairs[:, :, 1].copy_(b13[:, shard:])
        else:
            m.gate_up_proj_bias.copy_(b13)
        m.down_proj_bias.copy_(b2)
