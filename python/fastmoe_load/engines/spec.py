"""One engine-neutral description of what a rank's FusedMoE layer holds (`ExpertLayerSpec`),
and the one filler for it (`fill_layer`).

Each engine's adapter (`engines.vllm`, `engines.sglang`) reads its own layer and builds a
spec: the layer's parameters by destination name, the TP rank and size, the checkpoint
(logical) expert of each local slot, how gate and up are arranged in `w13`, which
parameters hold every global expert, and whether its engine's own loading has been checked
to write what fastmoe_load writes for such a layer. Everything else is decided here, once,
for every engine: whether the layer can be filled (`unfillable`), the checks of the whole
layer before the first byte is written, and the fill itself.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .._fastmoe_load import RequestError
from ..checkpoint import Checkpoint, MoeLayer
from ..loader import destination_shapes, fill, plan_destinations, same_bytes
from ..staging import Destination
from .wna16 import Wna16

logger = logging.getLogger("fastmoe_load")

# Destinations of the weights and of the biases; every other one is a companion `w13_{kind}`
# / `w2_{kind}` (see `load_fused_moe`).
WEIGHTS = ("w13", "w2")
BIASES = ("w13_bias", "w2_bias")
# How far gate's and up's value of a merged companion may differ where they must agree:
# vLLM's own tolerance for compressed-tensors input scales.
MERGED_TOLERANCE = 1e-5


@dataclass(frozen=True)
class ExpertLayerSpec:
    """What one rank's FusedMoE layer holds, for one checkpoint expert group.

    - `group`: the checkpoint's experts (`Checkpoint.experts(prefix)`).
    - `parameters`: the layer's tensor for each destination it fills, by `load_fused_moe`'s
      names: `w13 [E_local, 2*I/tp, H/pack]`, `w2 [E_local, H, I/tp/pack]`, optionally
      `w13_bias`, `w2_bias`, and `w{13,2}_{kind}` for each companion (scales, zero points).
      A destination absent here is left to the engine's own loader (biases) or, for a
      companion, is an error (`problem`).
    - `names`: the engine's parameter name of each destination, for reports.
    - `tp_rank`, `tp_size`: the layer's MoE tensor-parallel rank and size.
    - `experts`: the checkpoint (logical) expert of each local slot: linear or round-robin
      placement, EPLB replicas (one expert in several slots).
    - `interleaved`: gate and up rows alternate in `w13` (vLLM's gpt-oss `swigluoai`).
    - `shard`: the rank's rows `(first, count)` of the intermediate size where its engine
      splits otherwise than evenly (vLLM's gpt-oss: whole 32-value blocks, the last rank
      short; block-aligned fp8 TP: whole 128-blocks, the last ranks short or empty).
    - `padding`: how parameters larger than the rank's values (kernels that round sizes up)
      take them: `"corner"`, every parameter's leading corner (vLLM's gpt-oss loaders);
      `"halves"`, as vLLM's `FusedMoE.weight_loader` places them, gate at the start of the
      first half of `w13`'s rows and up at the start of the second, `w2` and the rest in
      their leading corner; None, no parameter may be larger. Padding stays as allocated,
      unless `pad_fill`: then weights' padding is zeroed and scales' set to one, as vLLM's
      block-aligned fp8 TP loading leaves it.
    - `scale_refine`: block scales on a finer square grid than the checkpoint's (vLLM's
      refined fp8 block, a divisor of the checkpoint's): each value repeated over the finer
      blocks it covers, for the rank's rows.
    - `global_experts`: destinations held for every physical expert on every rank (one
      scalar per expert and matrix: `w13_input_scale [P, 2]`, `w2_input_scale [P]`), as
      kernels that quantize with every expert's scales keep them; `global_rows` holds the
      checkpoint (logical) expert of each of their rows (EPLB replicas repeat one).
    - `w2_bias_first_rank`: `w2_bias` is added once before the all-reduce over TP ranks, so
      ranks other than 0 hold zeros.
    - `merged_must_agree`: a companion the engine keeps once for gate and up together
      (`w13_input_scale [E_local]`) is refused where gate's and up's differ by more than
      `MERGED_TOLERANCE` (compressed-tensors in vLLM); otherwise the layer keeps up's, as
      vLLM's fp8 and ModelOpt loading leaves it.
    - `k_first`: each expert's parameters are input-first, the transpose of the shapes above
      (`w13 [E_local, H/pack, 2*I/tp/out_pack]`, block companions alike), as GPTQ and AWQ
      methods keep them (see `destination_shapes`).
    - `wna16`: the layer keeps GPTQ or AWQ experts output-first in bytes, as vLLM's
      `MoeWNA16Method` does (`engines.wna16`): every destination is read input-first into
      scratch, every group the rank's rows touch, and converted into its parameter on the
      parameter's device; `parameters` then hold the layer's `w13_qweight`, `w13_scales`, ...
      (their zero points only where the layer has them: symmetric GPTQ's are consumed and
      dropped, as vLLM drops them).
    - `left_to_engine`: companion destinations (`w13_input_scale`, ...) the engine's own
      loader fills, where it keeps them otherwise than fastmoe_load would write them (SGLang's
      NVFP4 input scales: one value for gate and up, whichever it reads last, for every
      physical expert): neither written nor consumed, so that their checkpoint tensors reach
      the engine's loader.
    - `unverified`: why the engine's own loading may write something else into this layer
      (another quantization method, a refined scale grid, ...), or None: such a layer is
      left to the engine's loader, never filled by `load_format="fastmoe"`.
    """

    group: MoeLayer
    parameters: Mapping[str, torch.Tensor]
    names: Mapping[str, str]
    tp_rank: int
    tp_size: int
    experts: Sequence[int]
    interleaved: bool
    shard: tuple[int, int] | None = None
    padding: str | None = None
    pad_fill: bool = False
    scale_refine: int | None = None
    global_experts: tuple[str, ...] = ()
    global_rows: Sequence[int] = ()
    w2_bias_first_rank: bool = False
    merged_must_agree: bool = False
    unverified: str | None = field(default=None, compare=False)
    k_first: bool = False
    left_to_engine: tuple[str, ...] = ()
    wna16: Wna16 | None = None

    @property
    def where(self) -> str:
        return f"experts at `{self.group.prefix}`"

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of the values each destination takes for this rank."""
        group = self.group
        if self.wna16 is not None:
            return self.wna16.shapes(len(self.experts), group.hidden_size, self.rows[1])
        shapes = {name: shape for name, (shape, _) in self.load_shapes().items()}
        refine = self.scale_refine
        if refine is not None:
            count = self.rows[1]
            hidden = group.hidden_size
            for name in self.refined():
                shapes[name] = (
                    (len(self.experts), 2 * -(-count // refine), -(-hidden // refine))
                    if name.startswith("w13")
                    else (len(self.experts), -(-hidden // refine), -(-count // refine))
                )
        rows = len(self.global_rows)
        for name in self.global_experts:
            shapes[name] = (rows, 2) if name.startswith("w13") else (rows,)
        return shapes

    @property
    def rows(self) -> tuple[int, int]:
        """The rank's rows `(first, count)` of the intermediate size."""
        if self.shard is not None:
            return self.shard
        count = self.group.intermediate_size // self.tp_size
        return self.tp_rank * count, count

    @property
    def load_shard(self) -> tuple[int, int] | None:
        """The rows `load_fused_moe` is asked for: explicit where they are not the even
        split, or where a refined grid (or MoeWNA16's halved groups) means blocks are taken
        whole and narrowed after."""
        whole_blocks = self.scale_refine or self.wna16 is not None
        return self.rows if self.shard is not None or whole_blocks else None

    @property
    def load_k_first(self) -> bool:
        """Whether `load_fused_moe` reads the experts input-first (`k_first`): for
        parameters that are, and for MoeWNA16's scratch, in the checkpoint's order."""
        return self.k_first or self.wna16 is not None

    def load_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """What `load_fused_moe` writes for the rank (block scales on the checkpoint's grid,
        every block the rows touch, before any refinement or padding)."""
        experts, tp_size = len(self.experts), self.tp_size
        return destination_shapes(
            self.group, experts, tp_size, k_first=self.load_k_first, shard=self.load_shard
        )

    def refined(self) -> list[str]:
        """The block-scale destinations `scale_refine` puts on a finer grid."""
        quantization = self.group.quantization
        if self.scale_refine is None or quantization is None:
            return []
        return [
            f"{target}_{c.kind}"
            for c in quantization.companions
            if c.scheme == "block"
            for target in ("w13", "w2")
        ]

    def problem(self) -> str | None:
        """Why this layer cannot be filled from its group as described (a TP split off the
        group's packs or blocks, a parameter missing or of the wrong shape), or None."""
        group = self.group
        if self.shard is None and group.intermediate_size % self.tp_size:
            return (
                f"intermediate size {group.intermediate_size} does not split into "
                f"tp_size={self.tp_size} equal shards"
            )
        split_error = self._split_error()
        if split_error is not None:
            return split_error
        if self.wna16 is not None:
            wna16_error = self.wna16.problem(group, self.rows[1])
            if wna16_error is not None:
                return f"{self.where}: {wna16_error}"
        bad = sorted(
            {e for e in (*self.experts, *self.global_rows) if not 0 <= e < group.num_experts}
        )
        if bad:
            return f"{self.where}: the layer places experts {bad[:5]} the checkpoint does not have"
        expected = self.expected_shapes()
        companions = [
            name for name in expected if name not in (*WEIGHTS, *BIASES, *self.left_to_engine)
        ]
        missing = [n for n in (*WEIGHTS, *companions) if n not in self.parameters]
        if missing:
            return (
                f"{self.where} are {group.quantization}, but the layer has no "
                f"{', '.join(self.names.get(n, n) for n in missing)}: build it with the "
                "checkpoint's quantization config"
            )
        disagreeing = self._disagreeing_merged()
        if disagreeing is not None:
            return disagreeing
        for name, tensor in self.parameters.items():
            want, have = expected[name], tuple(tensor.shape)
            if have == want:
                continue
            fits = len(have) == len(want) and all(a >= b for a, b in zip(have, want, strict=True))
            if not (fits and self.padding is not None and name not in self.global_experts):
                return (
                    f"{self.where}: {self.names.get(name, name)} has shape {have}, expected {want}"
                )
        return self._wna16_dtype_error()

    def _wna16_dtype_error(self) -> str | None:
        """Where a MoeWNA16 layer's packed bytes are not uint8, or its scales not floats."""
        if self.wna16 is None:
            return None
        for name, tensor in self.parameters.items():
            scales = name.endswith("_scales")
            if scales != tensor.is_floating_point() or not (scales or tensor.dtype == torch.uint8):
                want = "a floating-point dtype" if scales else "torch.uint8"
                return (
                    f"{self.where}: {self.names.get(name, name)} is {tensor.dtype}, where "
                    f"MoeWNA16Method keeps {want}"
                )
        return None

    def _split_error(self) -> str | None:
        """Why the rank's rows do not fall on the group's packs and scale blocks (or, with
        `scale_refine`, on the finer grid), or None."""
        group = self.group
        first, count = self.rows
        refine = self.scale_refine
        if refine is not None:
            companions = group.quantization.companions if group.quantization else ()
            blocks = {c.block for c in companions if c.scheme == "block"}
            fits = all(
                b is not None and b[0] % refine == 0 and b[1] % refine == 0 for b in blocks
            ) and not (first % refine or count % refine or group.hidden_size % refine)
            if not fits:
                return (
                    f"{self.where}: a {refine}x{refine} scale grid does not divide the "
                    f"checkpoint's blocks {sorted(blocks)} and the rank's rows [{first}, "
                    f"{first + count}) of H={group.hidden_size}"
                )
        elif self.shard is None and self.wna16 is None:
            return group.tp_split_error(self.tp_size)
        try:
            # The core checks the rows against the packs; blocks are taken whole.
            self.group._ckpt._handle.plan(
                group.prefix, "w2", tp_rank=0, tp_size=1, experts=[], shard=self.rows
            )
        except RequestError as error:
            return str(error)
        return None

    def _disagreeing_merged(self) -> str | None:
        """Where gate and up hold different values of a companion the layer keeps once for
        both, and the engine refuses that: which expert, and the two values."""
        quantization = self.group.quantization
        if not self.merged_must_agree or quantization is None:
            return None
        for companion in quantization.companions:
            if not companion.merged_w13:
                continue
            for e in sorted(set(self.experts)):
                gate = self.group.companion(companion.kind, "w1", e).float().flatten()
                up = self.group.companion(companion.kind, "w3", e).float().flatten()
                if (gate - up).abs().max() > MERGED_TOLERANCE:
                    shown = [f"{v:g}" for v in (*gate.tolist(), *up.tolist())]
                    half = len(shown) // 2
                    return (
                        f"{self.where}: expert {e} has gate {companion.kind} "
                        f"{', '.join(shown[:half])} and up {companion.kind} "
                        f"{', '.join(shown[half:])}, which the layer keeps as one "
                        f"({self.names.get('w13_' + companion.kind)}); its engine refuses them "
                        "unless they are equal: re-export the checkpoint with one value per "
                        "expert for gate and up"
                    )
        return None

    def unfillable(self) -> str | None:
        """Why `load_format="fastmoe"` leaves this layer to the engine's own loader, in one
        line, or None where fastmoe_load writes exactly what the engine's loader would."""
        if self.unverified is not None:
            return self.unverified
        weights = self.parameters.get("w13")
        if self.group.quantization is not None and weights is not None and self.wna16 is None:
            if not same_bytes(self.group.dtype, weights.dtype):
                return (
                    f"its weights are {weights.dtype}, the checkpoint's {self.group.dtype}: "
                    "quantized weights are never cast"
                )
        return self.problem()

    @property
    def consumed(self) -> list[str]:
        """The checkpoint tensors a fill writes (biases only where the layer takes them; none
        of the companions `left_to_engine`)."""
        biases = all(b in self.parameters for b in BIASES)
        quantization = self.group.quantization
        left = [
            c
            for c in (quantization.companions if quantization else ())
            if any(name.split("_", 1)[1] == c.kind for name in self.left_to_engine)
        ]

        def left_to_engine(name: str) -> bool:
            return any(
                name.endswith(f".{c.kind}")
                or (c.fused_suffix is not None and name.endswith(f"_proj{c.fused_suffix}"))
                for c in left
            )

        return [
            n
            for n in self.group.tensor_names
            if (biases or not n.endswith("bias")) and not left_to_engine(n)
        ]

    @property
    def filled(self) -> list[str]:
        """The engine's names of the parameters a fill writes."""
        return [self.names[name] for name in self.parameters]


@dataclass
class _Planned:
    """A layer checked and planned, nothing written yet: what the copy threads fill, and the
    scratch (refined or padded values) placed into the parameters after."""

    spec: ExpertLayerSpec
    destinations: list[Destination]
    scratch: dict[str, torch.Tensor]

    @property
    def scratch_bytes(self) -> int:
        return sum(t.nbytes for t in self.scratch.values())


def _plan(ckpt: Checkpoint, spec: ExpertLayerSpec) -> _Planned:
    """Checks the whole layer (`ExpertLayerSpec.problem`, then every plan, as
    `load_fused_moe` checks them) and plans it, writing nothing."""
    problem = spec.problem()
    if problem is not None:
        raise RequestError(f"{ckpt.path}: {problem}")
    loads = spec.load_shapes()
    loaded = {name: shape for name, (shape, _) in loads.items()}
    refined = spec.refined()
    # Values that land elsewhere than the parameter itself (refined or padded) go through
    # scratch on its device, in the parameter's dtype; MoeWNA16's are converted from the
    # checkpoint's, and so are read in its dtype.
    scratch = {
        name: torch.empty(
            loaded[name],
            dtype=loads[name][1] if spec.wna16 is not None else tensor.dtype,
            device=tensor.device,
        )
        for name, tensor in spec.parameters.items()
        if name not in spec.global_experts
        and (spec.wna16 is not None or name in refined or tuple(tensor.shape) != loaded[name])
    }
    destinations = {name: scratch.get(name, t) for name, t in spec.parameters.items()}
    biases = {k: destinations[k] for k in BIASES if k in destinations}
    scales: dict[str, torch.Tensor | None] = {
        k: v for k, v in destinations.items() if k not in (*WEIGHTS, *BIASES)
    }
    scales |= dict.fromkeys(spec.global_experts)  # every global expert's: filled after
    scales |= dict.fromkeys(spec.left_to_engine)  # the engine's loader fills these
    # Zero points a symmetric MoeWNA16 layer has no place for: consumed, never written.
    if spec.wna16 is not None:
        scales |= dict.fromkeys(n for n in loaded if n not in (*WEIGHTS, *destinations))
    planned = plan_destinations(
        ckpt,
        spec.group.prefix,
        destinations["w13"],
        destinations["w2"],
        tp_rank=spec.tp_rank,
        tp_size=spec.tp_size,
        local_experts=spec.experts,
        scales=scales,
        allow_cast=True,
        w13_interleaved=spec.interleaved,
        shard=spec.load_shard,
        k_first=spec.load_k_first,
        **biases,
    )
    return _Planned(spec, planned, scratch)


def _finish(planned: _Planned) -> None:
    """What follows the copies: every global expert's scalars, `w2_bias` off TP rank 0, and
    refined or padded values placed into their parameters."""
    spec, refined = planned.spec, planned.spec.refined()
    with torch.no_grad():
        for name in spec.global_experts:
            _fill_global_experts(spec.group, name, spec.parameters[name], spec.global_rows)
        if "w2_bias" in spec.parameters and spec.w2_bias_first_rank and spec.tp_rank > 0:
            planned.scratch.get("w2_bias", spec.parameters["w2_bias"]).zero_()
        for name, values in planned.scratch.items():
            if spec.wna16 is not None:
                target = spec.parameters[name]
                spec.wna16.convert(name, values, target, spec.rows[0], spec.group)
                continue
            if name in refined:
                values = _refine(spec, name, values)
            _place(spec, name, values)


def log_left_to_engine(ckpt: Checkpoint, model: object, left: Sequence[str]) -> None:
    """Says which checkpoint expert groups go to the model's own `load_weights`, each with
    why (a line each, through the package's logger)."""
    if left:
        logger.info(
            "%s: %d expert group(s) left to %s.load_weights:\n  %s",
            ckpt.path,
            len(left),
            type(model).__name__,
            "\n  ".join(left),
        )


# Scratch of refined or padded layers held at once when several layers share one pipeline:
# padded weights take scratch the size of their parameters, which a whole model must not.
SCRATCH_BYTES = 1 << 30


def fill_layers(ckpt: Checkpoint, specs: Sequence[ExpertLayerSpec]) -> list[str]:
    """Fills every layer `specs` describe from `ckpt`, through one staging pipeline (one fill
    and one drain for the whole load, windows shared across layers, rather than one a
    layer), and returns the checkpoint tensor names consumed. Every layer is checked and
    planned before the first byte is written: on `RequestError` no parameter of any layer
    has been written. Layers whose refined or padded values need scratch are taken in
    batches of at most `SCRATCH_BYTES` of it. Parameters of another dtype than the
    checkpoint's are converted as the engines' own loaders convert (`copy_`); packed values
    never are."""
    # Every layer checked and planned first; a layer that needs scratch lets it go again and
    # is planned anew when its batch comes, so that scratch is held a batch at a time.
    checked: list[_Planned | ExpertLayerSpec] = []
    for spec in specs:
        planned = _plan(ckpt, spec)
        checked.append(spec if planned.scratch else planned)
        del planned
    batch: list[_Planned] = []
    for item in [*checked, None]:
        layer = _plan(ckpt, item) if isinstance(item, ExpertLayerSpec) else item
        held = sum(p.scratch_bytes for p in batch)
        if batch and (layer is None or held + layer.scratch_bytes > SCRATCH_BYTES):
            fill(ckpt, [d for p in batch for d in p.destinations])
            for done in batch:
                _finish(done)
            batch = []
        if layer is not None:
            batch.append(layer)
    return [name for spec in specs for name in spec.consumed]


def fill_layer(ckpt: Checkpoint, spec: ExpertLayerSpec) -> list[str]:
    """Fills the one layer `spec` describes (see `fill_layers`)."""
    return fill_layers(ckpt, [spec])


def _refine(spec: ExpertLayerSpec, name: str, values: torch.Tensor) -> torch.Tensor:
    """Block scales taken whole on the checkpoint's `bn x bk` grid, for every block the
    rank's rows touch, as vLLM's refined grid holds them: each value repeated over the
    `r x r` blocks it covers (`scale_refine = r`), the rank's rows narrowed out."""
    quantization = spec.group.quantization
    assert quantization is not None and spec.scale_refine is not None
    companion = quantization.companion(name.split("_", 1)[1])
    assert companion is not None and companion.block is not None
    (bn, bk), r = companion.block, spec.scale_refine
    first, count = spec.rows
    n, rows = values.shape[0], -(-count // r)
    hidden = -(-spec.group.hidden_size // r)
    if name.startswith("w13"):  # [n, 2 (gate, up), blocks, H blocks]
        fine = values.view(n, 2, -1, values.shape[-1]).repeat_interleave(bn // r, dim=2)
        fine = fine.repeat_interleave(bk // r, dim=3)
        at = (first - first // bn * bn) // r
        return fine[:, :, at : at + rows, :hidden].reshape(n, 2 * rows, hidden)
    fine = values.repeat_interleave(bn // r, dim=1).repeat_interleave(bk // r, dim=2)
    at = (first - first // bk * bk) // r
    return fine[:, :hidden, at : at + rows]


def _place(spec: ExpertLayerSpec, name: str, values: torch.Tensor) -> None:
    """Writes `values` (the rank's) into the parameter `name`, as `spec.padding` says, after
    setting its padding where `spec.pad_fill` asks for it (zero weights, unit scales)."""
    target = spec.parameters[name]
    if spec.pad_fill and tuple(target.shape) != tuple(values.shape):
        target.fill_(0 if name in (*WEIGHTS, *BIASES) else 1)
    halves = (
        spec.padding == "halves"
        and name.startswith("w13")
        and values.dim() >= 2
        and target.shape[1] != values.shape[1]
    )
    if not halves:
        target[tuple(slice(0, k) for k in values.shape)].copy_(values)
        return
    half, rows = target.shape[1] // 2, values.shape[1] // 2
    rest = tuple(slice(0, k) for k in values.shape[2:])
    for at, part in ((0, values[:, :rows]), (half, values[:, rows:])):
        target[(slice(None), slice(at, at + rows), *rest)].copy_(part)


def _fill_global_experts(
    group: MoeLayer, name: str, target: torch.Tensor, rows: Sequence[int]
) -> None:
    """A companion of scalars for every physical expert: `w13_* [P, 2]` (gate's, up's) or
    `w2_* [P]`, row `p` from logical expert `rows[p]`, copied from the zero-copy views
    (shapes and expert ids checked before)."""
    kind = name.split("_", 1)[1]
    for row, e in enumerate(rows):
        if name.startswith("w13"):
            for column, matrix in enumerate(("w1", "w3")):
                target[row, column] = group.companion(kind, matrix, e).reshape(())
        else:
            target[row] = group.companion(kind, "w2", e).reshape(())
