"""`python -m fastmoe_load bench --quant fp8|nvfp4|int4|mxfp4|mxfp4-expert`: quantized experts
beside the pure-Python path.

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
per-expert `weight_loader` loop in pure Python.

`mxfp4` is shaped like gpt-oss-120b instead (fused, 128 experts, H=I=2880, gate and up
interleaved): `gate_up_proj_blocks [E, 2I, H/32, 16]` uint8 with e8m0 `gate_up_proj_scales`
per 32 values and bf16 biases, down's alike, loaded (weights and scales; the biases are 0.1%
of the bytes) into `GptOssMxfp4MoEMethod`'s parameters, gate and up interleaved as vLLM's
gpt-oss layers keep them, beside vLLM's gpt-oss mxfp4 loop (whole tensors, narrowed, one
copy each).

`mxfp4-expert` is shaped like a DeepSeek-V4-Pro layer (one tensor per expert and matrix,
384 experts, H=7168, I=3072, no `model.` prefix): `layers.N.ffn.experts.E.w1.weight` int8-typed
bytes of two e2m1 values with a float8_e8m0fnu `scale` per 32 values, loaded into the uint8
parameters of vLLM's `Mxfp4MoEMethod` (gate rows then up rows), beside vLLM's per-expert
`weight_loader` loop (scales viewed as bytes, as its DeepSeek-V4 loader views them).

`gptq` is shaped like Qwen3-235B-A22B-GPTQ-Int4 (one tensor per expert and matrix, 128
experts, H=4096, I=1536, four layers, 4.9 GB): `qweight [in/8, out]` int32, float16 `scales`
and int32 `qzeros` per 128 inputs, `g_idx [in]`, all stored input-first, loaded input-first
into `AutoGPTQMoEMethod`'s parameters (`w13_qweight [E, H/8, 2I/tp]`, `w13_scales`,
`w13_qzeros`, ...) beside vLLM's per-expert loop through its `is_transposed` branch.

In the same run, the bf16 fused checkpoint of the plain bench is loaded too, so that the
quantized and bf16 checkpoints compare per landed byte.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

import fastmoe_load as fml

from .._fastmoe_load import RequestError
from .._text import plural
from ..engines.spec import ExpertLayerSpec, fill_layer
from ..engines.wna16 import Wna16, served_group
from .generate import (
    Shape,
    announce,
    check_dir,
    claim,
    default_dir,
    finish,
    generate,
    generated,
    layers_for,
    prepare,
    remove,
)
from .harness import Bench, Case, Row, describe_machine, landed_bytes, legend

FP8 = torch.float8_e4m3fn
BLOCK = 128
FP4_GROUP = 16
INT4_GROUP = 32
MX_BLOCK = 32
GPTQ_GROUP = 128
MODULES = ("gate_proj", "up_proj", "down_proj")
SCHEMES = ("fp8", "nvfp4", "int4", "mxfp4", "mxfp4-expert", "gptq")
E8M0 = torch.float8_e8m0fnu
STORED = {
    "fp8": "fp8 e4m3 per expert with float32 128x128 weight_scale_inv",
    "nvfp4": "nvfp4 per expert (uint8, two values a byte) with float8 weight_scale per 16 "
    "values and float32 weight_scale_2 and input_scale",
    "int4": "int4 per expert (int32 weight_packed, eight values each) with bfloat16 "
    "weight_scale per 32 values and weight_shape",
    "mxfp4": "mxfp4 fused as gpt-oss (uint8 blocks, two values a byte, gate and up "
    "interleaved) with e8m0 scales per 32 values and bf16 biases",
    "mxfp4-expert": "mxfp4 per expert as DeepSeek-V4 (int8-typed bytes, two values a byte) "
    "with float8_e8m0fnu scales per 32 values",
    "gptq": "GPTQ int4 per expert, input-first (int32 qweight [in/8, out]) with float16 "
    "scales and int32 qzeros per 128 inputs and g_idx",
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
    "mxfp4": {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router"],
    },
    # DeepSeek-V4: fp8 block scales for the dense layers; `expert_dtype: fp4` at the top of
    # config.json says what the experts are.
    "mxfp4-expert": {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "scale_fmt": "ue8m0",
        "weight_block_size": [BLOCK, BLOCK],
    },
    # Qwen3-235B-A22B-GPTQ-Int4's.
    "gptq": {
        "bits": 4,
        "damp_percent": 0.01,
        "desc_act": False,
        "group_size": GPTQ_GROUP,
        "quant_method": "gptq",
        "static_groups": False,
        "sym": True,
        "true_sequential": True,
    },
}


def module_tensors(
    scheme: str, rows: int, cols: int, weight: torch.Tensor, gen: torch.Generator
) -> dict[str, torch.Tensor]:
    """The tensors of one expert matrix `[rows, cols]` by suffix, as the scheme's releases
    store them; `weight` holds enough random bytes (uint8) for the weight."""
    if scheme == "fp8":
        grid = (math.ceil(rows / BLOCK), math.ceil(cols / BLOCK))
        return {
            "weight": weight[: rows * cols].view(FP8).view(rows, cols).clone(),
            "weight_scale_inv": torch.rand(grid, generator=gen),
        }
    packed = weight[: rows * cols // 2]
    if scheme == "mxfp4-expert":  # e8m0 exponents near 2**0
        exponents = torch.randint(118, 136, (rows, cols // MX_BLOCK), dtype=torch.uint8)
        return {
            "weight": packed.view(torch.int8).view(rows, cols // 2).clone(),
            "scale": exponents.view(E8M0),
        }
    if scheme == "gptq":  # input-first: [in/8, out], groups of inputs
        groups = cols // GPTQ_GROUP
        return {
            "qweight": packed.view(torch.int32).view(cols // 8, rows).clone(),
            "qzeros": torch.full((groups, rows // 8), 0x77777777, dtype=torch.int32),
            "scales": torch.rand(groups, rows, generator=gen).half(),
            "g_idx": torch.arange(cols, dtype=torch.int32) // GPTQ_GROUP,
        }
    if scheme == "int4":
        return {
            "weight_packed": packed.view(torch.int32).view(rows, -1).clone(),
            "weight_scale": torch.rand(rows, cols // INT4_GROUP, generator=gen).bfloat16(),
            "weight_shape": torch.tensor([rows, cols], dtype=torch.int32),
        }
    return {
        "weight": packed.view(rows, cols // 2).clone(),
        "weight_scale": torch.rand(rows, cols // FP4_GROUP, generator=gen).to(FP8),
        "weight_scale_2": torch.rand((), generator=gen),
        "input_scale": torch.rand((), generator=gen),
    }


def mxfp4_layer(
    prefix: str, experts: int, hidden: int, inter: int, block: torch.Tensor, gen: torch.Generator
) -> dict[str, torch.Tensor]:
    """One gpt-oss mxfp4 experts layer's tensors; `block` holds `hidden * inter` random bytes,
    each expert's gate/up blocks (and half of them its down blocks)."""
    gate_up = block.view(1, 2 * inter, hidden // MX_BLOCK, MX_BLOCK // 2)
    down = block[: hidden * inter // 2].view(1, hidden, inter // MX_BLOCK, MX_BLOCK // 2)

    def scales(rows: int, cols: int) -> torch.Tensor:  # e8m0 exponents near 2**0
        return torch.randint(118, 136, (experts, rows, cols // MX_BLOCK), dtype=torch.uint8)

    return {
        f"{prefix}.gate_up_proj_blocks": gate_up.expand(experts, -1, -1, -1).clone(),
        f"{prefix}.gate_up_proj_scales": scales(2 * inter, hidden),
        f"{prefix}.gate_up_proj_bias": torch.randn(experts, 2 * inter, generator=gen).bfloat16(),
        f"{prefix}.down_proj_blocks": down.expand(experts, -1, -1, -1).clone(),
        f"{prefix}.down_proj_scales": scales(hidden, inter),
        f"{prefix}.down_proj_bias": torch.randn(experts, hidden, generator=gen).bfloat16(),
    }


@dataclass(frozen=True)
class Fp8Shape:
    """The quantized checkpoint's shape, of any scheme in `SCHEMES`."""

    layers: int
    experts: int = 256
    hidden: int = 7168
    intermediate: int = 2048
    scheme: str = "fp8"

    @property
    def scale_bytes(self) -> int:
        values = self.hidden * self.intermediate
        if self.scheme == "mxfp4":  # uint8 groups, bf16 biases
            return 3 * self.experts * (values // MX_BLOCK + 2 * self.hidden)
        if self.scheme == "mxfp4-expert":  # e8m0 groups
            return 3 * self.experts * values // MX_BLOCK
        if self.scheme == "nvfp4":  # float8 groups, two float32 scalars
            return 3 * self.experts * (values // FP4_GROUP + 8)
        if self.scheme == "int4":  # bfloat16 groups, the int32 shape
            return 3 * self.experts * (values // INT4_GROUP * 2 + 8)
        if self.scheme == "gptq":  # float16 scales, int32 zero points of 8, g_idx per input
            inputs = 2 * self.hidden + self.intermediate
            return self.experts * (3 * values // GPTQ_GROUP * 5 // 2 + 4 * inputs)
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
        if self.scheme == "mxfp4-expert":  # DeepSeek-V4's names have no `model.` prefix
            return f"layers.{layer}.ffn.experts"
        # DeepSeek-V3's first three layers are dense; its routed experts start at layer 3.
        first = 0 if self.scheme in ("mxfp4", "gptq") else 3
        return f"model.layers.{layer + first}.mlp.experts"


def generate_fp8(path: str, shape: Fp8Shape) -> bool:
    """Writes the quantized checkpoint to directory `path` unless it is there already (see
    `generate.prepare`), with a progress bar on a terminal. Returns whether it was there."""
    if prepare(path, shape.scheme, asdict(shape)):
        return True
    generator = torch.Generator().manual_seed(0)
    h, i = shape.hidden, shape.intermediate
    # Random bytes (no fp8 NaN patterns), copied into every weight: cheap, real data.
    block = torch.randint(0, 0x7E, (h * i,), dtype=torch.uint8, generator=generator)
    # Shards of 32 experts (1.4 GB at DeepSeek-V3's sizes), as releases shard by size; one
    # for each fused mxfp4 layer (1.7 GB at gpt-oss-120b's).
    per_shard = shape.experts if shape.scheme == "mxfp4" else 32
    groups = [
        (layer, first)
        for layer in range(shape.layers)
        for first in range(0, shape.experts, per_shard)
    ]
    weight_map = {}
    bar = tqdm(
        total=shape.total_bytes,
        desc=f"writing the {shape.scheme} checkpoint",
        unit="B",
        unit_scale=True,
        disable=None,  # only on a terminal
    )
    for k, (layer, first) in enumerate(groups):
        file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        if shape.scheme == "mxfp4":
            tensors = mxfp4_layer(shape.prefix(layer), shape.experts, h, i, block, generator)
        for e in range(first, min(first + per_shard, shape.experts)) if not tensors else ():
            for module in MODULES:
                rows, cols = (h, i) if module == "down_proj" else (i, h)
                name = f"{shape.prefix(layer)}.{e}.{module}"
                for suffix, t in module_tensors(shape.scheme, rows, cols, block, generator).items():
                    tensors[f"{name}.{suffix}"] = t
        save_file(tensors, os.path.join(path, file))
        weight_map.update(dict.fromkeys(tensors, file))
        bar.update(sum(t.nbytes for t in tensors.values()))
    bar.close()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": shape.total_bytes}, "weight_map": weight_map}, f)
    if shape.scheme == "mxfp4-expert":
        config = {
            "model_type": "deepseek_v4",
            "expert_dtype": "fp4",
            "hidden_size": h,
            "moe_intermediate_size": i,
            "n_routed_experts": shape.experts,
        }
    elif shape.scheme == "mxfp4":
        config = {
            "model_type": "gpt_oss",
            "hidden_size": h,
            "intermediate_size": i,
            "num_local_experts": shape.experts,
        }
    elif shape.scheme == "gptq":
        config = {
            "model_type": "qwen3_moe",
            "hidden_size": h,
            "moe_intermediate_size": i,
            "num_experts": shape.experts,
            "torch_dtype": "float16",
        }
    else:
        config = {
            "model_type": "deepseek_v3",
            "hidden_size": h,
            "moe_intermediate_size": i,
            "n_routed_experts": shape.experts,
        }
    config["quantization_config"] = QUANTIZATION_CONFIGS[shape.scheme]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    finish(path, shape.scheme, asdict(shape))
    return False


# One layer's destinations: w13, w2 and the scales by vLLM parameter name.
Destinations = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


class Fp8Bench(Bench):
    """The plain bench's timing and table over quantized destinations."""

    shape: Fp8Shape  # type: ignore[assignment]

    @property
    def w13_interleaved(self) -> bool:  # type: ignore[override]
        """gpt-oss' layers keep gate and up interleaved, as its mxfp4 files do."""
        return self.shape.scheme == "mxfp4"

    @property
    def k_first(self) -> bool:  # type: ignore[override]
        """vLLM's GPTQ layers keep each expert input-first, as the files do."""
        return self.shape.scheme == "gptq"

    def served(self, case: Case) -> tuple[int, int, int]:
        """`(first, count, rows)` of the intermediate size for the rank: the rows it keeps,
        and the rows its parameters hold (more where vLLM pads the share to whole blocks)."""
        inter, tp = self.shape.intermediate, case.tp_size
        if case.split == "blocks":  # gpt-oss: cdiv(I/32, tp) whole blocks a rank
            chunk = -(-inter // MX_BLOCK // tp) * MX_BLOCK
        elif case.split == "padded":  # whole 128-blocks a rank
            chunk = -(-inter // tp // BLOCK) * BLOCK
        else:
            chunk = inter // tp
        first = min(case.tp_rank * chunk, inter)
        count = min(chunk, inter - first)
        return first, count, chunk if case.split == "padded" else count

    def refine(self, case: Case) -> int | None:
        """The refined square block of vLLM's fp8 grid for the case, if it refines."""
        if case.split != "refined":
            return None
        return math.gcd(BLOCK, self.shape.intermediate // case.tp_size, self.shape.hidden)

    def destinations(self, case: Case, touched: bool) -> list[Destinations]:  # type: ignore[override]
        s = self.shape
        n, shard, h = len(case.experts(s.experts)), self.served(case)[2], s.hidden
        r = self.refine(case) or BLOCK
        out = []

        def empty(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.empty(shape, dtype=dtype, device=self.device)

        for _ in range(s.layers):
            # `GptOssMxfp4MoEMethod.create_weights` unpadded; `Mxfp4MoEMethod`'s alike
            if s.scheme in ("mxfp4", "mxfp4-expert"):
                w13 = empty(n, 2 * shard, h // 2, dtype=torch.uint8)
                w2 = empty(n, h, shard // 2, dtype=torch.uint8)
                scales = {
                    "w13_weight_scale": empty(n, 2 * shard, h // MX_BLOCK, dtype=torch.uint8),
                    "w2_weight_scale": empty(n, h, shard // MX_BLOCK, dtype=torch.uint8),
                }
            elif s.scheme == "nvfp4":  # `ModelOptNvFp4FusedMoE.create_weights`
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
            elif case.split == "wna16":  # `MoeWNA16Method.create_weights`, symmetric
                shapes = self.wna16(case).shapes(n, h, shard)
                w13 = empty(*shapes["w13"], dtype=torch.uint8)
                w2 = empty(*shapes["w2"], dtype=torch.uint8)
                scales = {
                    name: empty(*shapes[name], dtype=torch.float16)
                    for name in ("w13_scales", "w2_scales")
                }
            elif s.scheme == "gptq":  # `AutoGPTQMoEMethod.create_weights` (input-first)
                f16, groups = torch.float16, h // GPTQ_GROUP
                w13 = empty(n, h // 8, 2 * shard, dtype=torch.int32)
                w2 = empty(n, shard // 8, h, dtype=torch.int32)
                scales = {
                    "w13_scales": empty(n, groups, 2 * shard, dtype=f16),
                    "w2_scales": empty(n, shard // GPTQ_GROUP, h, dtype=f16),
                    "w13_qzeros": empty(n, groups, 2 * shard // 8, dtype=torch.int32),
                    "w2_qzeros": empty(n, shard // GPTQ_GROUP, h // 8, dtype=torch.int32),
                }
            elif s.scheme == "int4":  # `CompressedTensorsWNA16MoEMethod.create_weights`
                bf16 = torch.bfloat16
                w13 = empty(n, 2 * shard, h // 8, dtype=torch.int32)
                w2 = empty(n, h, shard // 8, dtype=torch.int32)
                scales = {
                    "w13_weight_scale": empty(n, 2 * shard, h // INT4_GROUP, dtype=bf16),
                    "w2_weight_scale": empty(n, h, shard // INT4_GROUP, dtype=bf16),
                    "w13_weight_shape": empty(n, 2, dtype=torch.int32),
                    "w2_weight_shape": empty(n, 2, dtype=torch.int32),
                }
            else:  # `Fp8MoEMethod.create_weights`, block scales (on its refined grid)
                rows, cols = math.ceil(shard / r), math.ceil(h / r)
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

    def wna16(self, case: Case) -> Wna16:
        """vLLM's `MoeWNA16Method` for the case: Marlin cannot serve a share that cuts the
        groups, so the group is halved until it divides the share."""
        rows = self.served(case)[2]
        group = served_group(GPTQ_GROUP, rows, self.shape.hidden)
        assert group is not None, f"no MoeWNA16 group for {rows} rows"
        return Wna16("gptq", 4, group, zero_points=False)

    def fastmoe(self, case: Case, **open_args: Any) -> Callable[[list], int]:
        """fastmoe_load as `load_format="fastmoe"` fills a vLLM layer: cases that split as
        vLLM serves them go through the engine-neutral `ExpertLayerSpec` and its filler."""
        if case.split is None:
            return super().fastmoe(case, **open_args)
        first, count, _ = self.served(case)
        refine = self.refine(case)
        split = {
            "shard": (first, count) if case.split != "refined" else None,
            "padding": "corner" if case.split == "blocks" else "halves",
            "pad_fill": case.split == "padded",
            "scale_refine": refine,
            "wna16": self.wna16(case) if case.split == "wna16" else None,
        }

        def load(dests: list[tuple]) -> int:
            with fml.open(self.path, num_threads=self.threads, **open_args) as ckpt:
                for layer, (w13, w2, scales) in enumerate(dests):
                    group = ckpt.experts(self.shape.prefix(layer))
                    parameters = {"w13": w13, "w2": w2, **scales}
                    spec = ExpertLayerSpec(
                        group=group,
                        parameters=parameters,
                        names={name: name for name in parameters},
                        tp_rank=case.tp_rank,
                        tp_size=case.tp_size,
                        experts=case.experts(self.shape.experts),
                        interleaved=self.w13_interleaved,
                        **split,
                    )
                    fill_layer(ckpt, spec)
            return landed_bytes(dests)

        return load

    def seed(self, case: Case, **options: Any) -> Callable[[list], int]:
        """vLLM's own loop, refining or padding the split as vLLM does for the case."""
        refine = self.refine(case)
        if refine is not None:
            options["scale_refine"] = (BLOCK // refine, BLOCK // refine)
        return super().seed(case, padded_tp=case.split == "padded", **options)


def served_cases(scheme: str, shape: Fp8Shape) -> list[Case]:
    """The TP sizes these releases are served at where vLLM splits otherwise than evenly:
    block fp8 at TP=8 where I/8 cuts the 128-blocks (Qwen3-235B-A22B-FP8, GLM-4.5-FP8,
    MiniMax-M2: 192 rows a rank), refined and padded; gpt-oss mxfp4 at TP=4 where I/32
    blocks do not divide by 4 (gpt-oss-120b: 736, 736, 736, 672), its last rank."""
    if scheme == "fp8" and (shape.intermediate // 8) % BLOCK:
        return [
            Case("TP=8 r1 ref", tp_rank=1, tp_size=8, split="refined"),
            Case("TP=8 r1 pad", tp_rank=1, tp_size=8, split="padded"),
        ]
    if scheme == "mxfp4" and (shape.intermediate // MX_BLOCK) % 4:
        return [Case("TP=4 rank 3", tp_rank=3, tp_size=4, split="blocks")]
    if scheme == "gptq" and (shape.intermediate // 8) % GPTQ_GROUP:
        return [Case("TP=8 r1 wna16", tp_rank=1, tp_size=8, split="wna16")]
    return []


def default_shape(
    device: torch.device,
    layers: int | None,
    experts: int | None = None,
    hidden: int | None = None,
    intermediate: int | None = None,
    scheme: str = "fp8",
) -> Fp8Shape:
    """DeepSeek-V3's sizes unless given: one full layer (11.3 GB in fp8, 6 GB in nvfp4 or
    int4) on a GPU machine; for mxfp4, gpt-oss-120b's, four layers (6.8 GB); for
    mxfp4-expert, one DeepSeek-V4-Pro layer (384 experts, 13.5 GB); on a CPU, as
    many experts as fit an eighth of the memory, so that the checkpoint stays in the page
    cache."""
    if scheme == "mxfp4":
        base = Fp8Shape(layers or 4, experts=128, hidden=2880, intermediate=2880, scheme=scheme)
    elif scheme == "mxfp4-expert":  # DeepSeek-V4-Pro's routed experts
        base = Fp8Shape(layers or 1, experts=384, hidden=7168, intermediate=3072, scheme=scheme)
    elif scheme == "gptq":
        base = Fp8Shape(layers or 4, experts=128, hidden=4096, intermediate=1536, scheme=scheme)
    else:
        base = Fp8Shape(layers=layers or 1, scheme=scheme)
    base = replace(
        base, hidden=hidden or base.hidden, intermediate=intermediate or base.intermediate
    )
    if experts or device.type == "cuda":
        return replace(base, experts=experts or base.experts)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    one = replace(base, layers=1, experts=1)
    return replace(base, experts=max(8, min(256, ram // 8 // one.layer_bytes)))


def _check_root(root: str, scheme: str) -> None:
    """`root` holds the two checkpoints in `{scheme}/` and `bf16/`: it must be new, empty or
    hold only those, each one a bench generated."""
    if os.path.lexists(root) and not os.path.isdir(root):
        raise RequestError(f"{root}: exists and is not a directory; give --dir a directory")
    others = sorted(set(os.listdir(root)) - {scheme, "bf16"}) if os.path.isdir(root) else []
    if others:
        raise RequestError(
            f"{root}: the directory is not empty and holds more than the {scheme}/ and bf16/ "
            f"checkpoints bench --quant generates ({', '.join(others[:3])}); nothing in it is "
            "overwritten: give --dir a new or empty directory"
        )
    for name in (scheme, "bf16"):
        check_dir(os.path.join(root, name))


def main(
    device: str = "cpu",
    layers: int | None = None,
    directory: str | None = None,
    repeats: int | None = None,
    threads: int | None = None,
    clean: bool = False,
    experts: int | None = None,
    hidden: int | None = None,
    intermediate: int | None = None,
    scheme: str = "fp8",
) -> list[Row]:
    """Generates the `scheme` checkpoint (see `default_shape`) and a bf16 fused one of about
    the same size in `directory`/`scheme` and `directory`/bf16 (default: `default_dir`,
    reused while the shapes match; removed afterwards with `clean`), and prints the table."""
    dev = torch.device(device)
    shape = default_shape(dev, layers, experts, hidden, intermediate, scheme)
    group = {"fp8": 1, "nvfp4": FP4_GROUP, "int4": INT4_GROUP, "gptq": GPTQ_GROUP}.get(
        scheme, MX_BLOCK
    )
    # gptq: the TP=2 case splits I, which must stay on whole groups.
    inter_group = 2 * group if scheme == "gptq" else group
    if shape.hidden % group or shape.intermediate % inter_group:
        raise RequestError(
            f"{scheme} scales groups of {group} values: --hidden and --intermediate must be "
            f"multiples of {group} and {inter_group} (got {shape.hidden} and "
            f"{shape.intermediate})"
        )
    one = Shape(layers=1)
    one = replace(
        one,
        experts=experts or one.experts,
        hidden=hidden or one.hidden,
        intermediate=intermediate or one.intermediate,
    )
    bf16_shape = replace(one, layers=layers_for(shape.total_bytes, one))
    root = directory or default_dir(f"fastmoe_bench_{scheme}")
    path, bf16_path = os.path.join(root, scheme), os.path.join(root, "bf16")
    _check_root(root, scheme)
    with claim(path), claim(bf16_path):  # no other bench writes or removes them meanwhile
        announce(
            path,
            f"{plural(shape.layers, 'layer')} of {shape.experts} experts, H={shape.hidden}, "
            f"I={shape.intermediate}, {STORED[scheme]}, {shape.total_bytes / 1e9:.3g} GB",
            generated(path, scheme, asdict(shape)),
            clean,
        )
        announce(
            bf16_path,
            f"bf16 fused, {plural(bf16_shape.layers, 'layer')} of E={bf16_shape.experts}, "
            f"H={bf16_shape.hidden}, I={bf16_shape.intermediate}, "
            f"{bf16_shape.total_bytes / 1e9:.3g} GB",
            generated(bf16_path, "experts", asdict(bf16_shape)),
            clean,
        )
        try:
            generate_fp8(path, shape)
            generate(bf16_path, bf16_shape)
            print(describe_machine(dev, path), flush=True)
            reference = "fastmoe_load bf16"
            fp8 = Fp8Bench(path, shape, dev, repeats, threads, reference)  # type: ignore[arg-type]
            bf16 = Bench(bf16_path, bf16_shape, dev, repeats, threads, reference, rows=fp8.rows)
            if dev.type == "cuda":
                fp8.link_rate(pinned=True)  # the physical limit, measured in the same run
            cases = [Case("TP=1"), Case("TP=2 rank 1", tp_rank=1, tp_size=2)]
            ep = min(8, shape.experts)
            if ep > 1:
                cases.append(Case(f"EP={ep} rank 1", ep_rank=1, ep_size=ep))
            cases += served_cases(scheme, shape)
            seed_label = (
                "seed: vLLM gpt-oss mxfp4 loop + scales"
                if scheme == "mxfp4"
                else f"seed: vLLM per-expert loop, {scheme} + scales"
            )
            for case in cases:
                # bf16 first, so that the quantized rows print with their ratio to it.
                bf16.compare(case, {"fastmoe_load bf16 fused": bf16.fastmoe(case)})
                contenders = {f"fastmoe_load {scheme} + scales": fp8.fastmoe(case)}
                if case.split != "wna16":  # no seed path converts into MoeWNA16's layout
                    contenders[seed_label] = fp8.seed(case)
                fp8.compare(case, contenders)
            print()
            print(legend(fp8))
        finally:
            if clean:
                remove(path)
                remove(bf16_path)
                if os.path.isdir(root) and not os.listdir(root):
                    os.rmdir(root)
    return fp8.rows
