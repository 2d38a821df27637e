"""`python -m fastmoe_load bench --quant fp8`: quantized experts beside the pure-Python path.

A generated checkpoint shaped like DeepSeek-V3's routed experts (one fp8 e4m3 tensor per
expert and matrix, 256 experts, H=7168, I=2048, each with its float32 128 x 128
`weight_scale_inv`: thousands of small scale tensors beside the weights), loaded into the
parameters vLLM's `Fp8MoEMethod` creates (`w13_weight`, `w2_weight`,
`w13_weight_scale_inv`, `w2_weight_scale_inv`), by fastmoe_load and by vLLM's per-expert
`weight_loader` loop in pure Python; and, in the same run, the bf16 fused checkpoint of the
plain bench, so that fp8 and bf16 compare per landed byte.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from safetensors.torch import save_file

import fastmoe_load as fml

from .generate import MARKER, Shape, generate, layers_for
from .run import Bench, Case, describe_machine, render
from .seed import seed_load, shard_of_tensors

FP8 = torch.float8_e4m3fn
BLOCK = 128
MODULES = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Fp8Shape:
    layers: int
    experts: int = 256
    hidden: int = 7168
    intermediate: int = 2048

    @property
    def scale_bytes(self) -> int:
        rows, cols = math.ceil(self.intermediate / BLOCK), math.ceil(self.hidden / BLOCK)
        return 3 * self.experts * rows * cols * 4  # float32

    @property
    def layer_bytes(self) -> int:
        return 3 * self.experts * self.hidden * self.intermediate + self.scale_bytes

    @property
    def total_bytes(self) -> int:
        return self.layers * self.layer_bytes

    def prefix(self, layer: int) -> str:
        # DeepSeek-V3's first three layers are dense; its routed experts start at layer 3.
        return f"model.layers.{layer + 3}.mlp.experts"


def generate_fp8(path: str, shape: Fp8Shape) -> str:
    """Writes the fp8 checkpoint to directory `path` unless a matching one is there already."""
    os.makedirs(path, exist_ok=True)
    marker = os.path.join(path, MARKER)
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == asdict(shape):
                return path
    generator = torch.Generator().manual_seed(0)
    h, i = shape.hidden, shape.intermediate
    # Random fp8 bytes (no NaN patterns), copied into every weight: cheap, real data.
    block = torch.randint(0, 0x7E, (h * i,), dtype=torch.uint8, generator=generator).view(FP8)
    # Shards of 32 experts (1.4 GB at DeepSeek-V3's sizes), as releases shard by size.
    groups = [
        (layer, first) for layer in range(shape.layers) for first in range(0, shape.experts, 32)
    ]
    weight_map = {}
    for k, (layer, first) in enumerate(groups):
        file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for e in range(first, min(first + 32, shape.experts)):
            for module in MODULES:
                rows, cols = (h, i) if module == "down_proj" else (i, h)
                name = f"{shape.prefix(layer)}.{e}.{module}"
                tensors[f"{name}.weight"] = block.view(rows, cols).clone()
                grid = (math.ceil(rows / BLOCK), math.ceil(cols / BLOCK))
                tensors[f"{name}.weight_scale_inv"] = torch.rand(grid, generator=generator)
        save_file(tensors, os.path.join(path, file))
        weight_map.update(dict.fromkeys(tensors, file))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": shape.total_bytes}, "weight_map": weight_map}, f)
    config = {
        "model_type": "deepseek_v3",
        "hidden_size": h,
        "moe_intermediate_size": i,
        "n_routed_experts": shape.experts,
        "quantization_config": {
            "quant_method": "fp8",
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "weight_block_size": [BLOCK, BLOCK],
        },
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with open(marker, "w") as f:
        json.dump(asdict(shape), f)
    return path


# One layer's destinations: w13, w2 and the scales by vLLM parameter name.
Destinations = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


class Fp8Bench(Bench):
    """The plain bench's timing and table over fp8 destinations."""

    shape: Fp8Shape  # type: ignore[assignment]

    def destinations(self, case: Case, touched: bool) -> list[Destinations]:  # type: ignore[override]
        s = self.shape
        n, shard = len(case.experts(s.experts)), s.intermediate // case.tp_size
        out = []
        for _ in range(s.layers):
            rows, cols = math.ceil(shard / BLOCK), math.ceil(s.hidden / BLOCK)
            w13 = torch.empty(n, 2 * shard, s.hidden, dtype=FP8, device=self.device)
            w2 = torch.empty(n, s.hidden, shard, dtype=FP8, device=self.device)
            scales = {
                "w13_weight_scale_inv": torch.empty(n, 2 * rows, cols, device=self.device),
                "w2_weight_scale_inv": torch.empty(n, cols, rows, device=self.device),
            }
            if touched:
                for t in (w13, w2, *scales.values()):
                    t.view(torch.uint8).zero_()
            out.append((w13, w2, scales))
        return out

    def fastmoe(self, case: Case, **open_args: object) -> Callable[[list], int]:  # type: ignore[override]
        def load(dests: list[Destinations]) -> int:
            total = 0
            with fml.open(self.path, num_threads=self.threads, **open_args) as ckpt:
                for layer, (w13, w2, scales) in enumerate(dests):
                    stats = fml.load_fused_moe(
                        ckpt,
                        self.shape.prefix(layer),
                        w13,
                        w2,
                        tp_rank=case.tp_rank,
                        tp_size=case.tp_size,
                        local_experts=case.experts(self.shape.experts),
                        scales=scales,
                    )
                    total += stats.bytes
            return total

        return load

    def seed(self, case: Case) -> Callable[[list], int]:
        with fml.open(self.path) as ckpt:  # only for the layer descriptions
            layers = ckpt.moe_layers()

        def load(dests: list[Destinations]) -> int:
            where = shard_of_tensors(self.path)
            for layer, (w13, w2, scales) in zip(layers, dests, strict=True):
                seed_load(
                    self.path,
                    layer,
                    w13,
                    w2,
                    tp_rank=case.tp_rank,
                    tp_size=case.tp_size,
                    local_experts=case.experts(self.shape.experts),
                    where=where,
                    scales=scales,
                )
            return sum(t.nbytes for w13, w2, s in dests for t in (w13, w2, *s.values()))

        return load


def default_shape(device: torch.device, layers: int | None) -> Fp8Shape:
    """One full DeepSeek-V3 layer (11.3 GB) on a GPU machine; on a CPU, as many experts as
    fit an eighth of the memory, so that the checkpoint stays in the page cache."""
    if device.type == "cuda":
        return Fp8Shape(layers=layers or 1)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    one = Fp8Shape(layers=1, experts=1)
    return Fp8Shape(layers=layers or 1, experts=max(8, min(256, ram // 8 // one.layer_bytes)))


def main(
    device: str = "cpu",
    layers: int | None = None,
    directory: str | None = None,
    repeats: int = 5,
    threads: int | None = None,
) -> list:
    dev = torch.device(device)
    shape = default_shape(dev, layers)
    root = directory or tempfile.gettempdir()
    path = os.path.join(root, f"fastmoe_bench_fp8_{shape.layers}x{shape.experts}")
    print(
        f"checkpoint: {path} ({shape.layers} layer(s) of {shape.experts} experts, "
        f"H={shape.hidden}, I={shape.intermediate}, fp8 e4m3 per expert with float32 "
        f"128x128 weight_scale_inv; {shape.total_bytes / 1e9:.2f} GB)",
        flush=True,
    )
    generate_fp8(path, shape)
    bf16_shape = Shape(layers=layers_for(shape.total_bytes))
    bf16_path = os.path.join(root, f"fastmoe_bench_{bf16_shape.layers}")
    print(f"checkpoint: {bf16_path} (bf16 fused, {bf16_shape.total_bytes / 1e9:.2f} GB)")
    generate(bf16_path, bf16_shape)
    print(describe_machine(dev, path), flush=True)

    fp8 = Fp8Bench(path, shape, dev, repeats, threads)  # type: ignore[arg-type]
    bf16 = Bench(bf16_path, bf16_shape, dev, repeats, threads)
    if dev.type == "cuda":
        fp8.link_rate(pinned=True)  # the physical limit, measured in the same run
    ep = 8 if shape.experts >= 8 else 1
    cases = [Case("TP=1"), Case("TP=2 rank 1", tp_rank=1, tp_size=2)]
    cases.append(Case(f"EP={ep} rank 1", ep_rank=1, ep_size=ep))
    for case in cases:
        fp8.compare(
            case,
            {
                "fastmoe_load fp8 + scales": fp8.fastmoe(case),
                "seed: vLLM per-expert loop, fp8 + scales": fp8.seed(case),
            },
        )
        bf16.compare(case, {"fastmoe_load bf16 fused": bf16.fastmoe(case)})
    rows = fp8.rows + bf16.rows
    print()
    print(render(rows, "fastmoe_load bf16"))
    return rows
