"""`python -m fastmoe_load inspect`: a checkpoint's routed-expert groups and what each rank reads.

The bytes per rank come from the copy plans a load would execute, so they are what
`load_fused_moe` reports for that rank, not an estimate.
"""

from __future__ import annotations

import itertools
import logging
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

from .._text import plural
from ..checkpoint import Checkpoint, MoeLayer, UnsupportedWarning
from ..placement import Strategy, expert_placement
from ..progress import format_bytes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankBytes:
    """What one (EP rank, TP rank) pair reads of one layer, or of all of them."""

    ep_rank: int
    tp_rank: int
    experts: list[int] | None  # None in sums over layers that place experts differently
    bytes: int


@dataclass(frozen=True)
class LayerReport:
    prefix: str
    format: str
    num_experts: int
    hidden_size: int
    intermediate_size: int
    dtype: str
    bias_dtype: str | None
    quantization: str | None  # e.g. "fp8, 128x128 block scales in float32 (weight_scale_inv)"
    tensors: list[str]
    bytes: int  # stored in the checkpoint
    ranks: list[RankBytes]


@dataclass(frozen=True)
class UnsupportedReport:
    """Tensors that look like routed experts but cannot be loaded (see
    `Checkpoint.unsupported_groups`)."""

    prefix: str
    tensors: list[str]
    reason: str


@dataclass(frozen=True)
class ShardReport:
    path: str
    bytes: int


@dataclass(frozen=True)
class Report:
    path: str
    model_type: str | None
    shards: list[ShardReport]
    num_tensors: int
    tensor_bytes: int
    tp_size: int
    ep_size: int
    placement: str
    layers: list[LayerReport]
    ranks: list[RankBytes] = field(default_factory=list)  # summed over the layers
    unsupported: list[UnsupportedReport] = field(default_factory=list)
    quantization_config: str | None = None  # a scheme config.json declares that is not loaded

    @property
    def file_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def expert_bytes(self) -> int:
        return sum(layer.bytes for layer in self.layers)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["file_bytes"] = self.file_bytes
        data["expert_bytes"] = self.expert_bytes
        return data


def _dtype_name(dtype: object) -> str:
    return str(dtype).removeprefix("torch.")


def _stored_bytes(ckpt: Checkpoint, name: str) -> int:
    _, _, _, start, end = ckpt._handle.tensor_info(name)
    return end - start


def rank_bytes(
    ckpt: Checkpoint, layer: MoeLayer, tp_rank: int, tp_size: int, experts: list[int]
) -> int:
    """Bytes a load of `layer` for this TP rank and these experts reads (and writes), scales
    included."""
    targets = ["w13", "w2"] + (["w13_bias", "w2_bias"] if layer.has_bias else [])
    if layer.quantization is not None:
        targets += [f"{t}_{c.kind}" for c in layer.quantization.companions for t in ("w13", "w2")]
    return sum(
        ckpt._handle.plan(
            layer.prefix, target, tp_rank=tp_rank, tp_size=tp_size, experts=experts
        ).nbytes
        for target in targets
    )


def _layer_report(
    ckpt: Checkpoint, layer: MoeLayer, tp_size: int, ep_size: int, placement: Strategy
) -> LayerReport:
    ranks = []
    for ep_rank in range(ep_size):
        experts = expert_placement(layer.num_experts, ep_size, ep_rank, placement)
        for tp_rank in range(tp_size):
            nbytes = rank_bytes(ckpt, layer, tp_rank, tp_size, experts)
            ranks.append(RankBytes(ep_rank, tp_rank, experts, nbytes))
    return LayerReport(
        prefix=layer.prefix,
        format=layer.format,
        num_experts=layer.num_experts,
        hidden_size=layer.hidden_size,
        intermediate_size=layer.intermediate_size,
        dtype=_dtype_name(layer.dtype),
        bias_dtype=None if layer.bias_dtype is None else _dtype_name(layer.bias_dtype),
        quantization=None if layer.quantization is None else str(layer.quantization),
        tensors=list(layer.tensor_names),
        bytes=sum(_stored_bytes(ckpt, name) for name in layer.tensor_names),
        ranks=ranks,
    )


def _rank_totals(layers: list[LayerReport]) -> list[RankBytes]:
    """Per-rank sums over the layers; the expert list is shown only when every layer places
    the same experts on the rank (layers of different sizes do not)."""
    if not layers:
        return []
    totals = []
    for k, first in enumerate(layers[0].ranks):
        same = all(layer.ranks[k].experts == first.experts for layer in layers)
        totals.append(
            RankBytes(
                first.ep_rank,
                first.tp_rank,
                first.experts if same else None,
                sum(layer.ranks[k].bytes for layer in layers),
            )
        )
    return totals


def inspect_checkpoint(
    ckpt: Checkpoint, tp_size: int = 1, ep_size: int = 1, placement: Strategy = "linear"
) -> Report:
    """Describes `ckpt` and plans every layer for each of the `tp_size * ep_size` ranks."""
    with warnings.catch_warnings():
        # The report lists what cannot be loaded itself.
        warnings.simplefilter("ignore", UnsupportedWarning)
        moe_layers = ckpt.moe_layers()
    layers = [_layer_report(ckpt, layer, tp_size, ep_size, placement) for layer in moe_layers]
    unsupported = [
        UnsupportedReport(g.prefix, list(g.tensor_names), g.reason)
        for g in ckpt.unsupported_groups()
    ]
    for layer in layers:
        logger.info(
            "%s: %s, E=%d H=%d I=%d %s%s",
            layer.prefix,
            layer.format,
            layer.num_experts,
            layer.hidden_size,
            layer.intermediate_size,
            layer.dtype,
            f" ({layer.quantization})" if layer.quantization else "",
        )
    names = ckpt.keys()
    expert_tensors = sum(len(layer.tensors) for layer in layers)
    logger.info(
        "%s hold%s %d of %d tensors",
        plural(len(layers), "routed-expert group"),
        "s" if len(layers) == 1 else "",
        expert_tensors,
        len(names),
    )
    return Report(
        path=ckpt.path,
        model_type=ckpt.model_type,
        shards=[ShardReport(p, os.path.getsize(p)) for p in ckpt.shard_paths],
        num_tensors=len(names),
        tensor_bytes=sum(_stored_bytes(ckpt, name) for name in names),
        tp_size=tp_size,
        ep_size=ep_size,
        placement=placement,
        layers=layers,
        ranks=_rank_totals(layers),
        unsupported=unsupported,
        quantization_config=ckpt._handle.unsupported_quantization,
    )


# ---------------------------------------------------------------------------------------------
# The human-readable form


def describe_experts(experts: list[int] | None) -> str:
    """`0-31`, `1-125 step 4`, `3, 0, 3` (first few, for irregular placements)."""
    if experts is None:
        return "(differs by layer)"
    if not experts:
        return "none"
    step = experts[1] - experts[0] if len(experts) > 1 else 0
    regular = step > 0 and all(b - a == step for a, b in itertools.pairwise(experts))
    if regular and (step == 1 or len(experts) > 2):
        span = f"{experts[0]}-{experts[-1]}"
        return span if step == 1 else f"{span} step {step}"
    shown = ", ".join(map(str, experts[:6]))
    return shown + (", ..." if len(experts) > 6 else "")


def _rank_name(rank: RankBytes) -> str:
    return f"ep{rank.ep_rank} tp{rank.tp_rank}"


def _span(values: list[int]) -> str:
    low, high = min(values), max(values)
    return format_bytes(low) if low == high else f"{format_bytes(low)}..{format_bytes(high)}"


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    """Columns padded to their widest cell; columns in `right` are right-aligned (numbers)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = (
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        return "  ".join(padded).rstrip()

    return [line(header), *map(line, rows)]


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def format_report(report: Report) -> str:
    shards = plural(len(report.shards), "shard")
    experts = format_bytes(report.expert_bytes)
    share = _percent(report.expert_bytes, report.tensor_bytes)
    ranks = report.tp_size * report.ep_size
    lines = [
        f"checkpoint  {report.path}",
        f"files       {shards}, {format_bytes(report.file_bytes)}",
        f"model_type  {report.model_type or '-'}",
        f"tensors     {report.num_tensors}, {format_bytes(report.tensor_bytes)}; "
        f"{plural(len(report.layers), 'routed-expert group')} "
        f"hold{'s' if len(report.layers) == 1 else ''} {experts} ({share})",
        f"ranks       tp={report.tp_size} x ep={report.ep_size} "
        f"({report.placement} placement): {plural(ranks, 'rank')}",
    ]
    if report.quantization_config:
        lines.append(f"quantized   {report.quantization_config}: not loaded by fastmoe_load")
    if report.unsupported:
        groups = len(report.unsupported)
        lines += [
            "",
            f"{plural(groups, 'group')} of expert tensors cannot be loaded:",
        ]
        lines += [
            f"  {g.prefix} ({plural(len(g.tensors), 'tensor')}): {g.reason}"
            for g in report.unsupported
        ]
    if not report.layers:
        return "\n".join([*lines, "", "no routed-expert groups found"])
    quantizations = sorted({layer.quantization for layer in report.layers if layer.quantization})
    lines += [f"quantized   {q}" for q in quantizations]

    header = ["prefix", "format", "E", "H", "I", "dtype", "bias", "bytes", "per rank"]
    # Bytes include the scales of quantized groups: they travel with their weights.
    rows = [
        [
            layer.prefix,
            layer.format,
            str(layer.num_experts),
            str(layer.hidden_size),
            str(layer.intermediate_size),
            layer.dtype,
            layer.bias_dtype or "-",
            format_bytes(layer.bytes),
            _span([r.bytes for r in layer.ranks]),
        ]
        for layer in report.layers
    ]
    lines += ["", *_table(header, rows, right={2, 3, 4, 7, 8})]

    header = ["rank", "experts", "count", "bytes", "of experts"]
    rows = [
        [
            _rank_name(rank),
            describe_experts(rank.experts),
            "-" if rank.experts is None else str(len(rank.experts)),
            format_bytes(rank.bytes),
            _percent(rank.bytes, report.expert_bytes),
        ]
        for rank in report.ranks
    ]
    lines += ["", *_table(header, rows, right={2, 3, 4})]
    return "\n".join(lines)
