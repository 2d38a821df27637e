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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .._fastmoe_load import RequestError
from ..checkpoint import Checkpoint, MoeLayer
from ..loader import destination_shapes, load_fused_moe

# Destinations of the weights and of the biases; every other one is a companion `w13_{kind}`
# / `w2_{kind}` (see `load_fused_moe`).
WEIGHTS = ("w13", "w2")
BIASES = ("w13_bias", "w2_bias")


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
    - `padded`: the parameters may be larger than the rank's values (kernels that round
      sizes up), and take them in their leading corner, the rest untouched.
    - `global_experts`: destinations held for every logical expert on every rank (one
      scalar per expert and matrix: `w13_input_scale [E, 2]`, `w2_input_scale [E]`), as
      kernels that quantize with every expert's scales keep them.
    - `w2_bias_first_rank`: `w2_bias` is added once before the all-reduce over TP ranks, so
      ranks other than 0 hold zeros.
    - `k_first`: each expert's parameters are input-first, the transpose of the shapes above
      (`w13 [E_local, H/pack, 2*I/tp/out_pack]`, block companions alike), as GPTQ and AWQ
      methods keep them (see `destination_shapes`).
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
    padded: bool = False
    global_experts: tuple[str, ...] = ()
    w2_bias_first_rank: bool = False
    unverified: str | None = field(default=None, compare=False)
    k_first: bool = False

    @property
    def where(self) -> str:
        return f"experts at `{self.group.prefix}`"

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of the values each destination takes for this rank."""
        group = self.group
        shapes = {
            name: shape
            for name, (shape, _) in destination_shapes(
                group, len(self.experts), self.tp_size, k_first=self.k_first
            ).items()
        }
        for name in self.global_experts:
            shapes[name] = (
                (group.num_experts, 2) if name.startswith("w13") else (group.num_experts,)
            )
        return shapes

    def problem(self) -> str | None:
        """Why this layer cannot be filled from its group as described (a TP split off the
        group's packs or blocks, a parameter missing or of the wrong shape), or None."""
        group = self.group
        if group.intermediate_size % self.tp_size:
            return (
                f"intermediate size {group.intermediate_size} does not split into "
                f"tp_size={self.tp_size} equal shards"
            )
        split_error = group.tp_split_error(self.tp_size)
        if split_error is not None:
            return split_error
        expected = self.expected_shapes()
        companions = [name for name in expected if name not in (*WEIGHTS, *BIASES)]
        missing = [n for n in (*WEIGHTS, *companions) if n not in self.parameters]
        if missing:
            return (
                f"{self.where} are {group.quantization}, but the layer has no "
                f"{', '.join(self.names.get(n, n) for n in missing)}: build it with the "
                "checkpoint's quantization config"
            )
        for name, tensor in self.parameters.items():
            want, have = expected[name], tuple(tensor.shape)
            if have == want:
                continue
            fits = len(have) == len(want) and all(a >= b for a, b in zip(have, want, strict=True))
            if not (fits and self.padded and name not in self.global_experts):
                return (
                    f"{self.where}: {self.names.get(name, name)} has shape {have}, expected {want}"
                )
        return None

    def unfillable(self) -> str | None:
        """Why `load_format="fastmoe"` leaves this layer to the engine's own loader, in one
        line, or None where fastmoe_load writes exactly what the engine's loader would."""
        if self.unverified is not None:
            return self.unverified
        weights = self.parameters.get("w13")
        if self.group.quantization is not None and weights is not None:
            if weights.dtype != self.group.dtype:
                return (
                    f"its weights are {weights.dtype}, the checkpoint's {self.group.dtype}: "
                    "quantized weights are never cast"
                )
        return self.problem()

    @property
    def consumed(self) -> list[str]:
        """The checkpoint tensors a fill writes (biases only where the layer takes them)."""
        biases = all(b in self.parameters for b in BIASES)
        return [n for n in self.group.tensor_names if biases or not n.endswith("bias")]

    @property
    def filled(self) -> list[str]:
        """The engine's names of the parameters a fill writes."""
        return [self.names[name] for name in self.parameters]


def fill_layer(ckpt: Checkpoint, spec: ExpertLayerSpec) -> list[str]:
    """Fills the layer `spec` describes from `ckpt` and returns the checkpoint tensor names
    consumed. The whole layer is checked first (`ExpertLayerSpec.problem`, then every plan
    by `load_fused_moe`): on `RequestError` no parameter has been written. Parameters of
    another dtype than the checkpoint's are converted as the engines' own loaders convert
    (`copy_`); packed values never are."""
    problem = spec.problem()
    if problem is not None:
        raise RequestError(f"{ckpt.path}: {problem}")
    expected = spec.expected_shapes()
    # A padded parameter takes its values through scratch on its device, then in its corner.
    scratch = {
        name: torch.empty(expected[name], dtype=tensor.dtype, device=tensor.device)
        for name, tensor in spec.parameters.items()
        if tuple(tensor.shape) != expected[name]
    }
    destinations = {name: scratch.get(name, t) for name, t in spec.parameters.items()}
    biases = {k: destinations[k] for k in BIASES if k in destinations}
    scales: dict[str, torch.Tensor | None] = {
        k: v for k, v in destinations.items() if k not in (*WEIGHTS, *BIASES)
    }
    scales |= dict.fromkeys(spec.global_experts)  # every global expert's: filled below
    load_fused_moe(
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
        k_first=spec.k_first,
        **biases,
    )
    with torch.no_grad():
        for name in spec.global_experts:
            _fill_global_experts(spec.group, name, spec.parameters[name])
        if "w2_bias" in destinations and spec.w2_bias_first_rank and spec.tp_rank > 0:
            destinations["w2_bias"].zero_()
        for name, values in scratch.items():
            target = spec.parameters[name]
            target[tuple(slice(0, n) for n in values.shape)].copy_(values)
    return spec.consumed


def _fill_global_experts(group: MoeLayer, name: str, target: torch.Tensor) -> None:
    """A companion of scalars for every logical expert: `w13_* [E, 2]` (gate's, up's) or
    `w2_* [E]`, copied from the zero-copy views (shapes checked by `problem`)."""
    kind = name.split("_", 1)[1]
    for e in range(group.num_experts):
        if name.startswith("w13"):
            for column, matrix in enumerate(("w1", "w3")):
                target[e, column] = group.companion(kind, matrix, e).reshape(())
        else:
            target[e] = group.companion(kind, "w2", e).reshape(())
