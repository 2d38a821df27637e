"""`python -m fastmoe_load bench --quant fp8|nvfp4|int4`: quantized experts beside the
pure-Python path.

A generated checkpoint shaped like DeepSeek-V3's routed experts (one tensor per expert and
matrix, 256 experts, H=7168, I=2048), quantized as the releases are: `fp8`, fp8 e4m3
weights each with its float32 128 x 128 `weight_scale_inv` (DeepSeek-V3), loaded into the
parameters vLLM's `Fp8MoEMethod` creates (`w13_weight`, `w2_weight`, `w13_weight_scale_inv`,
`w2_weight_scale_inv`); `nvfp4`, uint8 weights of two e2m1 values a byte, float8
`weight_scale` per 16 values and float32 `weight_scale_2` and `input_scale` scalars
(DeepSeek-R1-FP4), into `ModelOptNvFp4FusedMoE`'s; `int4`, compressed-tensors
`pack-quantized` int32 `weight_packed` of eight values, bfloat16 `weight_scale` per 32 values
and `weight_shape` (Kimi-K2-Thinking), into `CompressedTensorsWNA16MoEMethod`'s. Thousands
of small scale tensors lie beside the weights. Loaded by fastmoe_load and by vLLM's
per-expert `weight_loader` loop in pure Python; and, in the same run, the bf16 fused
checkpoint of the plain bench, so that the quantized and bf16 checkpoints compare per landed
byte.
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
FP4_GROUP = 16
INT4_GROUP = 32
MODULES = ("gate_proj", "up_proj", "down_proj")
SCHEMES = ("fp8", "nvfp4", "int4")


def module_tensors(
    scheme: str, rows: int, cols: int, weight: torch.Tensor, gen: torch.Generator
) -> dict[str, torch.Tensor]:
    """The tensors of one expert matrix `[rows, cols]` by suffix, as the scheme's releases
    store them; `weight` holds enough random bytes for the weight."""
    if scheme == "fp8":
        grid = (math.ceil(rows / BLOCK), math.ceil(cols / BLOCK))
        return {
            "weight": weight[: rows * cols].view(FP8).view(rows, cols).clone(),
            "weight_scale_inv": torch.rand(grid, generator=gen),
        }
    if scheme == "int4":
        return {
            "weight_packed": weight[: rows * cols // 2].view(torch.int32).view(rows, -1).clone(),
            "weight_scale": torch.rand(rows, cols // INT4_GROUP, generator=gen).bfloat16(),
            "weight_shape": torch.tensor([rows, cols], dtype=torch.int32),
        }
    packed = rows * cols // 2
    return {
        "weight": weight[:packed].view(rows, cols // 2).clone(),
        "weight_scale": torch.rand(rows, cols // FP4_GROUP, generator=gen).to(FP8),
        "weight_scale_2": torch.rand((), generator=gen),
        "input_scale": torch.rand((), generator=gen),
    }


QUANTIZATION_CONFIGS = {
    "fp8": {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "weight_block_size": [BLOCK, BLOCK],
    },
    "nvfp4": {
        "quant_method": "modelopt",
        "quant_algo": "NVFP4",
        "group_size": FP4_GROUP,
        "kv_cache_quant_algo": None,
        "exclude_modules": ["lm_head"],
    },
    "int4": {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 4,
                    "type": "int",
                    "symmetric": True,
                    "strategy": "group",
                    "group_size": INT4_GROUP,
                },
            }
        },
        "ignore": ["lm_head"],
    },
}


@dataclass(frozen=True)
class QuantShape:
    layers: int
    experts: int = 256
    hidden: int = 7168
    intermediate: int = 2048
    scheme: str = "fp8"

    @property
    def scale_bytes(self) -> int:
        if self.scheme == "nvfp4":  # float8 groups, two float32 scalars
            return 3 * self.experts * (self.hidden * self.intermediate // FP4_GROUP + 8)
        if self.scheme == "int4":  # bfloat16 groups, the int32 shape
            return 3 * self.experts * (self.hidden * self.intermediate // INT4_GROUP * 2 + 8)
        rows, cols = math.ceil(self.intermediate / BLOCK), math.ceil(self.hidden / BLOCK)
        return 3 * self.experts * rows * cols * 4  # float32

    @property
    def layer_bytes(self) -> int:
        values = 3 * self.experts * self.hidden * self.intermediate
        return (values if self.scheme == "fp8" else values // 2) + self.scale_bytes

    @property
    def total_bytes(self) -> int:
        return self.layers * self.layer_bytes

    def prefix(self, layer: int) -> str:
        # DeepSeek-V3's first three layers are dense; its routed experts start at layer 3.
        return f"model.layers.{layer + 3}.mlp.experts"


def generate_quantized(path: str, shape: QuantShape) -> str:
    """Writes the quantized checkpoint to directory `path` unless a matching one is there
    already."""
    os.makedirs(path, exist_ok=True)
    marker = os.path.join(path, MARKER)
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == asdict(shape):
                return path
    generator = torch.Generator().manual_seed(0)
    h, i = shape.hidden, shape.intermediate
    # Random bytes (no fp8 NaN patterns), copied into every weight: cheap, real data.
    block = torch.randint(0, 0x7E, (h * i,), dtype=torch.uint8, generator=generator)
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
                for suffix, t in module_tensors(shape.scheme, rows, cols, block, generator).items():
                    tensors[f"{name}.{suffix}"] = t
        save_file(tensors, os.path.join(path, file))
        weight_map.update(dict.fromkeys(tensors, file))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": shape.total_bytes}, "weight_map": weight_map}, f)
    config = {
        "model_type": "deepseek_v3",
        "hidden_size": h,
        "moe_intermediate_size": i,
        "n_routed_experts": shape.experts,
        "quantization_config": QUANTIZATION_CONFIGS[shape.scheme],
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with open(marker, "w") as f:
        json.dump(asdict(shape), f)
    return path


# One layer's destinations: w13, w2 and the scales by vLLM parameter name.
Destinations = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


class QuantBench(Bench):
    """The plain bench's timing and table over quantized destinations."""

    shape: QuantShape  # type: ignore[assignment]

    def destinations(self, case: Case, touched: bool) -> list[Destinations]:  # type: ignore[override]
        s = self.shape
        n, shard, h = len(case.experts(s.experts)), s.intermediate // case.tp_size, s.hidden
        out = []

        def empty(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.empty(shape, dtype=dtype, device=self.device)

        for _ in range(s.layers):
            if s.scheme == "nvfp4":  # `ModelOptNvFp4FusedMoE.create_weights`
                w13 = empty(n, 2 * shard, h // 2, dtype=torch.uint8)
                w2 = empty(n, h, shard // 2, dtype=torch.uint8)
                scales = {
                    "w13_weight_scale": empty(n, 2 * shard, h // FP4_GROUP, dtype=FP8),
                    "w2_weight_scale": empty(n, h, shard // FP4_GROUP, dtype=FP8),
                    "w13_weight_scale_2": empty(n, 2),
                    "w2_weight_scale_2": empty(n),
                    "w13_input_scale": empty(n, 2),
                    "w2_input_scale": empty(n),
                }
            elif s.scheme == "int4":  # `CompressedTensorsWNA16MoEMethod.create_weights`
                w13 = empty(n, 2 * shard, h // 8, dtype=torch.int32)
                w2 = empty(n, h, shard // 8, dtype=torch.int32)
                scales = {
                    "w13_weight_scale": empty(n, 2 * shard, h // INT4_GROUP, dtype=torch.bfloat16),
                    "w2_weight_scale": empty(n, h, shard // INT4_GROUP, dtype=torch.bfloat16),
                    "w13_weight_shape": empty(n, 2, dtype=torch.int32),
                    "w2_weight_shape": empty(n, 2, dtype=torch.int32),
                }
            else:  # `Fp8MoEMethod.create_weights`, block scales
                rows, cols = math.ceil(shard / BLOCK), math.ceil(h / BLOCK)
                w13, w2 = empty(n, 2 * shard, h, dtype=FP8), empty(n, h, shard, dtype=FP8)
                scales = {
                    "w13_weight_scale_inv": empty(n, 2 * rows, cols),
                    "w2_weight_scale_inv": empty(n, cols, rows),
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


def default_shape(device: torch.device, layers: int | None, scheme: str = "fp8") -> QuantShape:
    """One full DeepSeek-V3 layer (11.3 GB in fp8, 6 GB in nvfp4) on a GPU machine; on a CPU,
    as many experts as fit an eighth of the memory, so that the checkpoint stays in the page
    cache."""
    if device.type == "cuda":
        return QuantShape(layers=layers or 1, scheme=scheme)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    one = QuantShape(layers=1, experts=1, scheme=scheme)
    experts = max(8, min(256, ram // 8 // one.layer_bytes))
    return QuantShape(layers=layers or 1, experts=experts, scheme=scheme)


def main(
    device: str = "cpu",
    layers: int | None = None,
    directory: str | None = None,
    repeats: int = 5,
    threads: int | None = None,
    scheme: str = "fp8",
) -> list:
    dev = torch.device(device)
    shape = default_shape(dev, layers, scheme)
    root = directory or tempfile.gettempdir()
    path = os.path.join(root, f"fastmoe_bench_{scheme}_{shape.layers}x{shape.experts}")
    stored = {
        "fp8": "fp8 e4m3 per expert with float32 128x128 weight_scale_inv",
        "nvfp4": "nvfp4 per expert (uint8, two values a byte) with float8 weight_scale per "
        "16 values and float32 weight_scale_2 and input_scale",
        "int4": "int4 per expert (int32 weight_packed, eight values each) with bfloat16 "
        "weight_scale per 32 values and weight_shape",
    }[scheme]
    print(
        f"checkpoint: {path} ({shape.layers} layer(s) of {shape.experts} experts, "
        f"H={shape.hidden}, I={shape.intermediate}, {stored}; "
        f"{shape.total_bytes / 1e9:.2f} GB)",
        flush=True,
    )
    generate_quantized(path, shape)
    bf16_shape = Shape(layers=layers_for(shape.total_bytes))
    bf16_path = os.path.join(root, f"fastmoe_bench_{bf16_shape.layers}")
    print(f"checkpoint: {bf16_path} (bf16 fused, {bf16_shape.total_bytes / 1e9:.2f} GB)")
    generate(bf16_path, bf16_shape)
    print(describe_machine(dev, path), flush=True)

    quant = QuantBench(path, shape, dev, repeats, threads)  # type: ignore[arg-type]
    bf16 = Bench(bf16_path, bf16_shape, dev, repeats, threads)
    if dev.type == "cuda":
        quant.link_rate(pinned=True)  # the physical limit, measured in the same run
    ep = 8 if shape.experts >= 8 else 1
    cases = [Case("TP=1"), Case("TP=2 rank 1", tp_rank=1, tp_size=2)]
    cases.append(Case(f"EP={ep} rank 1", ep_rank=1, ep_size=ep))
    for case in cases:
        quant.compare(
            case,
            {
                f"fastmoe_load {scheme} + scales": quant.fastmoe(case),
                f"seed: vLLM per-expert loop, {scheme} + scales": quant.seed(case),
            },
        )
        bf16.compare(case, {"fastmoe_load bf16 fused": bf16.fastmoe(case)})
    rows = quant.rows + bf16.rows
    print()
    print(render(rows, "fastmoe_load bf16"))
    return rows
