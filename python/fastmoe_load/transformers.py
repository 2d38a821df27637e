"""`load_model`: fill every weight of a model (transformers v5 or any `nn.Module` whose names
match the checkpoint's) from a checkpoint: routed experts through the copy plans, dense
tensors through the same threads and, on a GPU, the same pinned asynchronous pipeline."""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import _fastmoe_load as native
from ._fastmoe_load import RequestError
from ._text import plural
from ._validate import as_index, device_problem
from .checkpoint import Checkpoint, MoeLayer
from .checkpoint import open as open_checkpoint
from .loader import Destination, destination_shapes, fill, load_fused_moe, plan_destinations
from .placement import Strategy, expert_placement
from .progress import Progress

logger = logging.getLogger("fastmoe_load")


# Casts that keep every value exactly. transformers makes them when a model keeps a weight
# wider than the checkpoint stores it (DeepSeek-V3's float32 router over a bfloat16
# release) or is built in float32; so does `load_model`, on the device after the transfer.
# Narrowing loses bits and is refused: the model is then built in the wrong dtype.
WIDENING = frozenset(
    {
        (getattr(torch, "float8_e8m0fnu", torch.float32), torch.float32),  # UE8M0 scales
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float64),
        (torch.float16, torch.float64),
        (torch.float32, torch.float64),
    }
)
# Device memory for tensors stored narrower than the model holds them, at a time.
CAST_SCRATCH_BYTES = 256 << 20
# Names a message or a summary shows of each list before "and N more".
SHOWN_NAMES = 5


class LoadWarning(UserWarning):
    """What a `load_model` without `strict` could not load (missing, unexpected or
    mismatched weights, tied weights stored apart). Shown by default, like every warning;
    `warnings.filterwarnings("ignore", category=fml.LoadWarning)` silences it."""


@dataclass(repr=False)
class ModelLoadReport:
    """What `load_model` did, by model weight name (as `model.state_dict()` names them).

    `loaded`: weights that now hold the checkpoint's values, tied ones included.
    `missing`: weights the checkpoint does not provide (left as they were, or initialised by
    the model's own init if the model was on the meta device).
    `unexpected`: checkpoint tensors no weight took.
    `mismatched`: weights the checkpoint provides in a shape or dtype they cannot take, with
    the reason (never also listed as missing).
    `cast`: weights stored narrower than the model holds them, widened exactly on the
    device ("torch.bfloat16 -> torch.float32").
    `tied`: weights sharing the tensor of another loaded weight (tied embeddings), and that
    weight. `untied`: weights the model ties but the checkpoint stores with different values,
    each loaded into a tensor of its own (as transformers does).
    `bytes`: bytes read from the checkpoint and landed; `seconds`: wall time of the copies.
    `str(report)` is a short summary; the fields hold every name.
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: dict[str, str] = field(default_factory=dict)
    cast: dict[str, str] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)
    untied: list[str] = field(default_factory=list)
    expert_groups: int = 0
    bytes: int = 0
    seconds: float = 0.0
    # The dtypes that would have loaded the weights refused for narrowing: the dtype to
    # build the model in, for the error message.
    _wanted_dtypes: set[torch.dtype] = field(default_factory=set, init=False, compare=False)

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")

    def summary(self) -> str:
        """One line of counts, bytes and time; the fields hold the names."""
        counts = [plural(self.expert_groups, "expert group")]
        for label, names in (("widened", self.cast), ("tied", self.tied), ("untied", self.untied)):
            if names:
                counts.append(f"{len(names)} {label}")
        return (
            f"loaded {plural(len(self.loaded), 'weight')} ({', '.join(counts)}); "
            f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, "
            f"{len(self.mismatched)} mismatched; "
            f"{_gigabytes(self.bytes)} in {self.seconds:.3f} s"
        )

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return f"ModelLoadReport({self.summary()})"


@dataclass
class _Experts:
    """One checkpoint expert group and the model module it fills."""

    layer: MoeLayer
    module: torch.nn.Module
    path: str
    experts: list[int]
    transposed: bool
    interleaved: bool
    # The module holds the experts wider than the checkpoint stores them.
    cast: bool = False
    # The module holds mxfp4 experts dequantized (as transformers builds gpt-oss without
    # its mxfp4 kernels).
    dequantize: bool = False
    # The module's gate, up and down weights where it keeps each stacked over all experts,
    # `[E·I, H]` as the checkpoint does (transformers' DBRX: `mlp.w1`, `mlp.v1`, `mlp.w2`).
    stacked: tuple[str, str, str] | None = None


@dataclass
class _Dense:
    """One checkpoint tensor outside the expert groups and the model weight it fills:
    `plan` reads the rank's part of `source`, stored as `dtype`."""

    name: str
    source: str
    plan: native.CopyPlan
    dtype: torch.dtype
    cast: bool


@dataclass
class _TieGroup:
    """Names of one tensor the model shares between several weights (tied embeddings):
    after loading they share the tensor of `keeper` (the loaded name, else the first), or,
    when the checkpoint stores them with different values (`untied`), each has its own."""

    names: list[str]
    keeper: str
    untied: bool = False


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
    materialised there first), and returns a `ModelLoadReport`.

    Routed experts are matched to the model's expert modules in any checkpoint layout and
    written in the model's own layout (fused `gate_up_proj`/`down_proj`, or DBRX's `w1`,
    `v1`, `w2` stacked `[E·I, H]`). With `tp_size > 1` or `ep_size > 1` the model is
    expected to hold this rank's shards (expert modules sized for the rank's experts, and
    dense weights sliced along the one dimension where their shape differs from the
    checkpoint's). The experts are sliced by `expert_tp_rank` of `expert_tp_size` (default:
    `tp_rank` of `tp_size`); vLLM's expert parallelism, for one, keeps attention TP-sharded
    and experts whole (`expert_tp_size=1`) while `ep_size` places them. Names are matched
    through transformers' own checkpoint conversion rules for transformers models.

    The model's weights and buffers end as transformers' `from_pretrained` leaves them (its
    train/eval mode stays the caller's: `from_pretrained` also calls `eval()`). Weights the
    model holds wider than the checkpoint stores them (a float32 router over bfloat16, a model
    built in float32) are widened exactly on the device after the transfer (`report.cast`);
    narrower ones are refused (build the model in the checkpoint's dtype). Tied weights (tied
    embeddings) take whichever of their names the checkpoint stores, and are loaded apart
    when it stores them with different values (`report.tied`, `report.untied`).

    Everything is matched and planned before a byte is written. Raises `RequestError`,
    leaving the model untouched, when no checkpoint tensor fits the model at all, when an
    argument is out of range, and with `strict=True` when any weight is missing,
    unexpected or mismatched. Without `strict`, what was not loaded is told in a
    `LoadWarning`. A progress line shows on a terminal for loads longer than a second
    (`progress=False`, or `FASTMOE_LOAD_PROGRESS=0`, turns it off).
    """
    if not isinstance(model, torch.nn.Module):
        raise RequestError(f"load_model needs a torch.nn.Module, got {type(model).__name__}")
    _target_device(model, device)  # a device that cannot be used, before any work
    dense_tp = _rank_of("tp", tp_rank, tp_size)
    expert_tp = _rank_of(
        "expert_tp",
        tp_rank if expert_tp_rank is None else expert_tp_rank,
        tp_size if expert_tp_size is None else expert_tp_size,
    )
    ep = _rank_of("ep", ep_rank, ep_size)
    own = not isinstance(ckpt, Checkpoint)
    checkpoint = open_checkpoint(ckpt) if own else ckpt
    try:
        report = _load(
            model, checkpoint, device, dense_tp, expert_tp, ep, placement, strict, progress
        )
        problems = "; ".join(filter(None, [_problems(report), _untied(report)]))
        if problems:
            problems = "; ".join(filter(None, [problems, _advice(report, model, checkpoint)]))
            where = f"{checkpoint.path} into {type(model).__name__}"
    finally:
        if own:
            checkpoint.close()
    if problems:
        warnings.warn(f"{where}: {problems}", LoadWarning, stacklevel=2)
    return report


def _rank_of(kind: str, rank: object, size: object) -> tuple[int, int]:
    size = as_index(size, f"{kind}_size", minimum=1)
    rank = as_index(rank, f"{kind}_rank")
    if rank >= size:
        raise RequestError(f"{kind}_rank {rank} is not in [0, {kind}_size={size})")
    return rank, size


def _load(
    model: torch.nn.Module,
    ckpt: Checkpoint,
    device: torch.device | str | None,
    dense_tp: tuple[int, int],
    expert_tp: tuple[int, int],
    ep: tuple[int, int],
    placement: Strategy,
    strict: bool,
    progress: bool | None,
) -> ModelLoadReport:
    target = _target_device(model, device)
    rename = _renamer(model)
    weights = model.state_dict(keep_vars=True)
    report = ModelLoadReport()
    scope = _scope(expert_tp, ep)

    groups, consumed = _match_experts(
        model, ckpt, rename, expert_tp[1], ep, placement, scope, report
    )
    dense = _match_dense(ckpt, rename, weights, consumed, dense_tp, report)
    ties = _resolve_ties(ckpt, weights, dense, report)
    loaded = {n for g in groups for n in _expert_weight_names(g)} | {d.name for d in dense}
    loaded |= report.tied.keys()
    report.loaded = sorted(loaded)
    report.missing = sorted(
        name for name in weights if name not in loaded and name not in report.mismatched
    )
    if weights and not report.loaded:
        raise RequestError(
            f"{ckpt.path}: no tensor of the checkpoint fits {type(model).__name__}, nothing "
            f"was loaded: {_problems(report)}{_then(_advice(report, model, ckpt))}"
        )
    if strict and _problems(report):
        raise RequestError(
            f"{ckpt.path}: the checkpoint does not fit {type(model).__name__} (strict=True; "
            f"nothing was written): {_problems(report)}{_then(_advice(report, model, ckpt))}"
        )

    tensors = [*model.parameters(), *model.buffers()]
    materialise = any(t.device.type == "meta" for t in tensors)
    if materialise or any(t.device != target for t in tensors):
        # Fresh memory for a model on the meta device; a real model moves with its values.
        model.to_empty(device=target) if materialise else model.to(target)
    _bind_ties(model, ties)  # `to_empty` gives every name a tensor of its own
    weights = model.state_dict(keep_vars=True)

    # Groups the model keeps in vLLM's layout and dtype are planned straight into their
    # weights and go through the pipeline with the dense tensors; the others (transposed,
    # interleaved, stacked, widened) are loaded one by one through scratch tensors and rearranged
    # on the device. Dense tensors to widen land in scratch memory first too.
    native = [
        g
        for g in groups
        if not (g.transposed or g.interleaved or g.cast or g.dequantize or g.stacked)
    ]
    direct = [Destination(d.name, weights[d.name].detach(), d.plan) for d in dense if not d.cast]
    direct += [d for g in native for d in _plan_experts(ckpt, g, *expert_tp)]
    rearranged = [g for g in groups if g not in native]
    widened = [d for d in dense if d.cast]
    total = sum(d.plan.nbytes for d in [*direct, *widened])
    total += sum(_stored_bytes(g, expert_tp[1]) for g in rearranged)
    start = time.perf_counter()
    with Progress(total, "load", enabled=progress) as bar:
        report.bytes = fill(ckpt, direct, progress=bar)
        for group in rearranged:
            report.bytes += _fill_rearranged(ckpt, group, *expert_tp, target, bar)
        report.bytes += _fill_widened(ckpt, widened, weights, target, bar)
        if target.type == "cuda":
            torch.cuda.current_stream(target).synchronize()
    report.seconds = time.perf_counter() - start
    report.expert_groups = len(groups)

    for name in report.loaded:
        weights[name]._is_hf_initialized = True  # type: ignore[attr-defined]
    if materialise and hasattr(model, "initialize_weights"):
        model.initialize_weights()  # what the checkpoint lacks: non-persistent buffers, ...
    logger.info(
        "%s: loaded %s and %s, %.2f GB in %.3f s (%.1f GB/s)",
        ckpt.path,
        plural(len(dense), "dense tensor"),
        plural(len(groups), "expert group"),
        report.bytes / 1e9,
        report.seconds,
        report.gb_per_s,
    )
    return report


def _scope(expert_tp: tuple[int, int], ep: tuple[int, int]) -> str | None:
    """How messages name the experts a rank holds ("TP rank 1 of 2, EP rank 0 of 4"), or
    None without TP or EP."""
    ranks = (("TP", expert_tp), ("EP", ep))
    return ", ".join(f"{kind} rank {r} of {n}" for kind, (r, n) in ranks if n > 1) or None


def _target_device(model: torch.nn.Module, device: torch.device | str | None) -> torch.device:
    """Where the model is loaded; raises `RequestError` for a device fastmoe_load cannot
    load into here (no such CUDA device, or not a CPU or CUDA one), before anything is
    allocated."""
    if device is not None:
        what = f"device={str(device)!r}"
    else:
        real = [p.device for p in model.parameters() if p.device.type != "meta"]
        device = real[0] if real else torch.device("cpu")
        what = f"the model's device, {device}"
    problem = device_problem(device, "use device='cpu'")
    if problem is not None:
        raise RequestError(f"load_model: {what}: {problem}")
    target = torch.device(device)
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
    ep: tuple[int, int],
    placement: Strategy,
    scope: str | None,
    report: ModelLoadReport,
) -> tuple[list[_Experts], set[str]]:
    """Each checkpoint expert group and the model's expert module it fills, checked against
    the rank's expected shapes and dtypes."""
    groups, consumed = [], set()
    for layer in ckpt.moe_layers():
        stacked = _stacked_module(model, layer, rename)
        if stacked is not None:
            path, module, weights = stacked
        else:
            path, module = _experts_module(model, rename(layer.tensor_names[0]))
        if module is None:
            continue  # left to the dense tensors: a weight of the same name, or unexpected
        consumed.update(layer.tensor_names)
        experts = expert_placement(layer.num_experts, ep[1], ep[0], placement)
        transposed, interleaved = (False, False) if stacked else _module_layout(module, layer)
        group = _Experts(layer, module, path, experts, transposed, interleaved)
        group.stacked = weights if stacked else None
        if not _check_experts(group, tp_size, scope, report):
            continue
        groups.append(group)
        logger.info("experts %s (%s) -> %s", layer.prefix, layer.format, path)
    return groups, consumed


def _check_experts(
    group: _Experts, tp_size: int, scope: str | None, report: ModelLoadReport
) -> bool:
    """Whether the module takes the rank's experts (shapes, and dtypes equal or widened);
    records what does not fit, and the casts."""
    layer, n = group.layer, len(group.experts)
    h, inter = layer.hidden_size, layer.intermediate_size
    if inter % tp_size:
        report.mismatched[f"{group.path}.gate_up_proj"] = (
            f"the intermediate size {inter} does not split over expert TP size {tp_size}"
        )
        return False
    shard = inter // tp_size
    t = group.transposed
    module_dtype = getattr(
        group.module, group.stacked[0] if group.stacked else "gate_up_proj"
    ).dtype
    # transformers dequantizes gpt-oss' mxfp4 experts where it has no mxfp4 kernels (on a
    # CPU, or without the `kernels` package): so does this loader, with transformers' own
    # conversion.
    group.dequantize = bool(
        layer.quantization
        and layer.quantization.weights == "mxfp4"
        and module_dtype.is_floating_point
    )
    weights_dtype = module_dtype if group.dequantize else layer.dtype
    expected = {
        "gate_up_proj": ((n, h, 2 * shard) if t else (n, 2 * shard, h), weights_dtype),
        "down_proj": ((n, shard, h) if t else (n, h, shard), weights_dtype),
    }
    if group.stacked:  # each the rank's experts, one after the other: [E_local·I/tp, H]
        expected = {name: ((n * shard, h), layer.dtype) for name in group.stacked}
    if layer.has_bias and hasattr(group.module, "gate_up_proj_bias"):
        expected["gate_up_proj_bias"] = ((n, 2 * shard), layer.bias_dtype)
        expected["down_proj_bias"] = ((n, h), layer.bias_dtype)
    scales = {} if group.dequantize else _scale_weights(layer, n, shard)
    expected |= scales
    whose = f"this rank's experts ({scope})" if scope else "the checkpoint's experts"
    problems, casts = {}, {}
    unquantized = layer.quantization and module_dtype != weights_dtype
    for name, (shape, dtype) in expected.items():
        weight = getattr(group.module, name, None)
        key = f"{group.path}.{name}"
        if unquantized or not isinstance(weight, torch.Tensor):
            problems[key] = (
                f"the checkpoint's experts are {layer.quantization}; "
                f"{type(group.module).__name__} does not hold them so: build the model with the "
                "checkpoint's quantization_config (transformers' FP8 modules); fastmoe_load does "
                "not dequantize"
            )
        elif tuple(weight.shape) != shape:
            problems[key] = f"{tuple(weight.shape)} in the model, {whose} are {shape}"
        elif weight.dtype != dtype:
            if (dtype, weight.dtype) in WIDENING:
                casts[key] = f"{dtype} -> {weight.dtype}"
            else:
                problems[key] = _dtype_mismatch(weight.dtype, dtype, report)
    if problems:
        # The group loads whole or not at all: its other weights are not missing either.
        for name in expected:
            problems.setdefault(f"{group.path}.{name}", "the rest of its expert group does not fit")
        report.mismatched.update(problems)
        return False
    report.cast.update(casts)
    # Scales widen in the expert plans themselves; widened weights are loaded apart.
    group.cast = any(key.removeprefix(f"{group.path}.") not in scales for key in casts)
    return True


def _scale_weights(
    layer: MoeLayer, experts: int, shard: int
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The scale weights transformers' `FP8Experts` holds for a quantized group
    (`gate_up_proj_scale_inv`, `down_proj_scale_inv`, ...), with their shapes and the
    checkpoint's dtypes."""
    scales = {}
    for c in layer.quantization.companions if layer.quantization else ():
        suffix = c.fused_suffix or f"_{c.kind}"
        for stem, proj in (("w13", "gate_up_proj"), ("w2", "down_proj")):
            shape = c.fused_shape(stem, experts, layer.hidden_size, shard)
            scales[f"{proj}{suffix}"] = (shape, c.dtype)
    return scales


def _dtype_mismatch(model: torch.dtype, stored: torch.dtype, report: ModelLoadReport) -> str:
    """Why a weight of dtype `model` cannot take a tensor stored as `stored`."""
    if stored.is_floating_point and model.is_floating_point:
        report._wanted_dtypes.add(stored)
        return f"{model} in the model, {stored} in the checkpoint (a cast would not be exact)"
    return f"{model} in the model, {stored} in the checkpoint (not cast)"


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


def _stacked_module(
    model: torch.nn.Module, layer: MoeLayer, rename: Callable[[str], str]
) -> tuple[str, torch.nn.Module, tuple[str, str, str]] | None:
    """For a stacked group (DBRX), the model module that holds its gate, up and down as 2-D
    weights of one module (transformers' `DbrxExpertGLU`), its path, and the weights' names
    in it."""
    if layer.format != "stacked":
        return None
    paths = [rename(name).rpartition(".") for name in layer.tensor_names]
    if len({path for path, _, _ in paths}) != 1:
        return None
    path = paths[0][0]
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    gate, up, down = (name for _, _, name in paths)
    weights = [getattr(module, name, None) for name in (gate, up, down)]
    if not all(isinstance(w, torch.Tensor) and w.dim() == 2 for w in weights):
        return None
    return path, module, (gate, up, down)


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
    if group.stacked:
        return [f"{group.path}.{n}" for n in group.stacked]
    names = ["gate_up_proj", "down_proj"]
    if group.layer.has_bias:
        names += ["gate_up_proj_bias", "down_proj_bias"]
    names += _scale_weights(group.layer, len(group.experts), 1)
    return [f"{group.path}.{n}" for n in names if hasattr(group.module, n)]


def _match_dense(
    ckpt: Checkpoint,
    rename: Callable[[str], str],
    weights: dict[str, torch.Tensor],
    consumed: set[str],
    tp: tuple[int, int],
    report: ModelLoadReport,
) -> list[_Dense]:
    """A plan for each checkpoint tensor outside the expert groups that has a model weight:
    whole, or the rank's slice along the one dimension where the shapes differ by tp_size."""
    tp_rank, tp_size = tp
    dense = []
    for name in ckpt.keys():
        if name in consumed:
            continue
        key = rename(name)
        weight = weights.get(key)
        if weight is None:
            report.unexpected.append(name)
            continue
        source = ckpt.tensor(name)
        shard = _shard_dim(tuple(source.shape), tuple(weight.shape), tp_size)
        if shard is None:
            report.mismatched[key] = (
                f"{tuple(weight.shape)} in the model, {tuple(source.shape)} in the checkpoint"
                + (f", not one dimension cut over TP size {tp_size}" if tp_size > 1 else "")
            )
            continue
        cast = weight.dtype != source.dtype
        if cast and (source.dtype, weight.dtype) not in WIDENING:
            report.mismatched[key] = _dtype_mismatch(weight.dtype, source.dtype, report)
            continue
        if not weight.is_contiguous():
            report.mismatched[key] = "not contiguous in the model"
            continue
        if cast:
            report.cast[key] = f"{source.dtype} -> {weight.dtype}"
        if shard < 0:
            plan = ckpt._handle.tensor_plan(name)
        else:
            plan = ckpt._handle.tensor_plan(name, dim=shard, rank=tp_rank, size=tp_size)
        plan.check_intact()
        dense.append(_Dense(key, name, plan, source.dtype, cast))
    return dense


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


def _resolve_ties(
    ckpt: Checkpoint,
    weights: dict[str, torch.Tensor],
    dense: list[_Dense],
    report: ModelLoadReport,
) -> list[_TieGroup]:
    """Decides, for each tensor the model shares between several names, what the checkpoint
    makes of it, as transformers' `tie_weights` does after loading: one stored name fills
    the tensor for all of them (whichever name it is); several stored names with equal
    values fill it once; with different values, each stored name is loaded into a tensor of
    its own (`report.untied`). Drops the duplicate plans from `dense`."""
    names_of: dict[int, list[str]] = {}
    for name, tensor in weights.items():
        names_of.setdefault(id(tensor), []).append(name)
    by_name = {d.name: d for d in dense}
    ties = []
    for names in names_of.values():
        if len(names) < 2:
            continue
        stored = [by_name[n] for n in names if n in by_name]
        group = _TieGroup(names, stored[0].name if stored else names[0])
        values = [ckpt.tensor(d.source) for d in stored]
        if any(not _same_values(values[0], v) for v in values[1:]):
            group.untied = True
            report.untied.extend(d.name for d in stored)
        else:
            for duplicate in stored[1:]:
                dense.remove(duplicate)
            if stored:
                report.tied.update({n: group.keeper for n in names if n != group.keeper})
        ties.append(group)
    return ties


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (NaN equals itself; the checkpoint's bytes are compared, not numbers)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _bind_ties(model: torch.nn.Module, ties: list[_TieGroup]) -> None:
    """Makes the model's sharing what `_resolve_ties` decided: tied names hold their
    keeper's tensor, untied ones (the stored names of an untied group) a tensor each."""
    for group in ties:
        keeper = _tensor(model, group.keeper)
        seen = {id(keeper)}
        for name in group.names:
            tensor = _tensor(model, name)
            if not group.untied or name == group.keeper:
                if tensor is not keeper:
                    _set_tensor(model, name, keeper)
            elif id(tensor) in seen:
                fresh = torch.empty_like(tensor)
                if isinstance(tensor, torch.nn.Parameter):
                    fresh = torch.nn.Parameter(fresh, requires_grad=tensor.requires_grad)
                _set_tensor(model, name, fresh)
            seen.add(id(_tensor(model, name)))
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        # transformers' own bookkeeping, so that a later `tie_weights()` keeps them apart.
        for group in ties:
            if group.untied:
                for name in group.names:
                    tied.pop(name, None)


def _tensor(model: torch.nn.Module, name: str) -> torch.Tensor:
    module, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(module), leaf)


def _set_tensor(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(module), leaf, tensor)


def _names(names: list[str]) -> str:
    """The first few names, and how many more there are."""
    more = len(names) - SHOWN_NAMES
    return ", ".join(names[:SHOWN_NAMES]) + (f" and {more} more" if more > 0 else "")


def _reasons(mismatched: dict[str, str]) -> str:
    """The first few reasons, each with its names."""
    names_of: dict[str, list[str]] = {}
    for name, reason in mismatched.items():
        names_of.setdefault(reason, []).append(name)
    shown = [
        f"{names[0]}: {reason}" if len(names) == 1 else f"{reason}: {_names(names)}"
        for reason, names in list(names_of.items())[:SHOWN_NAMES]
    ]
    more = len(names_of) - SHOWN_NAMES
    return "; ".join(shown) + (f"; and {more} more reasons" if more > 0 else "")


def _problems(report: ModelLoadReport) -> str:
    """What was not loaded, with a few names each; empty if everything was."""
    parts = []
    if report.mismatched:
        parts.append(
            f"{len(report.mismatched)} mismatched, not loaded ({_reasons(report.mismatched)})"
        )
    if report.missing:
        parts.append(
            f"{len(report.missing)} missing from the checkpoint ({_names(report.missing)})"
        )
    if report.unexpected:
        parts.append(
            f"{plural(len(report.unexpected), 'checkpoint tensor')} without a place in the "
            "model "
            f"({_names(report.unexpected)})"
        )
    return "; ".join(parts)


def _untied(report: ModelLoadReport) -> str:
    if not report.untied:
        return ""
    return (
        # Tied weights come at least in pairs.
        f"{len(report.untied)} weights the model ties are stored with different values and "
        f"were loaded untied, as transformers does ({_names(report.untied)}; "
        "tie_word_embeddings=False in config.json says so)"
    )


def _then(advice: str) -> str:
    return f"; {advice}" if advice else ""


def _gigabytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _advice(report: ModelLoadReport, model: torch.nn.Module, ckpt: Checkpoint) -> str:
    """What to do about the problems in `report`."""
    advice = []
    if len(report._wanted_dtypes) == 1:
        (dtype,) = report._wanted_dtypes
        advice.append(
            f"build the model in {dtype}, the dtype the checkpoint stores "
            f"(from_config(config, dtype={dtype}))"
        )
    elif report._wanted_dtypes:
        advice.append("build the model in the dtypes the checkpoint stores")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if report.missing and report.unexpected and model_type and ckpt.model_type:
        if model_type != ckpt.model_type:
            advice.append(
                f"the checkpoint is a {ckpt.model_type!r} model and the model a "
                f"{model_type!r} one: is this the model's checkpoint?"
            )
    if not advice and report.missing and not report.mismatched:
        advice.append("strict=False leaves the missing weights as initialised")
    return "; ".join(advice)


def _plan_experts(
    ckpt: Checkpoint, group: _Experts, tp_rank: int, tp_size: int
) -> list[Destination]:
    """Plans of a group whose module has vLLM's layout, straight into its weights (the
    scales too, widened on the device where the module holds them wider)."""
    m, layer = group.module, group.layer
    with_bias = layer.has_bias and hasattr(m, "gate_up_proj_bias")
    shard = layer.intermediate_size // tp_size
    scales = {}
    for c in layer.quantization.companions if layer.quantization else ():
        suffix = c.fused_suffix or f"_{c.kind}"
        for stem, proj in (("w13", "gate_up_proj"), ("w2", "down_proj")):
            shape = c.destination_shape(stem, len(group.experts), layer.hidden_size, shard)
            scales[f"{stem}_{c.kind}"] = getattr(m, f"{proj}{suffix}").data.view(shape)
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
        scales=scales,
        allow_cast=bool(scales),  # only scales differ: _check_experts refused the rest
    )


def _loaded_shapes(group: _Experts, tp_size: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """What `load_fused_moe` lands for a group loaded apart from the pipeline (see
    `destination_shapes`): the weights, the biases where the module has them, and the
    scales where the module holds the experts dequantized."""
    layer = group.layer
    with_bias = layer.has_bias and hasattr(group.module, "gate_up_proj_bias")
    return {
        name: value
        for name, value in destination_shapes(layer, len(group.experts), tp_size).items()
        if name in ("w13", "w2")
        or ("bias" in name and with_bias)
        or ("bias" not in name and group.dequantize)
    }


def _stored_bytes(group: _Experts, tp_size: int) -> int:
    """Bytes of the checkpoint loading a group apart reads (and lands, before any widening
    or dequantizing)."""
    shapes = _loaded_shapes(group, tp_size).values()
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in shapes)


def _fill_widened(
    ckpt: Checkpoint,
    dense: list[_Dense],
    weights: dict[str, torch.Tensor],
    target: torch.device,
    progress: Progress,
) -> int:
    """Loads tensors stored narrower than their weights into scratch memory on the device,
    a few at a time, and widens them into the weights there (in stream order after the
    transfer). Returns the bytes read."""
    total, batch, batch_bytes = 0, [], 0
    for i, d in enumerate(dense):
        batch.append(d)
        batch_bytes += d.plan.nbytes
        if batch_bytes < CAST_SCRATCH_BYTES and i + 1 < len(dense):
            continue
        scratch = [torch.empty_like(weights[d.name], dtype=d.dtype, device=target) for d in batch]
        destinations = [Destination(d.name, s, d.plan) for d, s in zip(batch, scratch, strict=True)]
        total += fill(ckpt, destinations, progress=progress)
        for d, s in zip(batch, scratch, strict=True):
            weights[d.name].detach().copy_(s)
        batch, batch_bytes = [], 0
    return total


def _fill_rearranged(
    ckpt: Checkpoint,
    group: _Experts,
    tp_rank: int,
    tp_size: int,
    target: torch.device,
    progress: Progress,
) -> int:
    """Loads a group into scratch tensors in vLLM's layout, then rearranges them into the
    module's own (transposed and/or interleaved) layout on the device, dequantizing mxfp4
    experts there first for a module that holds them dequantized."""
    layer = group.layer
    scratch = {
        name: torch.empty(shape, dtype=dtype, device=target)
        for name, (shape, dtype) in _loaded_shapes(group, tp_size).items()
    }
    w13, w2, b13, b2 = (scratch.pop(k, None) for k in ("w13", "w2", "w13_bias", "w2_bias"))
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
        scales=scratch,
        progress=progress,
    )
    if group.dequantize:
        dtype = group.module.gate_up_proj.dtype
        w13 = _dequantize_mxfp4(w13, scratch["w13_weight_scale"], dtype)
        w2 = _dequantize_mxfp4(w2, scratch["w2_weight_scale"], dtype)
    _rearrange(group, w13, w2, b13, b2, layer.intermediate_size // tp_size)
    return stats.bytes


def _dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """`[E, rows, cols/2]` mxfp4 bytes with their e8m0 `[E, rows, cols/32]` scales as
    `[E, rows, cols]` values of `dtype`, by transformers' own conversion (which returns them
    transposed)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    grouped = blocks.unflatten(2, (scales.shape[2], -1))  # [E, rows, cols/32, 16]
    return convert_moe_packed_tensors(grouped, scales, dtype=dtype).transpose(1, 2)


@torch.no_grad()
def _rearrange(
    group: _Experts,
    w13: torch.Tensor,
    w2: torch.Tensor,
    b13: torch.Tensor | None,
    b2: torch.Tensor | None,
    shard: int,
) -> None:
    """Writes vLLM-layout experts into a transposed, interleaved or stacked module, on the
    device (in stream order after the load)."""
    m = group.module
    gate, up = w13[:, :shard], w13[:, shard:]
    if group.stacked:  # [E·I, H] each; down stored as its transpose, `[I, H]` an expert
        w1, v1, down = (getattr(m, name) for name in group.stacked)
        w1.view(gate.shape).copy_(gate)
        v1.view(up.shape).copy_(up)
        down.view(w2.shape[0], shard, -1).copy_(w2.transpose(1, 2))
        return
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
