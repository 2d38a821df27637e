"""Corrupt files and API misuse raise a typed `FastMoeLoadError` that names the file and the
tensor or expert group, and leave load destinations untouched; nothing crashes or hangs.

Every case runs in a child process (one child for the whole batch, to pay for the torch import
once), so a segfault, abort, panic or SIGBUS shows up as the failure of the case that caused it
instead of killing pytest. The child imports this module and runs `child_main`, which prints a
`{"start": case}` line before each case and a JSON result line after it.

This module must stay cheap to import in the child: it does not import `conftest` (which
imports transformers); `Ctx.nan` plays the part of `conftest.poisoned`.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import fastmoe_load as fml
import pytest
import torch
from safetensors.torch import save_file

TESTS_DIR = Path(__file__).resolve().parent
CHILD_TIMEOUT_S = 120

# The small fused checkpoint that the misuse cases load from: E experts, hidden size H,
# intermediate size INTER.
P = "model.layers.0.mlp.experts"
E, H, INTER = 4, 12, 8
GATE_UP, DOWN = f"{P}.gate_up_proj", f"{P}.down_proj"
MODEL = "model.safetensors"
INDEX = "model.safetensors.index.json"
SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"

# ---------------------------------------------------------------------------------------------
# Files


def header_file(
    path: Path, header: dict | bytes, data: bytes = b"", header_len: int | None = None
) -> None:
    """A hand-made safetensors file: `<u64 header length> <header> <data>`."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + raw + data)


def fused_experts(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        GATE_UP: torch.randn(E, 2 * INTER, H, generator=g).bfloat16(),
        DOWN: torch.randn(E, H, INTER, generator=g).bfloat16(),
    }


def per_expert(experts: Sequence[int], dtype: torch.dtype = torch.bfloat16) -> dict:
    tensors = {}
    for e in experts:
        tensors[f"{P}.{e}.gate_proj.weight"] = torch.zeros(INTER, H, dtype=dtype)
        tensors[f"{P}.{e}.up_proj.weight"] = torch.zeros(INTER, H, dtype=dtype)
        tensors[f"{P}.{e}.down_proj.weight"] = torch.zeros(H, INTER, dtype=dtype)
    return tensors


def write_fused(d: Path) -> None:
    save_file(fused_experts(), d / MODEL)


def write_sharded_fused(d: Path) -> None:
    """gate_up in the first shard, down in the second, with an index."""
    tensors = fused_experts()
    save_file({GATE_UP: tensors[GATE_UP]}, d / SHARD1)
    save_file({DOWN: tensors[DOWN]}, d / SHARD2)
    index = {"metadata": {}, "weight_map": {GATE_UP: SHARD1, DOWN: SHARD2}}
    (d / INDEX).write_text(json.dumps(index))


def write_truncated_download(d: Path) -> None:
    write_fused(d)
    os.truncate(d / MODEL, (d / MODEL).stat().st_size * 3 // 5)


def write_f32(d: Path, header_len: int) -> None:
    """One valid F32 tensor behind a header length field of `header_len`."""
    header = {"model.embed.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    header_file(d / MODEL, header, b"\0" * 16, header_len)


def write_two(d: Path, first: tuple[int, int], second: tuple[int, int], data_len: int) -> None:
    header = {
        "model.a.weight": {"dtype": "F32", "shape": [4], "data_offsets": list(first)},
        "model.b.weight": {"dtype": "F32", "shape": [4], "data_offsets": list(second)},
    }
    header_file(d / MODEL, header, b"\0" * data_len)


# ---------------------------------------------------------------------------------------------
# Cases


class Ctx:
    """What a case sees in the child: its directory, and NaN-poisoned destinations whose
    untouchedness the harness checks after the case."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.poisoned: list[torch.Tensor] = []

    def path(self, name: str = MODEL) -> str:
        return str(self.root / name) if name else str(self.root)

    def open(self, name: str = MODEL, **kwargs: object) -> fml.Checkpoint:
        return fml.open(self.path(name), **kwargs)  # type: ignore[arg-type]

    def nan(self, shape: tuple[int, ...], dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        t = torch.full(shape, float("nan"), dtype=dtype)
        self.poisoned.append(t)
        return t

    def untouched(self) -> bool:
        return all(bool(t.isnan().all()) for t in self.poisoned)


@dataclass(frozen=True)
class Case:
    name: str
    error: str  # the FastMoeLoadError subclass expected
    files: Callable[[Path], None]  # builds the case's directory, in the parent
    run: Callable[[Ctx], object]  # must raise `error`, in the child
    where: str | None  # file (relative to the case directory) the message must name
    mentions: tuple[str, ...]  # tensor names, prefixes and facts the message must name
    forbids: tuple[str, ...]  # words the message must not contain (misleading advice)
    loads: bool  # a load_fused_moe case: it poisons destinations that must stay untouched


CASES: dict[str, Case] = {}


def case(
    name: str,
    error: str,
    files: Callable[[Path], None],
    run: Callable[[Ctx], object],
    *,
    where: str | None = MODEL,
    mentions: Sequence[str] = (),
    forbids: Sequence[str] = (),
    loads: bool = False,
) -> None:
    assert name not in CASES, name
    CASES[name] = Case(name, error, files, run, where, tuple(mentions), tuple(forbids), loads)


def opens(name: str = MODEL) -> Callable[[Ctx], object]:
    return lambda ctx: ctx.open(name).keys()


def layers(name: str = MODEL) -> Callable[[Ctx], object]:
    """Lists the groups, then uses each one that cannot be loaded: a group that fails never
    blocks the others (moe_layers() lists the rest and warns), and raises when used."""

    def run(ctx: Ctx) -> object:
        ckpt = ctx.open(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fml.UnsupportedWarning)
            found = ckpt.moe_layers()
        for group in ckpt.unsupported_groups():
            ckpt.experts(group.prefix)
        return found

    return run


def load(
    ctx: Ctx,
    *,
    n: int = E,
    shard: int = INTER,
    w13: object = None,
    w2: object = None,
    ckpt: fml.Checkpoint | None = None,
    prefix: str = P,
    **kwargs: object,
) -> fml.LoadStats:
    """`load_fused_moe` into NaN-poisoned destinations of the right shape unless given."""
    w13 = ctx.nan((n, 2 * shard, H)) if w13 is None else w13
    w2 = ctx.nan((n, H, shard)) if w2 is None else w2
    ckpt = ctx.open() if ckpt is None else ckpt
    return fml.load_fused_moe(ckpt, prefix, w13, w2, **kwargs)  # type: ignore[arg-type]


# --- corrupt and truncated files -------------------------------------------------------------

case(
    "truncated_download",
    "HeaderError",
    write_truncated_download,
    opens(),
    mentions=["truncated"],
)
case(
    "data_shorter_than_header_says",
    "HeaderError",
    lambda d: header_file(
        d / MODEL,
        {"model.embed.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}},
        b"\0" * 8,
    ),
    opens(),
    mentions=["16 bytes", "holds 8"],
)
case(
    "data_longer_than_header_says",
    "HeaderError",
    lambda d: header_file(
        d / MODEL,
        {"model.embed.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
        b"\0" * 16,
    ),
    opens(),
    forbids=["truncated"],
)
case(
    "file_shorter_than_8_bytes",
    "HeaderError",
    lambda d: (d / MODEL).write_bytes(b"abc"),
    opens(),
    mentions=["3 bytes"],
)
case(
    "empty_file",
    "HeaderError",
    lambda d: (d / MODEL).write_bytes(b""),
    opens(),
    mentions=["0 bytes"],
)
case(
    "header_length_only",
    "HeaderError",
    lambda d: (d / MODEL).write_bytes(struct.pack("<Q", 2)),
    opens(),
)
case(
    "header_length_larger_than_file",
    "HeaderError",
    lambda d: write_f32(d, header_len=1_000_000),
    opens(),
    mentions=["1000000"],
)
case(
    "header_length_u64_max",
    "HeaderError",
    lambda d: write_f32(d, header_len=2**64 - 1),
    opens(),
)
case(
    "header_not_utf8",
    "HeaderError",
    lambda d: header_file(d / MODEL, b'{"\xff\xfe": 1}'),
    opens(),
    mentions=["UTF-8"],
)
case(
    "header_not_json",
    "HeaderError",
    lambda d: header_file(d / MODEL, b"{this is not json"),
    opens(),
    mentions=["JSON"],
)
case(
    "header_json_list",
    "HeaderError",
    lambda d: header_file(d / MODEL, b"[1, 2, 3]"),
    opens(),
)
case(
    "header_zero_length",
    "HeaderError",
    lambda d: header_file(d / MODEL, b"", b"\0" * 8),
    opens(),
)
case(
    "unknown_dtype",
    "HeaderError",
    lambda d: header_file(
        d / MODEL,
        {"model.embed.weight": {"dtype": "F17", "shape": [2], "data_offsets": [0, 4]}},
        b"\0" * 4,
    ),
    opens(),
    mentions=["model.embed.weight", "F17"],
)
case(
    "missing_data_offsets",
    "HeaderError",
    lambda d: header_file(
        d / MODEL, {"model.embed.weight": {"dtype": "F32", "shape": [1]}}, b"\0" * 4
    ),
    opens(),
    mentions=["model.embed.weight", "data_offsets"],
)
case(
    "negative_shape",
    "HeaderError",
    lambda d: header_file(
        d / MODEL,
        {"model.embed.weight": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
        b"\0" * 4,
    ),
    opens(),
    mentions=["model.embed.weight"],
)
case(
    "shape_offsets_size_mismatch",
    "HeaderError",
    lambda d: header_file(
        d / MODEL,
        {"model.embed.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 16]}},
        b"\0" * 16,
    ),
    opens(),
    mentions=["model.embed.weight", "24", "16"],
)
case(
    "shape_overflows",
    "HeaderError",
    lambda d: header_file(
        d / MODEL,
        {"model.embed.weight": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}},
        b"\0" * 4,
    ),
    opens(),
    mentions=["model.embed.weight"],
)
case(
    "overlapping_offsets",
    "HeaderError",
    lambda d: write_two(d, (0, 16), (8, 24), 24),
    opens(),
    mentions=["model.b.weight", "overlap"],
)
case(
    "gap_between_tensors",
    "HeaderError",
    lambda d: write_two(d, (0, 16), (24, 40), 40),
    opens(),
    mentions=["model.b.weight"],
)
case(
    "sub_byte_dtype_without_torch_equivalent",
    "LayoutError",
    lambda d: header_file(
        d / MODEL,
        {"model.embed.weight": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}},
        b"\0" * 2,
    ),
    lambda ctx: ctx.open().tensor("model.embed.weight"),
    mentions=["model.embed.weight", "F4"],
)

# --- other files passed as the checkpoint: named for what they are, not "truncated" ----------

CONFIG_TEXT = json.dumps(
    {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe"}, indent=2
)
case(
    "config_json_as_checkpoint",
    "CheckpointError",
    lambda d: (d / "config.json").write_text(CONFIG_TEXT),
    opens("config.json"),
    where="config.json",
    mentions=["not a safetensors file", "JSON", "directory"],
    forbids=["truncated", "claims"],
)
case(
    "index_as_checkpoint",
    "CheckpointError",
    lambda d: write_sharded_fused(d),
    opens(INDEX),
    where=INDEX,
    mentions=["not a safetensors file", "index", "pass the directory"],
    forbids=["truncated", "claims"],
)
case(
    "pytorch_bin_renamed_to_safetensors",
    "CheckpointError",
    lambda d: torch.save(fused_experts(), d / MODEL),
    opens(),
    mentions=["not a safetensors file", "torch.save"],
    forbids=["truncated", "claims"],
)

# --- checkpoints as a whole ------------------------------------------------------------------


def write_index_missing_shard(d: Path) -> None:
    write_sharded_fused(d)
    (d / SHARD2).unlink()


def write_index(text: str) -> Callable[[Path], None]:
    def build(d: Path) -> None:
        write_sharded_fused(d)
        (d / INDEX).write_text(text)

    return build


def write_config(text: str, single_file: bool = False) -> Callable[[Path], None]:
    def build(d: Path) -> None:
        (write_fused if single_file else write_sharded_fused)(d)
        (d / "config.json").write_text(text)

    return build


def write_truncated_shard(d: Path) -> None:
    write_sharded_fused(d)
    os.truncate(d / SHARD2, (d / SHARD2).stat().st_size - 4)


def write_duplicate(d: Path) -> None:
    save_file(fused_experts(), d / "a.safetensors")
    save_file({DOWN: fused_experts()[DOWN]}, d / "b.safetensors")


case(
    "index_references_missing_shard",
    "CheckpointError",
    write_index_missing_shard,
    opens(""),
    where=INDEX,
    mentions=[SHARD2, DOWN],
)
case(
    "index_not_json",
    "CheckpointError",
    write_index("{'weight_map': oops"),
    opens(""),
    where=INDEX,
)
case(
    "index_without_weight_map",
    "CheckpointError",
    write_index('{"metadata": {}}'),
    opens(""),
    where=INDEX,
    mentions=["weight_map"],
)
case(
    "index_names_no_tensor",
    "CheckpointError",
    write_index('{"weight_map": {}}'),
    opens(""),
    where=INDEX,
)
case(
    "index_points_outside_checkpoint",
    "CheckpointError",
    write_index(json.dumps({"weight_map": {GATE_UP: f"../{SHARD1}", DOWN: SHARD2}})),
    opens(""),
    where=INDEX,
    mentions=[GATE_UP],
)
case(
    "index_lists_tensor_in_wrong_shard",
    "CheckpointError",
    write_index(json.dumps({"weight_map": {GATE_UP: SHARD2, DOWN: SHARD2}})),
    opens(""),
    where=INDEX,
    mentions=[GATE_UP],
)
case(
    "index_lists_absent_tensor",
    "CheckpointError",
    write_index(json.dumps({"weight_map": {GATE_UP: SHARD1, DOWN: SHARD2, "x.y": SHARD1}})),
    opens(""),
    where=INDEX,
    mentions=["x.y", SHARD1],
)
case(
    "tensor_stored_twice",
    "CheckpointError",
    write_duplicate,
    opens(""),
    where="",
    mentions=[DOWN, "a.safetensors", "b.safetensors"],
)
case(
    "truncated_shard_in_directory",
    "HeaderError",
    write_truncated_shard,
    opens(""),
    where=SHARD2,
)
case(
    "config_not_json",
    "CheckpointError",
    write_config("{model_type: qwen3_moe"),
    opens(""),
    where="config.json",
)
case(
    "config_not_json_beside_single_file",
    "CheckpointError",
    write_config("not json at all", single_file=True),
    opens(),
    where="config.json",
)
case(
    "directory_without_safetensors",
    "CheckpointError",
    lambda d: (d / "README.md").write_text("nothing here"),
    opens(""),
    where="",
    mentions=["safetensors"],
)
case(
    "nonexistent_path",
    "CheckpointError",
    lambda d: None,
    opens("no-such-model.safetensors"),
    where="no-such-model.safetensors",
)

# --- routed-expert layouts -------------------------------------------------------------------


def save_to_model(tensors: dict[str, torch.Tensor]) -> Callable[[Path], None]:
    return lambda d: save_file(tensors, d / MODEL)


def fused_with(**changes: torch.Tensor | None) -> dict[str, torch.Tensor]:
    tensors = fused_experts()
    for suffix, tensor in changes.items():
        if tensor is None:
            tensors.pop(f"{P}.{suffix}")
        else:
            tensors[f"{P}.{suffix}"] = tensor
    return tensors


case(
    "fused_gate_up_without_down",
    "LayoutError",
    save_to_model(fused_with(down_proj=None)),
    layers(),
    mentions=[P, GATE_UP, DOWN],
)
case(
    "fused_mixed_dtypes",
    "LayoutError",
    save_to_model(fused_with(down_proj=torch.zeros(E, H, INTER))),
    layers(),
    mentions=[P, "BF16", "F32"],
)
case(
    "fused_experts_disagree",
    "LayoutError",
    save_to_model(fused_with(down_proj=torch.zeros(E - 1, H, INTER, dtype=torch.bfloat16))),
    layers(),
    mentions=[P, GATE_UP, DOWN],
)
case(
    "fused_orientation_unknown",
    "LayoutError",
    save_to_model(fused_with(down_proj=torch.zeros(E, H, INTER + 1, dtype=torch.bfloat16))),
    layers(),
    mentions=[P, GATE_UP, DOWN],
)
case(
    "fused_only_one_bias",
    "LayoutError",
    save_to_model(fused_with(gate_up_proj_bias=torch.zeros(E, 2 * INTER, dtype=torch.bfloat16))),
    layers(),
    mentions=[P, f"{P}.gate_up_proj_bias", f"{P}.down_proj_bias"],
)
case(
    "fused_bias_wrong_shape",
    "LayoutError",
    save_to_model(
        fused_with(
            gate_up_proj_bias=torch.zeros(E, 2 * INTER, dtype=torch.bfloat16),
            down_proj_bias=torch.zeros(E, H - 1, dtype=torch.bfloat16),
        )
    ),
    layers(),
    mentions=[P, f"{P}.down_proj_bias"],
)
case(
    "per_expert_missing_expert",
    "LayoutError",
    save_to_model(per_expert([0, 1, 3])),
    layers(),
    mentions=[P, "expert 2"],
)
case(
    "per_expert_missing_up",
    "LayoutError",
    save_to_model({k: v for k, v in per_expert([0, 1]).items() if k != f"{P}.1.up_proj.weight"}),
    layers(),
    mentions=[P, f"{P}.1.up_proj.weight"],
)
case(
    "per_expert_mixed_dtypes",
    "LayoutError",
    save_to_model(
        {**per_expert([0, 1]), f"{P}.1.up_proj.weight": torch.zeros(INTER, H, dtype=torch.float16)}
    ),
    layers(),
    mentions=[P, "BF16", "F16"],
)
case(
    "per_expert_wrong_shape",
    "LayoutError",
    save_to_model(
        {**per_expert([0, 1]), f"{P}.1.down_proj.weight": torch.zeros(H, INTER + 1).bfloat16()}
    ),
    layers(),
    mentions=[P, f"{P}.1.down_proj.weight"],
)
case(
    "fused_and_per_expert_under_one_prefix",
    "LayoutError",
    save_to_model({**fused_experts(), **per_expert([0])}),
    layers(),
    mentions=[P],
)

# --- load_fused_moe misuse -------------------------------------------------------------------


def misuse(
    name: str,
    error: str,
    run: Callable[[Ctx], object],
    *,
    mentions: Sequence[str] = (P,),
    where: str | None = MODEL,
) -> None:
    case(name, error, write_fused, run, where=where, mentions=mentions, loads=True)


def closed_after_listing(ctx: Ctx) -> object:
    ckpt = ctx.open()
    ckpt.moe_layers()
    ckpt.close()
    return load(ctx, ckpt=ckpt)


def closed_before_listing(ctx: Ctx) -> object:
    ckpt = ctx.open()
    ckpt.close()
    return load(ctx, ckpt=ckpt)


misuse(
    "wrong_w13_shape",
    "RequestError",
    lambda ctx: load(ctx, w13=ctx.nan((E, 2 * INTER, H + 1))),
    mentions=[P, "w13", str((E, 2 * INTER, H))],
)
misuse(
    "wrong_w13_experts",
    "RequestError",
    lambda ctx: load(ctx, w13=ctx.nan((E - 1, 2 * INTER, H)), w2=ctx.nan((E - 1, H, INTER))),
    mentions=[P, "w13"],
)
misuse(
    "wrong_w2_shape",
    "RequestError",
    lambda ctx: load(ctx, w2=ctx.nan((E, INTER, H))),
    mentions=[P, "w2", str((E, H, INTER))],
)
misuse(
    "wrong_dtype_no_cast",
    "RequestError",
    lambda ctx: load(ctx, w13=ctx.nan((E, 2 * INTER, H), torch.float32)),
    mentions=[P, "w13", "float32", "bfloat16"],
)
misuse(
    "wrong_w2_dtype",
    "RequestError",
    lambda ctx: load(ctx, w2=ctx.nan((E, H, INTER), torch.float16)),
    mentions=[P, "w2", "float16"],
)
misuse(
    "non_contiguous_destination",
    "RequestError",
    lambda ctx: load(ctx, w13=ctx.nan((E, H, 2 * INTER)).transpose(1, 2)),
    mentions=[P, "w13", "contiguous"],
)
misuse(
    "meta_destination",
    "RequestError",
    lambda ctx: load(ctx, w2=torch.empty((E, H, INTER), dtype=torch.bfloat16, device="meta")),
    mentions=[P, "w2", "meta"],
)
misuse(
    "tp_rank_not_below_tp_size",
    "RequestError",
    lambda ctx: load(ctx, shard=INTER // 2, tp_rank=2, tp_size=2),
    mentions=[P, "tp_rank 2"],
)
misuse(
    "negative_tp_rank",
    "RequestError",
    lambda ctx: load(ctx, shard=INTER // 2, tp_rank=-1, tp_size=2),
    mentions=[P, "-1"],
)
misuse(
    "tp_size_zero",
    "RequestError",
    lambda ctx: load(ctx, tp_rank=0, tp_size=0),
    mentions=[P, "tp_size"],
)
misuse(
    "tp_size_does_not_divide_intermediate",
    "RequestError",
    lambda ctx: load(ctx, shard=INTER // 3, tp_rank=0, tp_size=3),
    mentions=[P, "tp_size=3", str(INTER)],
)
misuse(
    "bool_tp_rank",
    "RequestError",
    lambda ctx: load(ctx, shard=INTER // 2, tp_rank=True, tp_size=2),
    mentions=[P, "tp_rank"],
)
misuse(
    "expert_id_out_of_range",
    "RequestError",
    lambda ctx: load(ctx, n=2, local_experts=[0, E]),
    mentions=[P, str(E)],
)
misuse(
    "negative_expert_id",
    "RequestError",
    lambda ctx: load(ctx, n=1, local_experts=[-1]),
    mentions=[P, "-1"],
)
misuse(
    "bool_expert_id",
    "RequestError",
    lambda ctx: load(ctx, n=2, local_experts=[0, True]),
    mentions=[P, "True"],
)
misuse(
    "biases_given_but_checkpoint_has_none",
    "RequestError",
    lambda ctx: load(ctx, w13_bias=ctx.nan((E, 2 * INTER)), w2_bias=ctx.nan((E, H))),
    mentions=[P, "bias"],
)
misuse(
    "non_tensor_destination",
    "RequestError",
    lambda ctx: load(ctx, w13=[[0.0] * H] * (2 * INTER)),
    mentions=[P, "w13", "list"],
)
misuse(
    "unknown_prefix",
    "TensorNotFoundError",
    lambda ctx: load(ctx, prefix="model.layers.0.mlp"),
    mentions=["model.layers.0.mlp", P],
)
misuse(
    "not_a_checkpoint",
    "RequestError",
    lambda ctx: fml.load_fused_moe(
        ctx.path(),  # type: ignore[arg-type]
        P,
        ctx.nan((E, 2 * INTER, H)),
        ctx.nan((E, H, INTER)),
    ),
    mentions=["Checkpoint"],
    where=None,
)
misuse("closed_checkpoint", "CheckpointError", closed_before_listing, mentions=["closed"])
misuse(
    "closed_checkpoint_after_listing",
    "CheckpointError",
    closed_after_listing,
    mentions=["closed"],
)

# --- expert views ----------------------------------------------------------------------------

case(
    "view_expert_out_of_range",
    "RequestError",
    write_fused,
    lambda ctx: ctx.open().experts(P).w1(E),
    mentions=[P, f"expert {E}"],
)
case(
    "view_negative_expert",
    "RequestError",
    write_fused,
    lambda ctx: ctx.open().experts(P).w2(-1),
    mentions=[P, "-1"],
)
case(
    "view_bias_of_layer_without_biases",
    "RequestError",
    write_fused,
    lambda ctx: ctx.open().experts(P).b1(0),
    mentions=[P, "b1"],
)
case(
    "experts_unknown_prefix",
    "TensorNotFoundError",
    write_fused,
    lambda ctx: ctx.open().experts("model.layers.7.mlp.experts"),
    mentions=["model.layers.7.mlp.experts", P],
)
case(
    "tensor_not_found",
    "TensorNotFoundError",
    write_fused,
    lambda ctx: ctx.open().tensor(f"{P}.up_proj"),
    mentions=[f"{P}.up_proj"],
)
case(
    "open_negative_num_threads",
    "RequestError",
    write_fused,
    lambda ctx: ctx.open(num_threads=-1),
    mentions=["num_threads"],
)
case(
    "open_unknown_io",
    "RequestError",
    write_fused,
    lambda ctx: ctx.open(io="direct"),
    mentions=["io", "direct"],
)

# --- files that change after open ------------------------------------------------------------


def changed_after_open(
    change: Callable[[Path], None], name: str = MODEL, directory: bool = False, io: str = "mmap"
) -> Callable[[Ctx], object]:
    def run(ctx: Ctx) -> object:
        ckpt = ctx.open("" if directory else MODEL, io=io)
        layer = ckpt.experts(P)
        w1 = layer.w1(0)  # a view made before the change; not read afterwards
        assert w1.shape == (INTER, H)
        change(ctx.root / name)
        return load(ctx, ckpt=ckpt)

    return run


def shrink(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def rewrite_in_place(path: Path) -> None:
    """Same size, different bytes, later mtime."""
    data = bytearray(path.read_bytes())
    data[-64:] = bytes(64)
    st = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def replace_by_rename(path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    save_file(fused_experts(seed=1), tmp)
    os.replace(tmp, path)


for io in ("mmap", "pread"):
    for label, change in (
        ("truncated", shrink),
        ("rewritten", rewrite_in_place),
        ("replaced", replace_by_rename),
        ("deleted", os.unlink),
    ):
        case(
            f"file_{label}_after_open_{io}",
            "FileChangedError",
            write_fused,
            changed_after_open(change, io=io),
            loads=True,
        )
    case(
        f"shard_truncated_after_open_{io}",
        "FileChangedError",
        write_sharded_fused,
        changed_after_open(shrink, SHARD2, directory=True, io=io),
        where=SHARD2,
        loads=True,
    )


# ---------------------------------------------------------------------------------------------
# The child


def child_main(root: str, names: Sequence[str]) -> None:
    for name in names:
        print(json.dumps({"start": name}), flush=True)
        ctx = Ctx(Path(root) / name)
        record: dict[str, object] = {"case": name, "type": None, "message": None}
        try:
            result = CASES[name].run(ctx)
            record["returned"] = repr(result)[:200]
        except BaseException as exc:
            record.update(
                type=type(exc).__name__,
                message=str(exc),
                is_fastmoe_error=isinstance(exc, fml.FastMoeLoadError),
                is_value_error=isinstance(exc, ValueError),
            )
        record["untouched"] = ctx.untouched() if ctx.poisoned else None
        print(json.dumps(record), flush=True)


@dataclass
class ChildRun:
    records: dict[str, dict]
    started: list[str]
    returncode: int | None
    stderr: str

    def diagnosis(self) -> str:
        last = self.started[-1] if self.started else None
        status = "timed out" if self.returncode is None else f"exited with {self.returncode}"
        return f"child {status}; last case started: {last}; stderr tail:\n{self.stderr[-3000:]}"


def run_child(
    root: Path, names: Sequence[str], module: str = "test_errors", func: str = "child_main"
) -> ChildRun:
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(TESTS_DIR)!r})\n"
        f"import {module}\n"
        f"{module}.{func}({str(root)!r}, {list(names)!r})\n"
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
            cwd=root,
        )
        stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:

        def text(b: bytes | str | None) -> str:
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")

        stdout, stderr, rc = text(exc.stdout), text(exc.stderr), None
    records, started = {}, []
    for line in stdout.splitlines():
        if not line.startswith("{"):
            continue
        item = json.loads(line)
        if "start" in item:
            started.append(item["start"])
        else:
            records[item["case"]] = item
    return ChildRun(records, started, rc, stderr)


# ---------------------------------------------------------------------------------------------
# Tests


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ChildRun]:
    root = tmp_path_factory.mktemp("errors")
    for c in CASES.values():
        (root / c.name).mkdir()
        c.files(root / c.name)
    return root, run_child(root, list(CASES))


def outcome(batch: tuple[Path, ChildRun], name: str) -> dict:
    _, child = batch
    record = child.records.get(name)
    assert record is not None, f"case {name}: no result from the child; {child.diagnosis()}"
    return record


def test_child_exits_cleanly(batch):
    _, child = batch
    assert child.returncode == 0, child.diagnosis()
    assert sorted(child.records) == sorted(CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_raises_typed_error(batch, name):
    record = outcome(batch, name)
    c = CASES[name]
    assert record["type"] == c.error, f"{name}: expected {c.error}, got {record}"
    assert record["is_fastmoe_error"] and record["is_value_error"], record
    assert record["message"], record
    if c.loads:
        assert record["untouched"] is True, f"{name}: a destination was written: {record}"


@pytest.mark.parametrize("name", list(CASES))
def test_message_names_file_and_tensor(batch, name):
    root, _ = batch
    record = outcome(batch, name)
    c = CASES[name]
    message = record["message"] or ""
    if c.where is not None:
        path = str(root / name / c.where) if c.where else str(root / name)
        assert path in message, f"{name}: message does not name {path}: {message!r}"
    for word in c.mentions:
        assert word in message, f"{name}: message does not mention {word!r}: {message!r}"
    for word in c.forbids:
        assert word not in message, f"{name}: misleading {word!r} in {message!r}"


def test_every_error_class_is_a_fastmoe_error():
    for cls in (
        fml.HeaderError,
        fml.CheckpointError,
        fml.TensorNotFoundError,
        fml.LayoutError,
        fml.RequestError,
        fml.FileChangedError,
    ):
        assert issubclass(cls, fml.FastMoeLoadError)
    assert issubclass(fml.FastMoeLoadError, ValueError)
    assert {c.error for c in CASES.values()} == {
        "HeaderError",
        "CheckpointError",
        "TensorNotFoundError",
        "LayoutError",
        "RequestError",
        "FileChangedError",
    }


# --- cases that are expected to kill or hang a process: each in a child of its own ----------


def view_after_truncation_child(root: str, names: Sequence[str]) -> None:
    """Opens a 800 kB file, truncates it to half, then makes and reads a view of a tensor in
    the lost half."""
    (name,) = names
    print(json.dumps({"start": name}), flush=True)
    ckpt = fml.open(os.path.join(root, MODEL))
    os.truncate(os.path.join(root, MODEL), os.path.getsize(os.path.join(root, MODEL)) // 2)
    record: dict[str, object] = {"case": name, "type": None, "message": None}
    try:
        record["read"] = float(ckpt.tensor("model.b.weight").sum())
    except fml.FastMoeLoadError as exc:
        record.update(type=type(exc).__name__, message=str(exc))
    print(json.dumps(record), flush=True)


def test_view_of_truncated_file_raises_instead_of_sigbus(tmp_path):
    save_file(
        {"model.a.weight": torch.zeros(100_000), "model.b.weight": torch.ones(100_000)},
        tmp_path / MODEL,
    )
    child = run_child(tmp_path, ["view_after_truncation"], func="view_after_truncation_child")
    assert child.returncode == 0, child.diagnosis()
    record = child.records["view_after_truncation"]
    assert record["type"] == "FileChangedError", record
    assert str(tmp_path / MODEL) in record["message"]


def open_fifo_child(root: str, names: Sequence[str]) -> None:
    """Opens a FIFO in a thread and gives it 5 s to fail."""
    (name,) = names
    print(json.dumps({"start": name}), flush=True)
    record: dict[str, object] = {"case": name, "type": "hang", "message": None}

    def attempt() -> None:
        try:
            fml.open(os.path.join(root, MODEL))
            record["type"] = None
        except Exception as exc:
            record.update(type=type(exc).__name__, message=str(exc))

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout=5)
    print(json.dumps(record), flush=True)
    os._exit(0)  # the open may still be blocked in the thread


def test_open_fifo_raises_instead_of_hanging(tmp_path):
    os.mkfifo(tmp_path / MODEL)
    child = run_child(tmp_path, ["open_fifo"], func="open_fifo_child")
    assert child.returncode == 0, child.diagnosis()
    record = child.records["open_fifo"]
    assert record["type"] == "CheckpointError", record
    assert str(tmp_path / MODEL) in record["message"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_destinations_on_different_devices(tmp_path):
    write_fused(tmp_path)
    w13 = torch.full((E, 2 * INTER, H), math.nan, dtype=torch.bfloat16)
    w2 = torch.full((E, H, INTER), math.nan, dtype=torch.bfloat16, device="cuda")
    with fml.open(tmp_path / MODEL) as ckpt, pytest.raises(fml.RequestError, match="devices"):
        fml.load_fused_moe(ckpt, P, w13, w2)
    assert w13.isnan().all() and w2.isnan().all()


def test_config_that_is_not_an_object(tmp_path):
    """A JSON list in config.json is not a config: `model_type` must not crash on it."""
    write_fused(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    try:
        ckpt = fml.open(tmp_path / MODEL)
        model_type = ckpt.model_type
    except fml.FastMoeLoadError as exc:
        assert str(tmp_path / "config.json") in str(exc)
    else:
        assert model_type is None
