"""Open checkpoints and their routed-expert groups, as zero-copy torch views."""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from functools import cached_property
from types import TracebackType
from typing import Any, Literal

import torch

from . import _fastmoe_load as native
from ._fastmoe_load import RequestError
from ._text import plural
from ._validate import as_index
from .staging import DEFAULT_BUFFER_BYTES, DEFAULT_BUFFER_COUNT, StagingPool

_DTYPES: dict[str, torch.dtype] = {
    name: dtype
    for name, dtype in {
        "BOOL": torch.bool,
        "U8": torch.uint8,
        "I8": torch.int8,
        "I16": torch.int16,
        "U16": getattr(torch, "uint16", None),
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I32": torch.int32,
        "U32": getattr(torch, "uint32", None),
        "F32": torch.float32,
        "F64": torch.float64,
        "I64": torch.int64,
        "U64": getattr(torch, "uint64", None),
        "C64": torch.complex64,
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
        "F8_E5M2": getattr(torch, "float8_e5m2", None),
        "F8_E4M3FNUZ": getattr(torch, "float8_e4m3fnuz", None),
        "F8_E5M2FNUZ": getattr(torch, "float8_e5m2fnuz", None),
        "F8_E8M0": getattr(torch, "float8_e8m0fnu", None),
    }.items()
    if dtype is not None
}


def torch_dtype(name: str, what: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name; `what` names the tensor for the error."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise native.LayoutError(
            f"{what}: dtype {name} has no torch equivalent in torch {torch.__version__}"
        ) from None


def covering_blocks(first: int, count: int, block: int) -> int:
    """How many `block`-value blocks rows `[first, first + count)` touch: `count / block` on
    an even split that falls on the blocks, one more at each end that cuts one."""
    return -(-(first + count) // block) - first // block


@dataclass(frozen=True)
class Companion:
    """One kind of tensor that rides with quantized expert weights.

    `kind` is its name in checkpoints and in vLLM (`w13_{kind}`, `w2_{kind}`):
    `weight_scale_inv` (fp8 block scales, DeepSeek-V3 and transformers' FP8 layout),
    `weight_scale` (compressed-tensors, ModelOpt, fbgemm; NVFP4's float8 block scales),
    `weight_scale_2` (NVFP4's per-tensor global scale), `input_scale` (static activation
    scales), `weight_shape` (compressed-tensors' int32 `[rows, cols]` of a packed weight) or
    `weight_zero_point` (compressed-tensors' zero points of asymmetric integer weights, int32
    `[rows/8, cols/group]` for int4: eight points of consecutive rows an int32, a `block`
    grid of `(8, group)`), `scales` (GPTQ's and AWQ's group scales, float16 `[in/group,
    out]`, stored input-first: a `group` grid of `(1, group)` over the `[out, in]` weight),
    `qzeros` (their int32 zero points `[in/group, out/8]`, stored input-first: a `block` grid
    of `(8, group)`), `weight_global_scale` and `input_global_scale` (compressed-tensors
    NVFP4's per-tensor global scales of the weights and activations, ModelOpt's
    `weight_scale_2` and `input_scale`; vLLM keeps gate's and up's, `[E, 2]`).
    `scheme` says how one value maps onto the weight: `block` (one per `block[0] x block[1]`
    values), `group` (a block of one row: `block` is `(1, 16)` for NVFP4), `channel` (one per
    output row), `tensor` (one per matrix) or `whole` (`block[1]` values that describe the
    whole matrix). `merged_w13`: vLLM keeps one value per expert for gate and up together
    (fp8's `w13_input_scale [E]`, the up projection's); otherwise it keeps both (`[E, 2]`).
    `fused_suffix`: the name transformers gives the fused form after `gate_up_proj`/
    `down_proj` (`_scale_inv`, `_activation_scale`), or None where it has none
    (compressed-tensors' `weight_scale`)."""

    kind: str
    scheme: str
    block: tuple[int, int] | None
    dtype: torch.dtype
    merged_w13: bool
    fused_suffix: str | None

    def grid(self, rows: int, cols: int) -> tuple[int, int]:
        """`(rows, cols)` of this companion for a `rows x cols` weight."""
        if self.scheme == "whole":
            assert self.block is not None
            return self.block
        if self.scheme in ("block", "group"):
            assert self.block is not None
            return math.ceil(rows / self.block[0]), math.ceil(cols / self.block[1])
        return (rows, 1) if self.scheme == "channel" else (1, 1)

    def destination_shape(
        self, target: str, experts: int, hidden: int, shard: int, first: int = 0
    ) -> tuple[int, ...]:
        """The shape vLLM 0.33's fp8 and NVFP4 MoE methods give `{target}_{kind}` (`target`
        `w13` or `w2`) for `experts` local experts and an intermediate shard of `shard` rows:
        block scales `[E, 2·ceil(I/tp/bn), ceil(H/bk)]` and `[E, ceil(H/bn), ceil(I/tp/bk)]`
        (NVFP4's 16-value groups: `[E, 2·I/tp, H/16]`, `[E, H, I/tp/16]`), per-channel
        `[E, 2·I/tp, 1]` and `[E, H, 1]`, per-tensor `[E, 2]` and `[E]`, merged input scales
        `[E]`. A shard starting at row `first` off the blocks takes every block it touches
        (`covering_blocks`)."""
        if self.scheme == "whole":  # `w13_weight_shape [E, 2]`, the up projection's
            return (experts, *self.grid(0, 0)[1:])
        if target == "w13":
            if self.merged_w13:
                return (experts,)
            if self.scheme == "tensor":
                return (experts, 2)
            rows, cols = self.grid(shard, hidden)
            if self.scheme in ("block", "group"):
                assert self.block is not None
                rows = covering_blocks(first, shard, self.block[0])
            return (experts, 2 * rows, cols)
        if self.scheme == "tensor":
            return (experts,)
        rows, cols = self.grid(hidden, shard)
        if self.scheme in ("block", "group"):
            assert self.block is not None
            cols = covering_blocks(first, shard, self.block[1])
        return (experts, rows, cols)

    def fused_shape(self, target: str, experts: int, hidden: int, shard: int) -> tuple[int, ...]:
        """The shape transformers' `FP8Experts` gives `gate_up_proj{fused_suffix}` (`target`
        `w13`) or `down_proj{fused_suffix}` (`w2`): the grid's `[E, 2·rows, cols]` and
        `[E, rows, cols]` (per-tensor scales `[E, 2, 1]` and `[E, 1, 1]`), `[E]` for the input
        scale gate and up share. The bytes are those of `destination_shape`."""
        if self.merged_w13:
            return (experts,)
        if target == "w13":
            rows, cols = self.grid(shard, hidden)
            return (experts, 2 * rows, cols)
        return (experts, *self.grid(hidden, shard))


@dataclass(frozen=True)
class Quantization:
    """How a group's expert weights are quantized: `method` is `quant_method` from
    `config.json` (`fp8`, `compressed-tensors`, `fbgemm_fp8`, `modelopt`), or where only the
    files say so `fp8` (float8 weights), `modelopt` (NVFP4) or `mxfp4`; `weights` is `fp8`,
    `nvfp4` (two e2m1 values a byte along the input dimension, float8 scales per 16),
    `mxfp4` (the same with e8m0 scales per 32, stored as uint8 or float8_e8m0fnu: gpt-oss,
    DeepSeek-V4 (whose bytes are typed int8), Kimi-K3, AMD Quark), `mxfp8` (float8 e4m3 with
    e8m0 scales per 32: ModelOpt MXFP8, MiniMax-M3), `int4` (eight values an int32,
    compressed-tensors `pack-quantized`, GPTQ and AWQ; `int8` for four, or int8 weights of
    compressed-tensors `int-quantized`); `companions` lists the tensors beside each weight."""

    method: str
    companions: tuple[Companion, ...]
    weights: str = "fp8"

    @property
    def weight_scale(self) -> Companion:
        """The weights' own scale (`weight_scale_inv` or `weight_scale`)."""
        kinds = ("weight_scale_inv", "weight_scale", "scales")
        return next(c for c in self.companions if c.kind in kinds)

    @property
    def scheme(self) -> str:
        """`block`, `channel` or `tensor`: the weight scale's grid."""
        return self.weight_scale.scheme

    @property
    def block_size(self) -> tuple[int, int] | None:
        return self.weight_scale.block

    def companion(self, kind: str) -> Companion | None:
        return next((c for c in self.companions if c.kind == kind), None)

    def __str__(self) -> str:
        scale = self.weight_scale
        grid = scale.scheme
        if scale.block is not None:
            rows, cols = scale.block
            grid = f"{cols}-value group" if scale.scheme == "group" else f"{rows}x{cols} block"
        kinds = ", ".join(c.kind for c in self.companions)
        dtype = str(scale.dtype).removeprefix("torch.")
        # fp8 weights are what every method part of the name already implies, as mxfp4's does.
        implied = self.weights in ("fp8", self.method)
        name = self.method if implied else f"{self.method} {self.weights}"
        return f"{name}, {grid} scales in {dtype} ({kinds})"


# How OCP MX scales are stored: float8_e8m0fnu, or the same exponent bytes as uint8.
E8M0_DTYPES = tuple(
    d for d in (torch.uint8, getattr(torch, "float8_e8m0fnu", None)) if d is not None
)


def _weights_name(pack: int, companions: tuple[Companion, ...], dtype: torch.dtype) -> str:
    """What the weights are, from how they pack, their dtype and their weight scale: two e2m1
    values a byte beside e8m0 scales (`mxfp4`) or beside float8 ones (`nvfp4`); int8 values
    (`int8`); float8 weights beside e8m0 scales of one per 32 values of a row (`mxfp8`) or any
    other (`fp8`); integers packed in int32 (`int4`, `int8`)."""
    kinds = ("weight_scale_inv", "weight_scale")
    scale = next((c for c in companions if c.kind in kinds), None)
    e8m0 = scale is not None and scale.dtype in E8M0_DTYPES
    if pack == 2:
        return "mxfp4" if e8m0 else "nvfp4"
    if dtype == torch.int8:  # compressed-tensors `int-quantized`
        return "int8"
    if pack == 1:
        mx = e8m0 and scale is not None and scale.scheme == "group" and scale.block == (1, 32)
        return "mxfp8" if mx else "fp8"
    return f"int{32 // pack}"


class UnsupportedWarning(UserWarning):
    """A checkpoint holds experts, or declares a quantization, that fastmoe_load does not
    load."""


@dataclass(frozen=True)
class UnsupportedGroup:
    """Tensors that look like routed experts (an expert index in their names, or a leading
    expert dimension under an `experts`/`moe` module) but that no layout fastmoe_load loads
    covers. `reason` starts with `unknown quantization:`, `unread tensors:` (beside a group
    that loads) or `unknown naming:`, and names a tensor with its dtype and shape."""

    prefix: str
    tensor_names: tuple[str, ...]
    reason: str

    def __str__(self) -> str:
        return f"{self.prefix} ({plural(len(self.tensor_names), 'tensor')}): {self.reason}"


class MoeLayer:
    """One routed-expert group: its layout, sizes, and per-expert zero-copy views.

    Attributes: `prefix` (the experts' module path, e.g. `model.layers.3.mlp.experts`);
    `format` (`fused` for transformers v5 `gate_up_proj [E, 2I, H]`, `fused_transposed` for
    `[E, H, 2I]` as in Llama 4, `fused_interleaved` / `fused_transposed_interleaved` where gate
    and up alternate as in gpt-oss, or `per_expert` for one tensor per expert and matrix);
    `num_experts`, `hidden_size` (H), `intermediate_size` (I, per expert, before TP);
    `dtype` (the weights'), `bias_dtype` (None without biases); `tensor_names` (every stored
    tensor of the group, scales included); `quantization` (None for unquantized experts);
    `pack`: values one stored weight element holds along the input dimension (2 for NVFP4's
    uint8 weights, 8 for int4 in int32 `weight_packed`, else 1): H and I count values, the
    views `[I, H/pack]` and `[H, I/pack]` stored elements; `out_pack`: the same along the
    output dimension (8 for AWQ's int4, which packs outputs: views `[I/8, H]`, `[H/8, I]`),
    else 1; `k_first`: the weights and their block companions are stored input-first, the
    transpose of the `[out, in]` matrix (GPTQ's `qweight [in/8, out]`, AWQ's `[in, out/8]`,
    their `scales [in/group, out]` and `qzeros`), so views are strided and a load may land
    them input-first too (`load_fused_moe(..., k_first=True)`); `discarded`: tensors of the
    group that no destination takes (GPTQ's `g_idx`, which vLLM drops too).
    """

    def __init__(self, ckpt: Checkpoint, info: native.MoeLayerInfo) -> None:
        self._ckpt = ckpt
        self.prefix: str = info.prefix
        self.format: str = info.format
        self.num_experts: int = info.num_experts
        self.hidden_size: int = info.hidden_size
        self.intermediate_size: int = info.intermediate_size
        self.pack: int = info.pack
        self.out_pack: int = info.out_pack
        self.k_first: bool = info.k_first
        self.discarded: tuple[str, ...] = tuple(info.discarded)
        where = f"{ckpt.path}: experts at `{info.prefix}`"
        self.dtype: torch.dtype = torch_dtype(info.dtype, where)
        self.bias_dtype: torch.dtype | None = (
            None if info.bias_dtype is None else torch_dtype(info.bias_dtype, where)
        )
        self.tensor_names: tuple[str, ...] = tuple(info.tensor_names)
        self.quantization: Quantization | None = None
        if info.quant_method is not None:
            companions = tuple(
                Companion(
                    c.kind,
                    c.scheme,
                    c.block,
                    torch_dtype(c.dtype, where),
                    c.merged_w13,
                    c.fused_suffix,
                )
                for c in info.companions
            )
            pack = max(info.pack, info.out_pack)
            self.quantization = Quantization(
                info.quant_method, companions, _weights_name(pack, companions, self.dtype)
            )

    @property
    def has_bias(self) -> bool:
        return self.bias_dtype is not None

    @property
    def transposed(self) -> bool:
        return "transposed" in self.format

    @property
    def interleaved(self) -> bool:
        return "interleaved" in self.format

    def __repr__(self) -> str:
        quantized = "" if self.quantization is None else f", quantization={self.quantization}"
        return (
            f"MoeLayer({self.prefix!r}, format={self.format!r}, E={self.num_experts}, "
            f"H={self.hidden_size}, I={self.intermediate_size}, dtype={self.dtype}, "
            f"bias={self.has_bias}{quantized})"
        )

    def tp_split_error(self, tp_size: int) -> str | None:
        """Why `tp_size` cannot split these experts (a TP split must give every rank the same
        share of the intermediate size, on whole packs and scale blocks), or None where it
        can."""
        try:
            self._ckpt._handle.plan(self.prefix, "w2", tp_rank=0, tp_size=tp_size, experts=[])
        except RequestError as error:
            return str(error)
        return None

    def _view(
        self, name: str, expert: int, vector: bool = False, kind: str | None = None
    ) -> torch.Tensor:
        where = f"{self._ckpt.path}: experts at `{self.prefix}`: "
        expert = as_index(expert, "expert", where)
        tensor, offset, rows, cols, row_stride, col_stride = self._ckpt._handle.matrix(
            self.prefix, name, expert, kind
        )
        base = self._ckpt.tensor(tensor)
        if vector:
            return base.as_strided((cols,), (col_stride,), offset)
        return base.as_strided((rows, cols), (row_stride, col_stride), offset)

    def w1(self, expert: int) -> torch.Tensor:
        """Gate projection `[I, H]` of `expert` (`[I, H/pack]` packed)."""
        return self._view("w1", expert)

    def w3(self, expert: int) -> torch.Tensor:
        """Up projection `[I, H]` of `expert` (`[I, H/pack]` packed)."""
        return self._view("w3", expert)

    def w2(self, expert: int) -> torch.Tensor:
        """Down projection `[H, I]` of `expert` (`[H, I/pack]` packed)."""
        return self._view("w2", expert)

    def b1(self, expert: int) -> torch.Tensor:
        """Gate bias `[I]` of `expert`."""
        return self._view("b1", expert, vector=True)

    def b3(self, expert: int) -> torch.Tensor:
        """Up bias `[I]` of `expert`."""
        return self._view("b3", expert, vector=True)

    def b2(self, expert: int) -> torch.Tensor:
        """Down bias `[H]` of `expert`."""
        return self._view("b2", expert, vector=True)

    def companion(self, kind: str, matrix: str, expert: int) -> torch.Tensor:
        """A zero-copy view of the `kind` companion (e.g. `weight_scale_inv`) of `matrix`
        (`w1`, `w3` or `w2`) of `expert`, as a matrix on its grid over the weight: block
        scales `[ceil(rows/bn), ceil(cols/bk)]`, per-channel `[rows, 1]`, per-tensor `[1, 1]`;
        in the file's dtype. Raises `RequestError` where the group has no such companion."""
        if matrix not in ("w1", "w3", "w2"):
            raise RequestError(f"{self._ckpt.path}: matrix must be w1, w3 or w2, not {matrix!r}")
        return self._view(matrix, expert, kind=kind)

    def w1_scale(self, expert: int) -> torch.Tensor:
        """The gate projection's weight scale of `expert` (see `companion`)."""
        return self.companion(self._weight_scale_kind(), "w1", expert)

    def w3_scale(self, expert: int) -> torch.Tensor:
        """The up projection's weight scale of `expert` (see `companion`)."""
        return self.companion(self._weight_scale_kind(), "w3", expert)

    def w2_scale(self, expert: int) -> torch.Tensor:
        """The down projection's weight scale of `expert` (see `companion`)."""
        return self.companion(self._weight_scale_kind(), "w2", expert)

    def _weight_scale_kind(self) -> str:
        if self.quantization is None:
            raise RequestError(
                f"{self._ckpt.path}: experts at `{self.prefix}` are not quantized: no scales"
            )
        return self.quantization.weight_scale.kind


class Checkpoint:
    """An open checkpoint. Tensors are zero-copy views of the files' mappings; a view keeps
    its mapping alive after `close()`. Views of one checkpoint share copy-on-write pages: a
    write into a view shows in later views of the same checkpoint, but never in the file,
    in loads, or in another `open` of the file."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        num_threads: int | None = None,
        interleaved: bool | None = None,
        staging_bytes: int = DEFAULT_BUFFER_BYTES,
        staging_buffers: int = DEFAULT_BUFFER_COUNT,
        io: Literal["mmap", "pread"] = "mmap",
        prefetch: bool = False,
    ) -> None:
        where = f"{os.fspath(path)}: "
        if num_threads is not None:
            num_threads = as_index(num_threads, "num_threads", where, minimum=1)
        if io not in ("pread", "mmap"):
            raise RequestError(f"{where}io must be 'pread' or 'mmap', not {io!r}")
        staging = StagingPool(staging_bytes, staging_buffers)  # checked now, allocated on use
        self._handle = native.Checkpoint(
            os.fspath(path),
            num_threads=num_threads,
            interleaved=interleaved,
            io=io,
            prefetch=bool(prefetch),
        )
        self._shards: dict[int, native.ShardBuffer] = {}
        self._layers: dict[str, MoeLayer] | None = None
        self._staging = staging
        scheme = self._handle.unsupported_quantization
        if scheme is not None:
            # A warning, not a log record: visible without any logging set up.
            warnings.warn(
                f"{self.path}: config.json declares {scheme} quantization, which fastmoe_load "
                "does not load; experts quantized so are listed by unsupported_groups() and "
                "not loaded",
                UnsupportedWarning,
                stacklevel=3,
            )

    @property
    def staging(self) -> StagingPool:
        """The pinned buffers that CUDA loads from this checkpoint go through."""
        return self._staging

    @property
    def path(self) -> str:
        return os.fspath(self._handle.path)

    @property
    def closed(self) -> bool:
        return self._handle.closed

    @property
    def num_threads(self) -> int:
        return self._handle.num_threads

    @property
    def io(self) -> str:
        return self._handle.io

    @property
    def prefetch(self) -> bool:
        return self._handle.prefetch

    @property
    def shard_paths(self) -> list[str]:
        return [os.fspath(p) for p in self._handle.shard_paths()]

    @cached_property
    def config(self) -> dict[str, Any] | None:
        """`config.json`, if the checkpoint has one."""
        text = self._handle.config_json()
        return None if text is None else json.loads(text)

    @property
    def model_type(self) -> str | None:
        """`model_type` from `config.json` (also where it sits under `text_config`)."""
        return self._handle.model_type

    def keys(self) -> list[str]:
        return self._handle.keys()

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._handle

    def tensor(self, name: str) -> torch.Tensor:
        """A zero-copy view of tensor `name` (read it; writes stay in this process)."""
        shard, dtype, shape, start, end = self._handle.tensor_info(name)
        dtype = torch_dtype(dtype, f"{self.path}: tensor `{name}`")
        if end == start:
            return torch.empty(shape, dtype=dtype)
        buffer = self._shards.get(shard)
        if buffer is None:
            buffer = self._shards[shard] = self._handle.shard(shard)
        count = (end - start) // dtype.itemsize
        return torch.frombuffer(buffer, dtype=dtype, count=count, offset=start).view(shape)

    def moe_layers(self) -> list[MoeLayer]:
        """Every routed-expert group, in layer order."""
        if self._layers is None:
            layers = (MoeLayer(self, info) for info in self._handle.moe_layers())
            self._layers = {layer.prefix: layer for layer in layers}
            unsupported = self.unsupported_groups()
            if unsupported:
                more = f" and {len(unsupported) - 1} more" if len(unsupported) > 1 else ""
                warnings.warn(
                    f"{self.path}: experts that cannot be loaded (see unsupported_groups()): "
                    f"{unsupported[0]}{more}",
                    UnsupportedWarning,
                    stacklevel=2,
                )
        return list(self._layers.values())

    def unsupported_groups(self) -> list[UnsupportedGroup]:
        """Groups of tensors that look like routed experts but that `moe_layers()` does not
        list because they cannot be loaded, each with the reason, in layer order."""
        return [
            UnsupportedGroup(prefix, tuple(names), reason)
            for prefix, names, reason in self._handle.unsupported_groups()
        ]

    def experts(self, prefix: str) -> MoeLayer:
        """The routed-expert group at `prefix` (the same object `moe_layers()` lists)."""
        if self._layers is None:
            self.moe_layers()
        assert self._layers is not None
        layer = self._layers.get(prefix)
        if layer is None:
            unsupported = next((g for g in self.unsupported_groups() if g.prefix == prefix), None)
            if unsupported is not None:
                raise native.LayoutError(
                    f"{self.path}: experts at `{prefix}` cannot be loaded: {unsupported.reason}"
                )
            # Not a group: the native lookup raises TensorNotFoundError naming those there are.
            layer = MoeLayer(self, self._handle.layer(prefix))
        return layer

    def close(self) -> None:
        """Releases the checkpoint; views and loads already made keep working."""
        self._shards.clear()
        self._staging.close()
        self._handle.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else plural(len(self.shard_paths), "shard")
        return f"Checkpoint({self.path!r}, {state})"


def open(
    path: str | os.PathLike[str],
    *,
    num_threads: int | None = None,
    interleaved: bool | None = None,
    staging_bytes: int = DEFAULT_BUFFER_BYTES,
    staging_buffers: int = DEFAULT_BUFFER_COUNT,
    io: Literal["mmap", "pread"] = "mmap",
    prefetch: bool = False,
) -> Checkpoint:
    """Opens a `.safetensors` file or a checkpoint directory.

    `num_threads` sets the copy threads (default: the CPUs available, at most 16).
    `interleaved` overrides whether fused gate/up tensors alternate gate and up rows
    (default: what the shards' metadata records, as `convert` writes it, else from
    `config.json`'s `model_type`, e.g. gpt-oss); an override that contradicts the record
    raises `CheckpointError`.
    `staging_bytes` and `staging_buffers` size the pinned buffers of CUDA loads.
    `io` chooses how long contiguous runs are read: copies out of the memory map (`mmap`,
    default, fastest on a warm page cache) or `pread` (strided gathers, as in TP-sliced
    `w2` or transposed layouts, read the map either way). Every load checks the files just
    before it starts, and a file cut short during a copy fails the load with
    `FileChangedError` in both modes (the copy threads catch the SIGBUS such a read raises;
    zero-copy views are plain memory maps and are not guarded). `prefetch` starts the disk
    reads of each staging window as it begins, for checkpoints that are not in the page
    cache (a first load after boot).
    """
    return Checkpoint(
        path,
        num_threads=num_threads,
        interleaved=interleaved,
        staging_bytes=staging_bytes,
        staging_buffers=staging_buffers,
        io=io,
        prefetch=prefetch,
    )
