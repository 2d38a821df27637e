"""A generated checkpoint shaped like Qwen3-30B-A3B's experts (fused v5 layout, or the
transposed fused layout of Llama 4 and gpt-oss), one shard per layer, with an index and a
config, so that the comparison needs no download."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch
from safetensors.torch import save_file

MARKER = "fastmoe_bench.json"


@dataclass(frozen=True)
class Shape:
    layers: int
    experts: int = 128
    hidden: int = 2048
    intermediate: int = 768
    # gate_up [E, H, 2I] and down [E, I, H] instead of [E, 2I, H] and [E, H, I].
    transposed: bool = False

    @property
    def layer_bytes(self) -> int:
        return 3 * self.experts * self.hidden * self.intermediate * 2  # bf16

    @property
    def total_bytes(self) -> int:
        return self.layers * self.layer_bytes

    def prefix(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp.experts"


def layers_for(target_bytes: int, shape: Shape = Shape(layers=1)) -> int:
    return max(1, round(target_bytes / shape.layer_bytes))


def _pattern(numel: int, generator: torch.Generator) -> torch.Tensor:
    # Random bf16 values, tiled from a 16 Mi-element block: cheap to make, and every page
    # holds real (non-zero) data.
    block = torch.randn(min(numel, 1 << 24), generator=generator).to(torch.bfloat16)
    reps = -(-numel // block.numel())
    return block.repeat(reps)[:numel]


def generate(path: str, shape: Shape) -> str:
    """Writes the checkpoint to directory `path` unless a matching one is there already."""
    os.makedirs(path, exist_ok=True)
    marker = os.path.join(path, MARKER)
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == asdict(shape):
                return path
    generator = torch.Generator().manual_seed(0)
    e, h, i = shape.experts, shape.hidden, shape.intermediate
    weight_map = {}
    for layer in range(shape.layers):
        file = f"model-{layer + 1:05d}-of-{shape.layers:05d}.safetensors"
        prefix = shape.prefix(layer)
        gate_up, down = (e, h, 2 * i), (e, i, h)
        if not shape.transposed:
            gate_up, down = (e, 2 * i, h), (e, h, i)
        tensors = {
            f"{prefix}.gate_up_proj": _pattern(e * 2 * i * h, generator).view(gate_up),
            f"{prefix}.down_proj": _pattern(e * h * i, generator).view(down),
        }
        save_file(tensors, os.path.join(path, file))
        weight_map.update(dict.fromkeys(tensors, file))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": shape.total_bytes}, "weight_map": weight_map}, f)
    config = {
        "model_type": "qwen3_moe",
        "hidden_size": h,
        "moe_intermediate_size": i,
        "num_experts": e,
        "num_hidden_layers": shape.layers,
        "torch_dtype": "bfloat16",
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with open(marker, "w") as f:
        json.dump(asdict(shape), f)
    return path
