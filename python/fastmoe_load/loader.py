"""`load_fused_moe`: fill vLLM-layout `FusedMoE` parameters from a checkpoint."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ._fastmoe_load import RequestError
from ._validate import as_index
from .checkpoint import Checkpoint, Companion, MoeLayer, covering_blocks
from .progress import Progress, execute_with_progress
from .staging import Destination, StagingPool


@dataclass(frozen=True)
class LoadStats:
    """What one load moved: `bytes` landed in the destinations (and were read from the
    checkpoint, which is the same count: a rank reads only what it keeps)."""

    bytes: int
    seconds: float

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")


# GPU scratch for transposed expert tensors: bytes of stored rows transposed at a time.
TRANSPOSE_SCRATCH_BYTES = 128 << 20


# Checkpoint dtypes whose bytes a destination of another dtype takes as they are, because
# both name the same bytes: e8m0 exponents are uint8 in vLLM's OCP MX parameters (a numeric
# copy would turn 2^-7 into 0), and DeepSeek-V4 types its packed e2m1 bytes int8.
_SAME_BYTES: frozenset[tuple[torch.dtype, torch.dtype]] = frozenset(
    (stored, torch.uint8)
    for stored in (torch.int8, getattr(torch, "float8_e8m0fnu", None))
    if stored is not None
)


def same_bytes(stored: torch.dtype, destination: torch.dtype) -> bool:
    """Whether a `destination`-typed parameter takes `stored` values as bytes, unconverted
    (`int8` packed fp4 and `float8_e8m0fnu` scales into `uint8`), or the dtypes are equal."""
    return stored == destination or (stored, destination) in _SAME_BYTES


class _Request:
    """Checks one load request; every message names the checkpoint and the experts prefix."""

    def __init__(self, ckpt: Checkpoint, prefix: str) -> None:
        self.where = f"{ckpt.path}: experts at `{prefix}`: "

    def error(self, message: str) -> RequestError:
        return RequestError(self.where + message)

    def index(self, value: object, what: str) -> int:
        return as_index(value, what, self.where)

    def shard(self, layer: MoeLayer, shard: object) -> tuple[int, int]:
        if not isinstance(shard, tuple | list) or len(shard) != 2:
            raise self.error(
                f"shard must be (first, count) rows of the intermediate size, got {shard!r}"
            )
        first, count = (self.index(v, "a shard bound") for v in shard)
        if first + count > layer.intermediate_size:
            raise self.error(
                f"shard rows [{first}, {first + count}) are not in the intermediate size "
                f"{layer.intermediate_size}"
            )
        return first, count

    def experts(self, layer: MoeLayer, local_experts: Iterable[object] | None) -> list[int]:
        if local_experts is None:
            return list(range(layer.num_experts))
        if not isinstance(local_experts, Iterable):
            raise self.error(
                f"local_experts must be a sequence of expert ids, got {local_experts!r}"
            )
        experts = [self.index(e, "a local_experts entry") for e in local_experts]
        bad = [e for e in experts if not 0 <= e < layer.num_experts]
        if bad:
            raise self.error(f"expert ids {bad[:5]} are not in [0, {layer.num_experts})")
        return experts

    def destination(
        self,
        name: str,
        tensor: object,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        allow_cast: bool = False,
        quantized: bool = False,
    ) -> torch.Tensor:
        """`tensor` checked as the destination `name` of values of `shape` and `dtype`;
        `quantized`: it takes quantized weights, which mean something only with their
        scales."""
        if not isinstance(tensor, torch.Tensor):
            raise self.error(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if same_bytes(dtype, tensor.dtype):
            pass  # moved as bytes, never converted
        elif tensor.dtype != dtype and not allow_cast:
            raise self.error(
                f"{name} has dtype {tensor.dtype} but the checkpoint stores {dtype}; "
                "fastmoe_load casts only when asked to (allow_cast=True)"
            )
        # Packed values (fp4 bytes, int4 in int32s), e8m0 exponents kept as bytes and zero
        # points mean nothing as numbers of another type; shapes are plain integers.
        castable = (dtype.is_floating_point and tensor.dtype.is_floating_point) or (
            name.endswith("weight_shape")
        )
        if not same_bytes(dtype, tensor.dtype) and quantized:
            raise self.error(
                f"{name} has dtype {tensor.dtype} but the checkpoint stores quantized "
                f"{dtype} weights, which mean something only with their scales: a cast "
                f"would drop the scales. Use a {dtype} destination and load the scales beside "
                "it (fastmoe_load dequantizes only gpt-oss mxfp4 experts, in load_model)"
            )
        if not same_bytes(dtype, tensor.dtype) and not castable:
            raise self.error(
                f"{name} has dtype {tensor.dtype} but the checkpoint stores {dtype}, values "
                f"that a cast would not convert (packed or encoded): use a {dtype} destination"
            )
        if tuple(tensor.shape) != shape:
            raise self.error(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")
        if tensor.device.type not in ("cpu", "cuda"):
            raise self.error(f"{name} is on {tensor.device}; use a CPU or CUDA tensor")
        if not tensor.is_contiguous():
            raise self.error(f"{name} must be contiguous")
        return tensor.detach()


def plan_destinations(
    ckpt: Checkpoint,
    prefix: str,
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    tp_rank: int = 0,
    tp_size: int = 1,
    local_experts: Iterable[int] | None = None,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    scales: Mapping[str, torch.Tensor | None] | None = None,
    allow_cast: bool = False,
    w13_interleaved: bool = False,
    k_first: bool = False,
    shard: tuple[int, int] | None = None,
) -> list[Destination]:
    """Checks a load request completely and plans it, writing nothing."""
    if not isinstance(ckpt, Checkpoint):
        raise RequestError(f"expected a fastmoe_load Checkpoint, got {type(ckpt).__name__}")
    if not isinstance(prefix, str):
        raise RequestError(f"{ckpt.path}: prefix must be a str, got {prefix!r}")
    request = _Request(ckpt, prefix)
    layer = ckpt.experts(prefix)
    tp_rank, tp_size = request.index(tp_rank, "tp_rank"), request.index(tp_size, "tp_size")
    if not 0 <= tp_rank < tp_size:
        raise request.error(f"tp_rank {tp_rank} is not in [0, tp_size={tp_size})")
    inter = layer.intermediate_size
    if shard is not None:
        shard = request.shard(layer, shard)
    elif inter % tp_size:
        raise request.error(
            f"intermediate size {inter} does not split into tp_size={tp_size} equal shards"
        )
    else:
        split_error = layer.tp_split_error(tp_size)
        if split_error is not None:  # names the tp sizes that fit; before any shape is checked
            raise RequestError(split_error)
    experts = request.experts(layer, local_experts)
    n = len(experts)

    if k_first and w13_interleaved:
        raise request.error("w13 is input-first (k_first) or interleaved, not both")
    shapes = destination_shapes(layer, n, tp_size, k_first=k_first, shard=shard)
    given = {"w13": w13, "w2": w2, "w13_bias": w13_bias, "w2_bias": w2_bias}
    wanted: list[tuple[str, object, tuple[int, ...], torch.dtype]] = []
    for name, tensor in given.items():
        if tensor is None:
            continue
        if name not in shapes:
            raise request.error(f"{name} given but the checkpoint has no expert biases")
        wanted.append((name, tensor, *shapes[name]))
    wanted += _scale_destinations(request, layer, scales, shapes)
    quantized = layer.quantization is not None
    tensors = [
        request.destination(
            *w, allow_cast=allow_cast, quantized=quantized and w[0] in ("w13", "w2")
        )
        for w in wanted
    ]
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise request.error(f"destinations are on several devices: {sorted(map(str, devices))}")

    destinations = []
    for (name, _, _, dtype), tensor in zip(wanted, tensors, strict=True):
        cast_from = None if same_bytes(dtype, tensor.dtype) else dtype
        if (
            name in ("w13", "w2")
            and layer.transposed
            and _transposes_on_device(tensor)
            and not k_first
        ):
            if cast_from is not None:
                raise request.error(
                    f"{name}: transposed experts are loaded in the checkpoint's dtype {dtype}"
                )
            # Read the stored rows (plain runs) and transpose on the GPU, a few experts at
            # a time; a CPU gather of the 2-byte entries runs at a few GB/s at best.
            stored = "w13_pairs" if name == "w13" and layer.interleaved else name
            per_expert = tensor[0].nbytes if n else 1
            step = max(1, TRANSPOSE_SCRATCH_BYTES // per_expert)
            for k in range(0, n, step):
                plan = ckpt._handle.plan(
                    prefix,
                    name,
                    tp_rank=tp_rank,
                    tp_size=tp_size,
                    experts=experts[k : k + step],
                    stored_order=True,
                    shard=shard,
                )
                pairs = w13_interleaved and name == "w13"
                chunk = tensor[k : k + step]
                destinations.append(Destination(name, chunk, plan, stored, interleaved=pairs))
        else:
            plan = ckpt._handle.plan(
                prefix,
                name,
                tp_rank=tp_rank,
                tp_size=tp_size,
                experts=experts,
                interleaved=w13_interleaved and name.startswith("w13"),
                k_first=k_first,
                shard=shard,
            )
            if plan.nbytes != tensor.numel() * dtype.itemsize:
                # The copy threads write exactly the plan's bytes: never past the tensor.
                raise request.error(
                    f"{name}: the checkpoint holds {plan.nbytes} bytes for it, the "
                    f"destination {tuple(tensor.shape)} takes {tensor.numel() * dtype.itemsize}"
                )
            destinations.append(Destination(name, tensor, plan, cast_from=cast_from))
    for d in destinations:
        d.plan.check_intact()
    return destinations


def destination_shapes(
    layer: MoeLayer,
    experts: int,
    tp_size: int,
    *,
    k_first: bool = False,
    shard: tuple[int, int] | None = None,
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The shape and checkpoint dtype of every destination `load_fused_moe` fills for
    `experts` local experts at `tp_size` (or for the rows `shard = (first, count)` of the
    intermediate size), by name: `w13`, `w2`, `w13_bias` and `w2_bias` where the group has
    biases, and `w{13,2}_{kind}` for each companion (see `Companion.destination_shape`).
    Weights are `[E, 2*I/tp/out_pack, H/pack]` and `[E, H/out_pack, I/tp/pack]`
    (`MoeLayer.pack`, `out_pack`).

    With `k_first`, each expert's matrices are transposed (input-first), as vLLM's GPTQ and
    AWQ Marlin methods (`AutoGPTQMoEMethod`, `AutoAWQMoEMethod`, `is_transposed`) create
    them: GPTQ int4 `w13 [E, H/8, 2*I/tp]`, `w2 [E, I/tp/8, H]` int32, `w13_scales
    [E, H/group, 2*I/tp]`, `w2_scales [E, I/tp/group, H]` float16, `w13_qzeros [E, H/group,
    2*I/tp/8]`, `w2_qzeros [E, I/tp/group, H/8]` int32; AWQ `w13 [E, H, 2*I/tp/8]`, `w2
    [E, I/tp, H/8]` and the same scales and zero points. Per-tensor companions and biases
    keep their shapes.

    Without `shard`, raises the `RequestError` `load_fused_moe` raises for a `tp_size` that
    cannot split the experts (the intermediate size into equal shards, on whole packs and
    scale blocks; the message lists the sizes that fit), rather than shapes no load fills."""
    where = f"{layer._ckpt.path}: experts at `{layer.prefix}`: "
    experts = as_index(experts, "experts", where)
    tp_size = as_index(tp_size, "tp_size", where, minimum=1)
    if shard is None:
        if layer.intermediate_size % tp_size:  # the words of `plan_destinations`
            raise RequestError(
                f"{where}intermediate size {layer.intermediate_size} does not split into "
                f"tp_size={tp_size} equal shards"
            )
        split_error = layer.tp_split_error(tp_size)
        if split_error is not None:
            raise RequestError(split_error)
    first, rows = (0, layer.intermediate_size // tp_size) if shard is None else shard
    n, hidden, pack, out = experts, layer.hidden_size, layer.pack, layer.out_pack
    shapes = {
        "w13": ((n, 2 * rows // out, hidden // pack), layer.dtype),
        "w2": ((n, hidden // out, covering_blocks(first, rows, pack)), layer.dtype),
    }
    if layer.bias_dtype is not None:
        shapes["w13_bias"] = ((n, 2 * rows), layer.bias_dtype)
        shapes["w2_bias"] = ((n, hidden), layer.bias_dtype)
    for companion in layer.quantization.companions if layer.quantization else ():
        for target in ("w13", "w2"):
            shape = companion.destination_shape(target, n, hidden, rows, first)
            shapes[f"{target}_{companion.kind}"] = (shape, companion.dtype)
    if k_first:
        transposed = (
            "w13",
            "w2",
            *(f"w{t}_{c.kind}" for c in _block_companions(layer) for t in ("13", "2")),
        )
        for name in transposed:
            shape, dtype = shapes[name]
            shapes[name] = ((*shape[:-2], shape[-1], shape[-2]), dtype)
    return shapes


def _block_companions(layer: MoeLayer) -> list[Companion]:
    """Companions on a block or group grid: those an input-first destination transposes."""
    companions = layer.quantization.companions if layer.quantization else ()
    return [c for c in companions if c.scheme in ("block", "group") and not c.merged_w13]


def _scale_destinations(
    request: _Request,
    layer: MoeLayer,
    scales: Mapping[str, torch.Tensor | None] | None,
    shapes: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
) -> list[tuple[str, object, tuple[int, ...], torch.dtype]]:
    """`(name, tensor, shape, checkpoint dtype)` of each scale destination given. Every
    companion of a quantized group needs one, or an explicit None: packed or fp8 weights
    without their scales mean nothing."""
    if scales is not None and not isinstance(scales, Mapping):
        raise request.error(f"scales must map parameter names to tensors, got {scales!r}")
    known = {k: v for k, v in shapes.items() if k not in ("w13", "w2", "w13_bias", "w2_bias")}
    unknown = sorted(set(scales or {}) - set(known))
    if unknown:
        what = (
            f"its scales fill {', '.join(sorted(known))}"
            if known
            else "the checkpoint's experts are not quantized"
        )
        raise request.error(f"no scales for {', '.join(map(str, unknown))}: {what}")
    missing = sorted(set(known) - set(scales or {}))
    if missing:
        raise request.error(
            f"the experts are {layer.quantization}, and scales has no {', '.join(missing)}: "
            "pass a destination for each (vLLM's parameter names), or None for one filled "
            "elsewhere"
        )
    return [(name, t, *known[name]) for name, t in (scales or {}).items() if t is not None]


def load_fused_moe(
    ckpt: Checkpoint,
    prefix: str,
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    tp_rank: int = 0,
    tp_size: int = 1,
    local_experts: Iterable[int] | None = None,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    scales: Mapping[str, torch.Tensor | None] | None = None,
    allow_cast: bool = False,
    w13_interleaved: bool = False,
    k_first: bool = False,
    shard: tuple[int, int] | None = None,
    staging: StagingPool | None = None,
    progress: Progress | None = None,
) -> LoadStats:
    """Fills `w13 [E_local, 2*I/tp, H]` and `w2 [E_local, H, I/tp]` (and the biases, if
    given) with the experts at `prefix`, for TP rank `tp_rank` of `tp_size`.

    Slot `k` receives global expert `local_experts[k]` (default: every expert in order; an
    expert may fill several slots). Everything is checked before the first byte is written,
    so on error the destinations are untouched.

    Quantized experts (`ckpt.experts(prefix).quantization`): `w13`/`w2` take the weights as
    stored (e.g. `torch.float8_e4m3fn`), and `scales` maps vLLM's scale parameter names to
    their destinations, each sliced with its weights for the TP rank and the local experts:
    `w13_weight_scale_inv [E_local, 2·ceil(I/tp/bn), ceil(H/bk)]` and `w2_weight_scale_inv
    [E_local, ceil(H/bn), ceil(I/tp/bk)]` for `bn x bk` block scales (vLLM's `Fp8MoEMethod`);
    `w13_weight_scale [E_local, 2·I/tp, 1]` / `[E_local, 2]` and `w2_weight_scale [E_local, H,
    1]` / `[E_local]` per channel / per tensor (compressed-tensors, ModelOpt); `w13_input_scale`
    and `w2_input_scale [E_local]` (static activation scales; w13 takes the up projection's,
    as vLLM's fp8 and ModelOpt loading leaves it; for compressed-tensors vLLM refuses gate
    and up scales that differ, and so does `fastmoe_load.engines.vllm`). NVFP4 (ModelOpt,
    vLLM's `ModelOptNvFp4FusedMoE`): `w13 [E_local, 2*I/tp, H/2]` and `w2 [E_local, H,
    I/tp/2]` uint8 (two values a byte),
    `w13_weight_scale [E_local, 2*I/tp, H/16]` and `w2_weight_scale [E_local, H, I/tp/16]`
    float8_e4m3fn, `w13_weight_scale_2` and `w13_input_scale [E_local, 2]` (gate's, up's),
    `w2_weight_scale_2` and `w2_input_scale [E_local]` float32. int4 (compressed-tensors,
    vLLM's `CompressedTensorsWNA16MoEMethod`): `w13 [E_local, 2*I/tp, H/8]`, `w2 [E_local, H,
    I/tp/8]` int32, `w13_weight_scale`/`w2_weight_scale` group scales, `w13_weight_shape`/
    `w2_weight_shape [E_local, 2]`, and for asymmetric weights `w13_weight_zero_point
    [E_local, 2*I/tp/8, H/group]`, `w2_weight_zero_point [E_local, H/8, I/tp/group]` int32.
    A TP split must fall on the scale blocks and packs (vLLM's rule):
    `RequestError` names the tp sizes that do.

    mxfp4 (gpt-oss, vLLM's `GptOssMxfp4MoEMethod`): `w13 [E_local, 2*I/tp, H/2]` and `w2
    [E_local, H, I/tp/2]` uint8, `w13_weight_scale [E_local, 2*I/tp, H/32]` and
    `w2_weight_scale [E_local, H, I/tp/32]` uint8 (e8m0), biases as stored (bfloat16).

    GPTQ and AWQ (per expert `qweight`, `scales`, `qzeros`, stored input-first; GPTQ's
    `g_idx` is read by no destination, as vLLM drops it): with `k_first=True` every expert
    lands input-first, as vLLM's `AutoGPTQMoEMethod` and `AutoAWQMoEMethod` create their
    parameters (`w13_qweight`, `w13_scales`, `w13_qzeros`, ...; shapes in
    `destination_shapes`), each row of a destination a run of the file. Without it they land
    `[out, in]` like every other scheme (a gather of 4-byte elements).

    Every companion needs a destination in `scales` (or None, for one the caller fills
    otherwise); a quantized group loaded without them is a `RequestError`. `w2_bias` is not
    sharded: every TP rank gets it whole (vLLM adds it once, so its adapter zeroes it on TP
    ranks other than 0).

    With `w13_interleaved=True`, gate and up alternate in `w13`, its bias and its per-row
    scales (row `2r` gate's row `r`, row `2r+1` up's), as vLLM's gpt-oss layers (activation
    `swigluoai`) keep them; from a checkpoint that interleaves them too (gpt-oss), each
    expert's rows for the rank are read as one run. Block scales spanning several rows
    cannot be interleaved (`RequestError`).

    `shard = (first, count)` takes rows `[first, first + count)` of the intermediate size
    instead of the even split, for engines that split otherwise (vLLM's gpt-oss: whole
    32-value blocks a rank, the last short; its block-aligned fp8 TP: whole 128-blocks a
    rank, the last ranks short or empty): `I/tp` above reads `count`. The rows must fall on
    the packs of packed weights; scale blocks are taken whole, every block the rows touch
    (`checkpoint.covering_blocks`), for the caller to narrow where an engine refines them.

    Dtypes must match the checkpoint's unless `allow_cast=True`: then a destination of
    another dtype is filled through scratch memory on its device in the checkpoint's dtype,
    converted by torch's `copy_` as vLLM's own loader converts (exact from bfloat16,
    float16 and float8_e8m0fnu scales to float32 parameters; rounding where narrower).
    Only floating-point values (and `weight_shape`'s integers) are cast; packed weights,
    zero points and mxfp4's e8m0 bytes never are (`RequestError`). `uint8` destinations take
    `float8_e8m0fnu` scales and DeepSeek-V4's `int8`-typed fp4 bytes as bytes, with or
    without `allow_cast` (vLLM's OCP MX parameters are `uint8`).

    Per-expert OCP MX (DeepSeek-V4, Kimi-K3, AMD Quark; vLLM's `Mxfp4MoEMethod`,
    `QuarkOCP_MX_MoEMethod`): as gpt-oss' mxfp4 without biases, `w13 [E_local, 2*I/tp, H/2]`
    and `w2 [E_local, H, I/tp/2]` uint8, `w13_weight_scale [E_local, 2*I/tp, H/32]` and
    `w2_weight_scale [E_local, H, I/tp/32]` uint8 (DeepSeek-V4's `….scale` is the
    `weight_scale` companion); Quark's static `w13_input_scale`/`w2_input_scale [E_local]`.
    MXFP8 (ModelOpt, compressed-tensors, MiniMax-M3; `ModelOptMxFp8FusedMoE`,
    `CompressedTensorsW8A8Mxfp8MoEMethod`): `w13 [E_local, 2*I/tp, H]` and `w2 [E_local, H,
    I/tp]` float8_e4m3fn with the same uint8 scales.

    CUDA destinations are filled through pinned staging buffers (`staging`, default: the
    checkpoint's pool) with asynchronous copies; the caller's current stream sees the
    result without further synchronisation. `stats.seconds` then covers the host side only.
    `progress` (see `fastmoe_load.progress`) is advanced as bytes land.
    """
    destinations = plan_destinations(
        ckpt,
        prefix,
        w13,
        w2,
        tp_rank=tp_rank,
        tp_size=tp_size,
        local_experts=local_experts,
        w13_bias=w13_bias,
        w2_bias=w2_bias,
        scales=scales,
        allow_cast=allow_cast,
        w13_interleaved=w13_interleaved,
        k_first=k_first,
        shard=shard,
    )
    start = time.perf_counter()
    nbytes = fill(ckpt, destinations, staging=staging, progress=progress)
    return LoadStats(bytes=nbytes, seconds=time.perf_counter() - start)


def fill(
    ckpt: Checkpoint,
    destinations: Sequence[Destination],
    *,
    staging: StagingPool | None = None,
    progress: Progress | None = None,
) -> int:
    """Executes planned destinations (all on one device): CPU tensors directly, CUDA ones
    through the staging pipeline; stored-order plans land in scratch on the device first and
    are transposed there, and plans of another dtype are converted there. Returns the bytes
    read."""
    # Casts share the pipeline with the rest: their scratch is the destination's size.
    scratch = {
        id(d): torch.empty(d.tensor.shape, dtype=d.cast_from, device=d.tensor.device)
        for d in destinations
        if d.cast_from is not None
    }
    direct = [
        Destination(d.name, scratch.get(id(d), d.tensor), d.plan)
        for d in destinations
        if d.stored is None
    ]
    if direct:
        _fill_direct(ckpt, direct, staging, progress)
    for d in destinations:
        if id(d) in scratch:
            d.tensor.copy_(scratch[id(d)])  # on the caller's stream, after the transfers
    for d in destinations:
        if d.stored is not None:
            scratch = torch.empty(d.plan.nbytes, dtype=torch.uint8, device=d.tensor.device)
            _fill_direct(ckpt, [Destination(d.name, scratch, d.plan)], staging, progress)
            _transpose_stored(d.stored, scratch, d.tensor, d.interleaved)  # caller's stream
    return sum(d.plan.nbytes for d in destinations)


def _fill_direct(
    ckpt: Checkpoint,
    destinations: Sequence[Destination],
    staging: StagingPool | None,
    progress: Progress | None,
) -> None:
    if destinations[0].tensor.device.type == "cuda":
        (staging or ckpt.staging).fill(destinations, progress)
    else:
        for d in destinations:
            execute_with_progress(d.plan, d.tensor.data_ptr(), progress)


def _transposes_on_device(tensor: torch.Tensor) -> bool:
    """Whether transposed expert tensors are transposed where `tensor` lives rather than
    gathered by the copy threads: on a GPU, which does it at memory speed."""
    return tensor.device.type == "cuda"


def _transpose_stored(
    kind: str, stored: torch.Tensor, target: torch.Tensor, interleaved: bool = False
) -> None:
    """Writes `stored` (a stored-order plan's bytes, see `CopyPlan::stored_order` in the
    core) into `target`, in vLLM's layout: w13 gate rows then up rows, or with `interleaved`
    gate/up row pairs."""
    n, hidden = target.shape[0], target.shape[-2] if kind == "w2" else target.shape[-1]
    values = stored.view(target.dtype)
    if kind == "w2":  # [n, I/tp, H] -> [n, H, I/tp]
        target.copy_(values.view(n, -1, hidden).transpose(1, 2))
        return
    if kind == "w13":  # [n, 2, H, I/tp] as [n, 2 (gate, up), I/tp, H]
        source = values.view(n, 2, hidden, -1).transpose(2, 3)
    else:  # w13_pairs: [n, H, I/tp, 2] (gate/up pairs) as [n, 2, I/tp, H]
        source = values.view(n, hidden, -1, 2).permute(0, 3, 2, 1)
    if interleaved:  # [n, I/tp, 2, H]
        target.view(n, -1, 2, hidden).copy_(source.transpose(1, 2))
    else:  # [n, 2, I/tp, H]
        target.view(n, 2, -1, hidden).copy_(source)
