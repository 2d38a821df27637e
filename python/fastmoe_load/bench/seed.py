"""The pure-Python loading path this project replaces, as vLLM does it (`FusedMoE.load_weights`
after PR 36997): `safe_open`, `get_tensor` of the whole fused tensor, `chunk(2, dim=1)`,
`unbind()` per expert, then `narrow` + `copy_` per expert and shard. Every rank reads every
expert, and every copy into a CUDA tensor is a synchronous pageable transfer.

Used as the baseline of the speed comparison and as a second reference in the tests.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from typing import Any

import torch
from safetensors import safe_open

from ..checkpoint import Companion, MoeLayer


def shard_of_tensors(path: str) -> dict[str, str]:
    """Which file holds each tensor, read the way transformers and vLLM read it."""
    if os.path.isfile(path):
        files = [path]
    else:
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            return {name: os.path.join(path, file) for name, file in weight_map.items()}
        files = sorted(
            os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors")
        )
    where = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            where.update(dict.fromkeys(f.keys(), file))
    return where


class SeedLoader:
    """vLLM's `FusedMoE.weight_loader` for one destination pair and its scale parameters
    (`scales`, by vLLM name), fed tensor by tensor."""

    def __init__(
        self,
        w13: torch.Tensor,
        w2: torch.Tensor,
        tp_rank: int,
        local_experts: Sequence[int],
        scales: Mapping[str, torch.Tensor] | None = None,
        tp_size: int = 1,
        k_first: bool = False,
        scale_refine: tuple[int, int] | None = None,
        padded_tp: bool = False,
    ) -> None:
        self.w13, self.w2, self.tp_rank, self.tp_size = w13, w2, tp_rank, tp_size
        # vLLM's fp8 block scales refined to a finer grid (`Fp8MoEMethod.weight_scale_refine`:
        # repeats along rows and columns), and its block-aligned TP
        # (`tp_shard_with_padding`: each rank whole blocks, padding zero and one).
        self.scale_refine, self.padded_tp = scale_refine, padded_tp
        # vLLM's `is_transposed` parameters (GPTQ, AWQ): each expert input-first, the
        # dimension of I flipped.
        self.k_first = k_first
        self.scales = dict(scales or {})
        self.slots: dict[int, list[int]] = {}
        for slot, expert in enumerate(local_experts):
            self.slots.setdefault(expert, []).append(slot)

    def scale_loader(
        self, scale: torch.Tensor, companion: Companion, shard_id: str, expert_id: int
    ) -> None:
        """vLLM's scale branches: per-tensor values by index, input scales one per expert,
        block, group and channel scales narrowed like weights (down's channel scales whole),
        `weight_shape` whole per expert; zero points (packed along the rows, a `block` grid)
        like block scales."""
        param = self.scales.get(f"{'w2' if shard_id == 'w2' else 'w13'}_{companion.kind}")
        if param is None:
            return
        scale = self._refined(_as_bytes(scale, param), companion)
        for slot in self.slots.get(expert_id, ()):
            if companion.scheme == "whole":  # `weight_shape`: the up projection's in w13
                param[slot].copy_(scale)
            elif companion.merged_w13 or (shard_id == "w2" and companion.scheme == "tensor"):
                param[slot] = scale.reshape(())
            elif companion.scheme == "tensor":  # w13: [E, 2]
                param[slot][0 if shard_id == "w1" else 1] = scale.reshape(())
            elif self.k_first:  # input-first block scales: stored and kept [in', out']
                self._load_k_first(param[slot], scale, shard_id)
            elif self.padded_tp and companion.scheme == "block":
                self._load_padded(param[slot], scale, shard_id, fill=1)
            elif shard_id == "w2":
                per_rank = scale.shape[1] // self.tp_size
                if companion.scheme == "channel":  # down's rows are not split
                    param[slot].copy_(scale)
                else:
                    param[slot].copy_(scale.narrow(1, per_rank * self.tp_rank, per_rank))
            else:
                per_rank = scale.shape[0] // self.tp_size
                half = param.shape[1] // 2
                loaded = scale.narrow(0, per_rank * self.tp_rank, per_rank)
                param[slot].narrow(0, 0 if shard_id == "w1" else half, half).copy_(loaded)

    def _refined(self, scale: torch.Tensor, companion: Companion) -> torch.Tensor:
        if self.scale_refine is None or companion.scheme != "block":
            return scale
        rows, cols = self.scale_refine
        return scale.repeat_interleave(rows, dim=0).repeat_interleave(cols, dim=1)

    def _load_padded(
        self, expert_data: torch.Tensor, loaded: torch.Tensor, shard_id: str, fill: int
    ) -> None:
        """vLLM's block-aligned TP: the parameter (each half of w13) set to `fill`, then the
        rank's whole blocks, `[rank * P, min((rank + 1) * P, I))` of the unsharded matrix,
        at its start."""
        dim = 1 if shard_id == "w2" else 0
        destination = expert_data
        if shard_id != "w2":
            half = destination.shape[0] // 2
            destination = destination.narrow(0, 0 if shard_id == "w1" else half, half)
        size = destination.shape[dim]
        start = min(self.tp_rank * size, loaded.shape[dim])
        count = min(size, loaded.shape[dim] - start)
        destination.fill_(fill)
        destination.narrow(dim, 0, count).copy_(loaded.narrow(dim, start, count))

    def _load_k_first(self, expert_data: torch.Tensor, loaded: torch.Tensor, shard_id: str) -> None:
        """vLLM's weight_loader for `is_transposed` parameters: gate's and up's outputs are
        columns, down's inputs rows."""
        if shard_id == "w2":
            per_rank = loaded.shape[0] // self.tp_size
            expert_data.copy_(loaded.narrow(0, per_rank * self.tp_rank, per_rank))
            return
        per_rank = loaded.shape[1] // self.tp_size
        half = expert_data.shape[1] // 2
        loaded = loaded.narrow(1, per_rank * self.tp_rank, per_rank)
        expert_data.narrow(1, 0 if shard_id == "w1" else half, half).copy_(loaded)

    def weight_loader(self, weight: torch.Tensor, shard_id: str, expert_id: int) -> None:
        weight = _as_bytes(weight, self.w2)
        for slot in self.slots.get(expert_id, ()):  # experts of other ranks are skipped
            if self.k_first:
                self._load_k_first(
                    self.w2[slot] if shard_id == "w2" else self.w13[slot], weight, shard_id
                )
            elif self.padded_tp:
                expert_data = self.w2[slot] if shard_id == "w2" else self.w13[slot]
                self._load_padded(expert_data, weight, shard_id, fill=0)
            elif shard_id == "w2":
                expert_data = self.w2[slot]
                shard_size = expert_data.shape[1]
                expert_data.copy_(weight.narrow(1, shard_size * self.tp_rank, shard_size))
            else:
                expert_data = self.w13[slot]
                shard_size = expert_data.shape[0] // 2
                loaded = weight.narrow(0, shard_size * self.tp_rank, shard_size)
                offset = 0 if shard_id == "w1" else shard_size
                expert_data.narrow(0, offset, shard_size).copy_(loaded)


def _as_bytes(loaded: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """e8m0 scales and DeepSeek-V4's int8-typed fp4 bytes viewed as the uint8 of vLLM's OCP
    MX parameters, as its loaders view them (its DeepSeek-V4 `load_weights`, `Mxfp4MoEMethod`'s
    scale loader): a numeric copy would turn the e8m0 2**-7 into 0."""
    if param.dtype == torch.uint8 and loaded.dtype in (torch.int8, torch.float8_e8m0fnu):
        return loaded.view(torch.uint8)
    return loaded


def _gate_up_halves(weight: torch.Tensor, layer: MoeLayer) -> Iterator[tuple[str, torch.Tensor]]:
    """`[E, 2I, H]` gate and up stacks of a fused gate/up tensor of any orientation."""
    if layer.transposed:
        weight = weight.transpose(1, 2)
    if layer.interleaved:
        yield "w1", weight[:, 0::2]
        yield "w3", weight[:, 1::2]
    else:
        gate, up = weight.chunk(2, dim=1)
        yield "w1", gate
        yield "w3", up


def load_fused_weight(loader: SeedLoader, layer: MoeLayer, name: str, weight: torch.Tensor) -> None:
    """One fused weight of `layer` (`name`: its gate/up or its down tensor, as stored) through
    `loader` the way vLLM's `FusedMoE.load_weights` takes it: `chunk(2, dim=1)` of gate/up,
    `unbind()` per expert, one `weight_loader` call per expert and shard, on whatever device
    `weight` is. Raises `ValueError` for a name that is neither."""
    gate_up, down = layer.tensor_names[:2]
    if name == gate_up:
        for shard_id, stack in _gate_up_halves(weight, layer):
            for expert_id, expert in enumerate(stack.unbind()):
                loader.weight_loader(expert, shard_id, expert_id)
    elif name == down:
        if layer.transposed:
            weight = weight.transpose(1, 2)
        for expert_id, expert in enumerate(weight.unbind()):
            loader.weight_loader(expert, "w2", expert_id)
    else:
        raise ValueError(f"{name}: not a fused weight of the layer {layer.prefix}")


def seed_load(
    path: str,
    layer: MoeLayer,
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    tp_rank: int = 0,
    tp_size: int = 1,
    local_experts: Sequence[int] | None = None,
    where: dict[str, str] | None = None,
    scales: Mapping[str, torch.Tensor] | None = None,
    k_first: bool = False,
    scale_refine: tuple[int, int] | None = None,
    padded_tp: bool = False,
) -> None:
    """Fills `w13`/`w2` (and `scales`, by vLLM parameter name) for `layer` the way vLLM does.
    `scale_refine` (block scales repeated to a finer grid) and `padded_tp` (whole blocks a
    rank) are vLLM's two ways with fp8 block scales that `I/tp` cuts.
    `where` maps tensor names to files (computed from `path` if not given). mxfp4 groups are
    loaded as vLLM's gpt-oss model loads them (see `_mxfp4_load`), w13 interleaved. With
    `k_first`, the destinations are input-first (vLLM's GPTQ and AWQ parameters), filled as
    its `is_transposed` branch fills them; GPTQ's `g_idx` is not read (vLLM drops it)."""
    where = where if where is not None else shard_of_tensors(path)
    experts = range(layer.num_experts) if local_experts is None else local_experts
    loader = SeedLoader(
        w13, w2, tp_rank, experts, scales, tp_size, k_first, scale_refine, padded_tp
    )
    names = layer.tensor_names
    with ExitStack() as files:
        handles: dict[str, Any] = {}

        def get_tensor(name: str) -> torch.Tensor:
            file = where[name]
            if file not in handles:
                handles[file] = files.enter_context(safe_open(file, framework="pt"))
            return handles[file].get_tensor(name)

        fused_mxfp4 = layer.format != "per_expert"
        if fused_mxfp4 and layer.quantization is not None and layer.quantization.weights == "mxfp4":
            params = {"w13": w13, "w2": w2, **(scales or {})}
            _mxfp4_load(get_tensor, layer, params, tp_rank, tp_size, list(experts))
            return
        companions = layer.quantization.companions if layer.quantization else ()
        if layer.format == "per_expert":
            n = layer.num_experts
            # tensor_names: weights, biases, then each companion kind, by matrix then expert.
            first = 6 * n if layer.has_bias else 3 * n
            groups = [(None, names[: 3 * n])]
            groups += [(c, names[first + 3 * n * k :][: 3 * n]) for k, c in enumerate(companions)]
            for companion, group in groups:
                for k, shard_id in enumerate(("w1", "w3", "w2")):
                    for expert_id, name in enumerate(group[k * n : (k + 1) * n]):
                        if companion is None:
                            loader.weight_loader(get_tensor(name), shard_id, expert_id)
                        else:
                            loader.scale_loader(get_tensor(name), companion, shard_id, expert_id)
            return
        for name in names[:2]:
            load_fused_weight(loader, layer, name, get_tensor(name))
        first = 4 if layer.has_bias else 2
        for k, companion in enumerate(companions):
            gate_up, down = (get_tensor(n) for n in names[first + 2 * k : first + 2 * k + 2])
            halves = [gate_up, gate_up] if companion.merged_w13 else gate_up.chunk(2, dim=1)
            for shard_id, stack in (("w1", halves[0]), ("w3", halves[1]), ("w2", down)):
                for expert_id, scale in enumerate(stack.unbind()):
                    loader.scale_loader(scale, companion, shard_id, expert_id)


def _mxfp4_load(
    get_tensor: Callable[[str], torch.Tensor],
    layer: MoeLayer,
    params: Mapping[str, torch.Tensor],
    tp_rank: int,
    tp_size: int,
    experts: list[int],
) -> None:
    """vLLM's gpt-oss mxfp4 loading (`GptOssModel._load_weights_mxfp4` with the
    `gpt_oss_mxfp4` branch of `FusedMoE.weight_loader`): each tensor whole, the local experts
    taken, the rank's gate/up rows (kept interleaved) or down columns narrowed, and one copy
    into the parameter. `params` holds `w13`, `w2`, and whichever of `w13_weight_scale`,
    `w2_weight_scale`, `w13_bias`, `w2_bias` are filled."""
    # Whole 32-value blocks a rank, the last rank short where they do not divide evenly.
    shard = -(-layer.intermediate_size // 32 // tp_size) * 32
    start = min(tp_rank * shard, layer.intermediate_size)
    end = min(start + shard, layer.intermediate_size)
    n, rows = layer.num_experts, 2 * layer.intermediate_size
    gate_up, down, gate_up_bias, down_bias, gate_up_scales, down_scales = layer.tensor_names
    index = torch.tensor(experts)
    sources = {
        "w13": (gate_up, lambda t: t.view(n, rows, -1)[:, 2 * start : 2 * end]),
        "w2": (down, lambda t: t.view(n, layer.hidden_size, -1)[..., start // 2 : end // 2]),
        "w13_weight_scale": (gate_up_scales, lambda t: t[:, 2 * start : 2 * end]),
        "w2_weight_scale": (down_scales, lambda t: t[..., start // 32 : end // 32]),
        "w13_bias": (gate_up_bias, lambda t: t[:, 2 * start : 2 * end]),
        # Added once, before the all-reduce: TP ranks other than 0 hold zeros.
        "w2_bias": (down_bias, lambda t: t if tp_rank == 0 else torch.zeros_like(t)),
    }
    for name, param in params.items():
        tensor, narrow = sources[name]
        param.copy_(narrow(get_tensor(tensor)).index_select(0, index))
