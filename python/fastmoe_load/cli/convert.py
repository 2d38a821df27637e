"""`python -m fastmoe_load convert`: rewrite routed experts between one tensor per expert and
the fused transformers-v5 layout, through the copy engine.

`to="fused"`: a per-expert group `P.{e}.{gate,up,down}.weight` (`gate_proj`/`up_proj`/
`down_proj`, `w1`/`w3`/`w2` or `linear`/`linear_v`/`linear_1`) becomes
`P.gate_up_proj [E, 2I, H]` (the gate rows of each expert, then its up rows) and
`P.down_proj [E, H, I]`, plus `P.gate_up_proj_bias [E, 2I]` and `P.down_proj_bias [E, H]`
when the experts have biases: what transformers v5 saves with `save_original_format=False`,
and exactly what `load_fused_moe` writes at tp_size 1, which fills them. Fused groups already
in that orientation (v5 names, GraniteMoe's `input_linear`/`output_linear`) are copied
unchanged. Transposed or interleaved fused groups (gpt-oss, Llama 4) are rewritten into the
same v5 orientation under their own names: a layout for engines, which the transformers
classes of those families cannot load (they keep `[E, H, 2I]`, gpt-oss with gate and up
interleaved). The shards record that gate and up are concatenated (`__metadata__`
`fastmoe_load.gate_up`), so `fml.open` and every loader built on it read such a result
right although `config.json` still names gpt-oss.

`to="per_expert"`: every fused group becomes `P.{e}.{gate}.weight [I, H]`, `P.{e}.{up}.weight
[I, H]`, `P.{e}.{down}.weight [H, I]` (and `.bias` vectors), copied from the zero-copy
per-expert views; per-expert groups are copied unchanged. The module names are, in order of
precedence: `expert_names`; the names recorded by a previous `to="fused"` conversion in the
shards' metadata, so a round trip restores the original names; `w1`/`w3`/`w2` for
Mixtral-style `model_type`s; else `gate_proj`/`up_proj`/`down_proj`.

Quantized (fp8) groups carry their scales with their weights: `P.{e}.{m}.weight_scale_inv`
block (or per-tensor) scales become `P.gate_up_proj_scale_inv [E, 2·ceil(I/bn), ceil(H/bk)]`
and `P.down_proj_scale_inv [E, ceil(H/bn), ceil(I/bk)]` (transformers' `FP8Experts`), and
static input scales `P.gate_up_proj_activation_scale [E]` / `P.down_proj_activation_scale
[E]` (gate and up share one input scale there: the up projection's); back again, each
expert gets its slices. Scales without a fused transformers form (compressed-tensors'
`weight_scale`) are refused with a `RequestError` before anything is written.

DBRX's stacked experts (`mlp.w1 / v1 / w2 [E·I, H]`) and gpt-oss' mxfp4 experts
(`gate_up_proj_blocks`, `gate_up_proj_scales`, ...) are refused with a `RequestError`:
transformers and vLLM read them in no other layout. Tensors that look like experts but cannot
be loaded (`Checkpoint.unsupported_groups()`) are copied unchanged, as is every other tensor,
byte for byte. The result is written to a temporary directory
beside `dst` and renamed into place when complete, in shards of at most `max_shard_size`
bytes with a `model.safetensors.index.json`; from a checkpoint directory, the small files
beside the weights (config, generation config, tokenizer) come along.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import shutil
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from .. import _fastmoe_load as native
from .._fastmoe_load import RequestError
from .._text import plural
from ..checkpoint import _DTYPES, Checkpoint, MoeLayer
from ..checkpoint import open as open_checkpoint
from ..loader import load_fused_moe
from ..progress import Progress, format_bytes

logger = logging.getLogger(__name__)

Target = Literal["fused", "per_expert"]
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
INDEX_FILE = "model.safetensors.index.json"
# Shard metadata entries of converted checkpoints: the per-expert module names the fused
# groups came from, so that converting back restores them; and that gate and up are
# concatenated, which config.json's model_type (gpt-oss) would otherwise contradict.
NAMES_METADATA_KEY = "fastmoe_load.expert_names"
GATE_UP_METADATA_KEY = "fastmoe_load.gate_up"
EXPERT_NAMES: dict[str, tuple[str, str, str]] = {
    "gate_proj": ("gate_proj", "up_proj", "down_proj"),
    "w1": ("w1", "w3", "w2"),
    "linear": ("linear", "linear_v", "linear_1"),
}
# Families whose per-expert checkpoints name the matrices w1/w3/w2 (transformers maps
# exactly these names to its fused parameters when loading them).
W1_MODEL_TYPES = frozenset({"mixtral", "minimax", "minimax_m2", "phimoe", "lfm2_moe"})
# Files that are weights in another format: copying them would contradict the conversion.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
# Bytes handed to `write` at a time: the progress line advances between them.
WRITE_CHUNK_BYTES = 64 << 20
_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "C64": 8, "F32": 4, "I32": 4, "U32": 4}
_ITEMSIZE.update(dict.fromkeys(("F16", "BF16", "I16", "U16"), 2))
_SAFETENSORS_DTYPES = {dtype: name for name, dtype in _DTYPES.items()}


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the result and how to produce its bytes when its shard is written."""

    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    nbytes: int
    read: Callable[[], memoryview]


@dataclass
class ConvertReport:
    """What a conversion wrote."""

    dst: str
    to: Target
    converted: list[str] = field(default_factory=list)  # prefixes of rewritten groups
    kept: list[str] = field(default_factory=list)  # prefixes of groups copied unchanged
    tensors: int = 0
    unchanged_tensors: int = 0
    shards: int = 0
    bytes: int = 0
    copied_files: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        groups = f"{plural(len(self.converted), 'expert group')} converted to {self.to}"
        if self.kept:
            groups += f", {len(self.kept)} already {self.to}"
        files = f"; copied {', '.join(self.copied_files)}" if self.copied_files else ""
        return (
            f"wrote {self.dst}: {plural(self.tensors, 'tensor')} ({format_bytes(self.bytes)}) "
            f"in {plural(self.shards, 'shard')}, {self.seconds:.1f} s: "
            f"{groups}, {plural(self.unchanged_tensors, 'other tensor')} unchanged{files}"
        )


def parse_size(text: str) -> int:
    """`5GB`, `500MB`, `40KB`, `2GiB` or a number of bytes (decimal units, as transformers)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    units |= {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}
    cleaned = text.strip().upper()
    number = cleaned.rstrip("KMGTIB")
    try:
        value = float(number) * units[cleaned[len(number) :].strip()]
    except (KeyError, ValueError):
        raise RequestError(f"not a size: {text!r} (use e.g. 5GB, 500MB or a byte count)") from None
    if not math.isfinite(value) or value < 1:
        raise RequestError(f"a shard size must be at least 1 byte, got {text!r}")
    return int(value)


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of `tensor` in row-major order (copied only where it is strided)."""
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def _safetensors_dtype(dtype: torch.dtype) -> str:
    return _SAFETENSORS_DTYPES[dtype]


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


class _FusedGroup:
    """One layer's fused tensors, filled by `load_fused_moe` when the first is written and
    released one by one as they are: host memory holds at most a layer or so at a time."""

    def __init__(self, ckpt: Checkpoint, prefix: str) -> None:
        self._ckpt, self._prefix = ckpt, prefix
        self._tensors: dict[str, torch.Tensor] | None = None

    def _load(self) -> dict[str, torch.Tensor]:
        layer = self._ckpt.experts(self._prefix)
        e, h, i = layer.num_experts, layer.hidden_size, layer.intermediate_size
        tensors = {
            "w13": torch.empty(e, 2 * i, h, dtype=layer.dtype),
            "w2": torch.empty(e, h, i, dtype=layer.dtype),
        }
        if layer.bias_dtype is not None:
            tensors["w13_bias"] = torch.empty(e, 2 * i, dtype=layer.bias_dtype)
            tensors["w2_bias"] = torch.empty(e, h, dtype=layer.bias_dtype)
        scales = {
            name: torch.empty(shape, dtype=dtype) for name, shape, dtype in _fused_scales(layer)
        }
        # tp_size 1 with every expert in order: w13 is exactly gate_up_proj [E, 2I, H], and
        # w13's block scales exactly gate_up_proj_scale_inv.
        load_fused_moe(
            self._ckpt,
            self._prefix,
            tensors["w13"],
            tensors["w2"],
            w13_bias=tensors.get("w13_bias"),
            w2_bias=tensors.get("w2_bias"),
            scales=scales,
        )
        return tensors | scales

    def take(self, target: str) -> memoryview:
        if self._tensors is None:
            self._tensors = self._load()
        return _tensor_bytes(self._tensors.pop(target))


def _fused_scales(layer: MoeLayer) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """`(destination, shape, dtype)` of the fused form of each of the group's scales, as
    `load_fused_moe` fills them at tp_size 1."""
    if layer.quantization is None:
        return []
    e, h, i = layer.num_experts, layer.hidden_size, layer.intermediate_size
    return [
        (f"{target}_{c.kind}", c.destination_shape(target, e, h, i), c.dtype)
        for c in layer.quantization.companions
        for target in ("w13", "w2")
    ]


def _check_convertible(ckpt: Checkpoint, layer: MoeLayer) -> None:
    """Refuses scales that have no fused transformers form, before anything is written."""
    unknown = [
        c.kind
        for c in (layer.quantization.companions if layer.quantization else ())
        if c.fused_suffix is None
    ]
    if unknown:
        raise RequestError(
            f"{ckpt.path}: experts at `{layer.prefix}` have {', '.join(unknown)} beside "
            f"their weights ({layer.quantization}), which have no fused transformers form; "
            "keep this checkpoint per expert"
        )


def _fused_outputs(ckpt: Checkpoint, prefix: str) -> list[OutputTensor]:
    layer = ckpt.experts(prefix)
    e, h, i = layer.num_experts, layer.hidden_size, layer.intermediate_size
    group = _FusedGroup(ckpt, prefix)
    parts: list[tuple[str, str, tuple[int, ...], torch.dtype]] = [
        ("gate_up_proj", "w13", (e, 2 * i, h), layer.dtype),
        ("down_proj", "w2", (e, h, i), layer.dtype),
    ]
    if layer.bias_dtype is not None:
        parts += [
            ("gate_up_proj_bias", "w13_bias", (e, 2 * i), layer.bias_dtype),
            ("down_proj_bias", "w2_bias", (e, h), layer.bias_dtype),
        ]
    for c in layer.quantization.companions if layer.quantization else ():
        for stem, proj in (("w13", "gate_up_proj"), ("w2", "down_proj")):
            shape = c.fused_shape(stem, e, h, i)
            parts.append((f"{proj}{c.fused_suffix}", f"{stem}_{c.kind}", shape, c.dtype))
    return [
        OutputTensor(
            f"{prefix}.{suffix}",
            _safetensors_dtype(dtype),
            shape,
            _nbytes(shape, dtype),
            lambda target=target: group.take(target),
        )
        for suffix, target, shape, dtype in parts
    ]


def _per_expert_outputs(
    ckpt: Checkpoint, prefix: str, names: tuple[str, str, str]
) -> list[OutputTensor]:
    layer = ckpt.experts(prefix)
    h, i = layer.hidden_size, layer.intermediate_size
    weights = (layer.w1, layer.w3, layer.w2)
    biases = (layer.b1, layer.b3, layer.b2)
    shapes = ((i, h), (i, h), (h, i))
    companions = layer.quantization.companions if layer.quantization else ()
    outputs = []
    for e in range(layer.num_experts):
        for c in companions:
            for module, matrix, (rows, cols) in zip(names, ("w1", "w3", "w2"), shapes, strict=True):
                shape = () if c.scheme == "tensor" else c.grid(rows, cols)
                outputs.append(
                    OutputTensor(
                        f"{prefix}.{e}.{module}.{c.kind}",
                        _safetensors_dtype(c.dtype),
                        shape,
                        _nbytes(shape, c.dtype),
                        lambda c=c, m=matrix, e=e: _tensor_bytes(layer.companion(c.kind, m, e)),
                    )
                )
        for module, view, shape in zip(names, weights, shapes, strict=True):
            outputs.append(
                OutputTensor(
                    f"{prefix}.{e}.{module}.weight",
                    _safetensors_dtype(layer.dtype),
                    shape,
                    _nbytes(shape, layer.dtype),
                    lambda view=view, e=e: _tensor_bytes(view(e)),
                )
            )
        if layer.bias_dtype is not None:
            for module, view, shape in zip(names, biases, shapes, strict=True):
                outputs.append(
                    OutputTensor(
                        f"{prefix}.{e}.{module}.bias",
                        _safetensors_dtype(layer.bias_dtype),
                        shape[:1],
                        _nbytes(shape[:1], layer.bias_dtype),
                        lambda view=view, e=e: _tensor_bytes(view(e)),
                    )
                )
    return outputs


class _Source:
    """The checkpoint being converted, read byte for byte for the tensors kept as they are."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self._buffers: dict[int, native.ShardBuffer] = {}

    def _bytes(self, shard: int, start: int, end: int) -> memoryview:
        buffer = self._buffers.get(shard)
        if buffer is None:
            buffer = self._buffers[shard] = self.ckpt._handle.shard(shard)
        return memoryview(buffer).cast("B")[start:end]

    def unchanged(self, name: str) -> OutputTensor:
        shard, dtype, shape, start, end = self.ckpt._handle.tensor_info(name)
        return OutputTensor(
            name, dtype, tuple(shape), end - start, lambda: self._bytes(shard, start, end)
        )


def _module_names(ckpt: Checkpoint, prefix: str) -> tuple[str, str, str]:
    """The gate/up/down module names of a per-expert group (its first tensor is expert 0's
    gate weight, `P.0.{gate}.weight`)."""
    layer = ckpt.experts(prefix)
    gate = layer.tensor_names[0][len(prefix) + 1 :].split(".")[1]
    for names in EXPERT_NAMES.values():
        if names[0] == gate:
            return names
    raise RequestError(f"{ckpt.path}: experts at `{prefix}`: unknown per-expert naming {gate!r}")


def recorded_metadata(paths: list[str]) -> dict[str, str]:
    """What an earlier conversion recorded in the shards' `__metadata__` (first shard that
    has it), e.g. `{"fastmoe_load.gate_up": "concatenated"}`."""
    for path in paths:
        try:
            with Path(path).open("rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length)) if length < 100 << 20 else {}
        except (OSError, ValueError, struct.error):
            continue
        metadata = header.get("__metadata__") or {}
        recorded = {k: v for k, v in metadata.items() if k.startswith("fastmoe_load.")}
        if recorded:
            return recorded
    return {}


def _recorded_names(ckpt: Checkpoint) -> tuple[str, str, str] | None:
    recorded = recorded_metadata(ckpt.shard_paths).get(NAMES_METADATA_KEY, "")
    names = tuple(recorded.split(","))
    return names if names in EXPERT_NAMES.values() else None  # type: ignore[return-value]


def _choose_names(ckpt: Checkpoint, expert_names: str | None) -> tuple[str, str, str]:
    if expert_names is not None:
        if expert_names not in EXPERT_NAMES:
            choices = ", ".join(EXPERT_NAMES)
            raise RequestError(f"unknown expert names {expert_names!r}: use one of {choices}")
        names, why = EXPERT_NAMES[expert_names], "as asked"
    elif (recorded := _recorded_names(ckpt)) is not None:
        names, why = recorded, "recorded in the checkpoint by an earlier conversion"
    elif ckpt.model_type in W1_MODEL_TYPES:
        names, why = EXPERT_NAMES["w1"], f"usual for model_type {ckpt.model_type}"
    else:
        names, why = EXPERT_NAMES["gate_proj"], "the default"
    logger.info("per-expert tensors will be named %s (%s)", "/".join(names), why)
    return names


def _shard_metadata(ckpt: Checkpoint, to: Target, converting: list[MoeLayer]) -> dict[str, str]:
    """`__metadata__` of every shard written: what a later conversion or reader needs."""
    metadata = {"format": "pt"}
    if to == "fused":
        # Fused groups copied unchanged keep what an earlier conversion said about them.
        metadata |= recorded_metadata(ckpt.shard_paths)
        metadata[GATE_UP_METADATA_KEY] = "concatenated"
        per_expert = [layer for layer in converting if layer.format == "per_expert"]
        if per_expert:
            metadata[NAMES_METADATA_KEY] = ",".join(_module_names(ckpt, per_expert[0].prefix))
    return metadata


def _converted_outputs(
    ckpt: Checkpoint, layer: MoeLayer, to: Target, names: tuple[str, str, str] | None
) -> list[OutputTensor]:
    outputs = (
        _fused_outputs(ckpt, layer.prefix)
        if to == "fused"
        else _per_expert_outputs(ckpt, layer.prefix, names or EXPERT_NAMES["gate_proj"])
    )
    logger.info(
        "%s: %s -> %s, %d tensors -> %d (E=%d H=%d I=%d %s%s)",
        layer.prefix,
        layer.format,
        to,
        len(layer.tensor_names),
        len(outputs),
        layer.num_experts,
        layer.hidden_size,
        layer.intermediate_size,
        str(layer.dtype).removeprefix("torch."),
        ", with biases" if layer.has_bias else "",
    )
    return outputs


def plan_outputs(
    ckpt: Checkpoint, to: Target, expert_names: str | None = None
) -> tuple[list[OutputTensor], ConvertReport, dict[str, str]]:
    """Every tensor of the result, in the checkpoint's order (each converted group where its
    first tensor was), the report so far and the shard metadata to record."""
    report = ConvertReport(dst="", to=to)
    source = _Source(ckpt)
    layers = ckpt.moe_layers()
    owner = {name: layer for layer in layers for name in layer.tensor_names}
    # Only "fused" is the v5 orientation: transposed and interleaved fused groups convert.
    converting = [layer for layer in layers if layer.format != to]
    stacked = [layer.prefix for layer in converting if layer.format == "stacked"]
    if stacked:
        raise RequestError(
            f"{ckpt.path}: experts at `{stacked[0]}` are stacked as DBRX stores them "
            "(`mlp.w1 / v1 / w2 [E·I, H]`), the only layout transformers' and vLLM's DBRX "
            "read: they are not converted; load them from this checkpoint"
        )
    per_expert_mx = [
        layer
        for layer in converting
        if layer.format == "per_expert"
        and layer.quantization is not None
        and layer.quantization.weights in ("mxfp4", "mxfp8")
    ]
    if per_expert_mx:
        layer = per_expert_mx[0]
        raise RequestError(
            f"{ckpt.path}: experts at `{layer.prefix}` are {layer.quantization.weights} per "
            "expert with e8m0 scales per 32 values (DeepSeek-V4, Kimi-K3, AMD Quark, MXFP8 "
            "releases), which the engines' loaders read only under the release's own "
            "per-expert names: they are not converted; load them from this checkpoint"
        )
    mxfp4 = [
        layer.prefix
        for layer in converting
        if layer.quantization is not None and layer.quantization.weights == "mxfp4"
    ]
    if mxfp4:
        raise RequestError(
            f"{ckpt.path}: experts at `{mxfp4[0]}` are mxfp4 as gpt-oss releases them "
            "(`gate_up_proj_blocks`, `_scales`), the only layout transformers' and vLLM's "
            "gpt-oss read: they are not converted; load them from this checkpoint"
        )
    if to == "fused":
        for layer in converting:
            _check_convertible(ckpt, layer)
    names = _choose_names(ckpt, expert_names) if to == "per_expert" and converting else None

    outputs: list[OutputTensor] = []
    for name in ckpt.keys():
        layer = owner.get(name)
        if layer is None:
            outputs.append(source.unchanged(name))
            report.unchanged_tensors += 1
        elif name != layer.tensor_names[0]:
            continue  # the group was written where its first tensor is
        elif layer.format == to:
            outputs += [source.unchanged(n) for n in layer.tensor_names]
            report.kept.append(layer.prefix)
            logger.info("%s: already %s, copied unchanged", layer.prefix, to)
        else:
            outputs += _converted_outputs(ckpt, layer, to, names)
            report.converted.append(layer.prefix)
    _check_unique(ckpt, outputs)
    _warn_about_layouts(ckpt, converting, to)
    return outputs, report, _shard_metadata(ckpt, to, converting)


def _check_unique(ckpt: Checkpoint, outputs: list[OutputTensor]) -> None:
    counts = Counter(o.name for o in outputs)
    clashes = sorted(name for name, count in counts.items() if count > 1)
    if clashes:
        raise RequestError(
            f"{ckpt.path}: converted tensor names clash with tensors already there: "
            f"{', '.join(clashes[:3])}"
        )


def _warn_about_layouts(ckpt: Checkpoint, converted: list[MoeLayer], to: Target) -> None:
    """Transposed and interleaved groups convert fine, but transformers cannot read them back."""
    odd = sorted(
        {layer.format for layer in converted if layer.format not in ("fused", "per_expert")}
    )
    if not odd:
        return
    if to == "fused":
        hint = (
            "the result is for engines: transformers' classes for these families keep the "
            "experts transposed or interleaved and cannot load it"
        )
        what = "into the v5 layout (gate_up_proj [E, 2I, H], gate rows then up rows)"
    else:
        hint = "transformers has no per-expert format for these families and cannot load it"
        what = "as one tensor per expert"
    logger.warning("rewrote %s experts %s: %s", "/".join(odd), what, hint)


# ---------------------------------------------------------------------------------------------
# Writing


def _shards(outputs: list[OutputTensor], max_bytes: int) -> list[list[OutputTensor]]:
    """Consecutive tensors packed into shards of at most `max_bytes` (a larger tensor gets a
    shard of its own)."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in outputs:
        if shards[-1] and size + tensor.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards if shards[0] else []


def write_safetensors(
    path: Path, tensors: list[OutputTensor], metadata: dict[str, str], progress: Progress
) -> None:
    """Writes one safetensors file, streaming each tensor's bytes as they are produced."""
    # Wider elements first: with the header padded to 8 bytes, every tensor then starts at a
    # multiple of its element size, so readers may view the mapping in place.
    tensors = sorted(tensors, key=lambda t: -_ITEMSIZE.get(t.dtype, 1))
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors:
            data = t.read()
            if len(data) != t.nbytes:  # a bug, not a user mistake: let it surface as one
                raise AssertionError(f"{t.name}: produced {len(data)} bytes, not {t.nbytes}")
            for start in range(0, t.nbytes, WRITE_CHUNK_BYTES):
                chunk = data[start : start + WRITE_CHUNK_BYTES]
                f.write(chunk)
                progress.advance(len(chunk))
            del data


def _side_files(src: Path) -> list[Path]:
    """Files that travel with the weights: a directory's small files, or the `config.json`
    that the checkpoint reader itself uses beside a single `.safetensors` file."""
    if not src.is_dir():
        config = src.parent / "config.json"
        return [config] if config.is_file() else []
    files = []
    for entry in sorted(src.iterdir()):
        if entry.name.startswith(".") or entry.name == INDEX_FILE:
            continue
        if not entry.is_file():
            logger.info("not copied: %s (not a file)", entry.name)
        elif entry.name.endswith(WEIGHT_SUFFIXES) or entry.name.endswith(".index.json"):
            logger.info("not copied: %s (weights or an index of weights)", entry.name)
        else:
            files.append(entry)
    return files


def _check_destination(dst: Path) -> None:
    if dst.is_symlink() or dst.exists():
        if not dst.is_dir():
            raise RequestError(f"{dst}: the destination exists and is not a directory")
        if any(dst.iterdir()):
            raise RequestError(f"{dst}: the destination exists and is not empty")


def _partial_directory(dst: Path) -> Path:
    """A new directory beside `dst` to write into, renamed to `dst` once complete."""
    # Created with mkdir, not mkdtemp, so that the result gets the usual permissions.
    partial = dst.parent / f".{dst.name}.partial-{secrets.token_hex(4)}"
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        partial.mkdir()
    except OSError as error:
        raise OSError(
            error.errno, f"{dst}: cannot create the destination: {error.strerror}"
        ) from None
    return partial


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    to: Target = "fused",
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    expert_names: str | None = None,
    interleaved: bool | None = None,
    progress: bool | None = None,
) -> ConvertReport:
    """Writes checkpoint `src` to the new directory `dst` with its routed experts in the
    `to` layout (see the module's documentation). `dst` must not exist or be empty; on
    error nothing is left there. `progress` shows a progress line on stderr (default: when
    it is a terminal)."""
    if to not in ("fused", "per_expert"):
        raise RequestError(f"unknown target layout {to!r}: use 'fused' or 'per_expert'")
    if max_shard_size < 1:
        raise RequestError(f"max_shard_size must be at least 1 byte, got {max_shard_size}")
    start = time.perf_counter()
    src_path, dst_path = Path(src), Path(dst)
    _check_destination(dst_path)
    with open_checkpoint(src_path, interleaved=interleaved) as ckpt:
        outputs, report, metadata = plan_outputs(ckpt, to, expert_names)
        if not report.converted:
            logger.warning(
                "nothing to convert: every routed-expert group is already %s (%s); writing a copy",
                to,
                plural(len(report.kept), "group"),
            )
        side_files = _side_files(src_path)
        if not any(f.name == "config.json" for f in side_files):
            logger.warning("%s has no config.json: transformers cannot load the result", src)
        partial = _partial_directory(dst_path)
        try:
            report.shards, report.bytes = _write(
                partial, outputs, metadata, max_shard_size, progress
            )
            for file in side_files:
                shutil.copyfile(file, partial / file.name)
                report.copied_files.append(file.name)
                logger.info("copied %s", file.name)
            partial.rename(dst_path)  # replaces an empty directory at `dst`
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    report.dst = str(dst_path)
    report.tensors = len(outputs)
    report.seconds = time.perf_counter() - start
    return report


def _write(
    directory: Path,
    outputs: list[OutputTensor],
    metadata: dict[str, str],
    max_shard_size: int,
    progress: bool | None,
) -> tuple[int, int]:
    """Writes the shards and the index; returns the shard count and the tensor bytes."""
    shards = _shards(outputs, max_shard_size)
    total = sum(t.nbytes for t in outputs)
    weight_map = {}
    with Progress(total, "convert", enabled=progress) as bar:
        for k, tensors in enumerate(shards, start=1):
            name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(directory / name, tensors, metadata, bar)
            weight_map |= {t.name: name for t in tensors}
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return len(shards), total
