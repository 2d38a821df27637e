"""compressed-tensors int8 W8A8 and NVFP4 experts.

int8 W8A8 (llm-compressor's `W8A8` int preset, `format: int-quantized`): per expert `weight`
int8 `[out, in]` with one float `weight_scale [out, 1]` per channel, dynamic per-token int8
activations; into vLLM's `CompressedTensorsW8A8Int8MoEMethod` (`w13_weight [E, 2I/tp, H]`
int8, `w13_weight_scale [E, 2I/tp, 1]` float32, `w2_weight_scale [E, H, 1]`).

NVFP4 (`format: nvfp4-pack-quantized`, `strategy: tensor_group`): per expert `weight_packed`
uint8 `[out, in/2]` (two e2m1 values a byte), float8 `weight_scale [out, in/16]`, float32
`weight_global_scale [1]` and `input_global_scale [1]`; into vLLM's
`CompressedTensorsW4A4Nvfp4MoEMethod` (`w13_weight_packed`, `w13_weight_scale`,
`w13_weight_global_scale [E, 2]`, `w13_input_global_scale [E, 2]`, `w2_…_global_scale [E]`).

Compared bit for bit with slices taken by hand here (vLLM's own loading:
test_vllm_real.py). Activation order by group (`actorder: group`, `weight_g_idx` beside the
weights), which vLLM 0.33 and later refuse: test_unsupported.py.
"""

from __future__ import annotations

from pathlib import Path

import fastmoe_load as fml
import pytest
import torch
from conftest import assert_loads_as
from safetensors.torch import load_file
from test_quant import fp8, save

E, H, INTER = 4, 128, 64
LAYERS = 2
FP4_GROUP = 16
MODULES = {"gate_proj": (INTER, H), "up_proj": (INTER, H), "down_proj": (H, INTER)}


def prefix(layer: int = 1) -> str:
    return f"model.layers.{layer}.mlp.experts"


def int8_w8a8(path: Path, scale_dtype: torch.dtype = torch.bfloat16) -> Path:
    """llm-compressor's int8 W8A8 (`int-quantized`) Qwen3-MoE experts, scaled down."""
    gen = torch.Generator().manual_seed(8)
    tensors = {}
    for layer in range(LAYERS):
        for e in range(E):
            for module, (rows, cols) in MODULES.items():
                stem = f"{prefix(layer)}.{e}.{module}"
                tensors[f"{stem}.weight"] = torch.randint(
                    -128, 128, (rows, cols), dtype=torch.int8, generator=gen
                )
                tensors[f"{stem}.weight_scale"] = torch.rand(rows, 1, generator=gen).to(scale_dtype)
        tensors[f"model.layers.{layer}.mlp.gate.weight"] = torch.randn(E, H).bfloat16()
    int8 = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None}
    quant = {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {**int8, "strategy": "channel", "dynamic": False, "actorder": None},
                "input_activations": {**int8, "strategy": "token", "dynamic": True},
            }
        },
        "ignore": ["lm_head", "re:.*mlp.gate$"],
    }
    return save(path, tensors, "qwen3_moe", quant)


def nvfp4_compressed_tensors(path: Path) -> Path:
    """llm-compressor's NVFP4 (`nvfp4-pack-quantized`) Qwen3-MoE experts, scaled down."""
    gen = torch.Generator().manual_seed(4)
    tensors = {}
    for layer in range(LAYERS):
        for e in range(E):
            for module, (rows, cols) in MODULES.items():
                stem = f"{prefix(layer)}.{e}.{module}"
                tensors[f"{stem}.weight_packed"] = torch.randint(
                    0, 256, (rows, cols // 2), dtype=torch.uint8, generator=gen
                )
                tensors[f"{stem}.weight_scale"] = fp8(rows, cols // FP4_GROUP, gen=gen)
                tensors[f"{stem}.weight_global_scale"] = torch.rand(1, generator=gen) + 0.5
                tensors[f"{stem}.input_global_scale"] = torch.rand(1, generator=gen) + 0.5
        tensors[f"model.layers.{layer}.mlp.gate.weight"] = torch.randn(E, H).bfloat16()
    fp4 = {
        "num_bits": 4,
        "type": "float",
        "symmetric": True,
        "strategy": "tensor_group",
        "group_size": FP4_GROUP,
    }
    quant = {
        "quant_method": "compressed-tensors",
        "format": "nvfp4-pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {**fp4, "dynamic": False},
                "input_activations": {**fp4, "dynamic": "local"},
            }
        },
        "ignore": ["lm_head", "re:.*mlp.gate$"],
    }
    return save(path, tensors, "qwen3_moe", quant)


@pytest.fixture(scope="module")
def int8(tmp_path_factory) -> Path:
    return int8_w8a8(tmp_path_factory.mktemp("int8"))


@pytest.fixture(scope="module")
def nvfp4(tmp_path_factory) -> Path:
    return nvfp4_compressed_tensors(tmp_path_factory.mktemp("nvfp4-ct"))


def expected(
    path: Path, tp_rank: int, tp: int, experts: list[int], kinds: dict[str, int]
) -> dict[str, torch.Tensor]:
    """vLLM's parameters sliced by hand: gate's and up's rows of the rank's shard, down's
    columns (in stored elements: `kinds` maps each kind to its values per stored column;
    0 for a per-tensor value, kept `[E, 2]` for gate and up and `[E]` for down)."""
    tensors = load_file(path / "model.safetensors")
    shard = INTER // tp
    rows = slice(tp_rank * shard, (tp_rank + 1) * shard)

    def t(e: int, module: str, kind: str) -> torch.Tensor:
        return tensors[f"{prefix()}.{e}.{module}.{kind}"]

    want = {}
    for kind, per in kinds.items():
        dest = {"weight": "", "weight_packed": ""}.get(kind, f"_{kind}")
        if per == 0:
            gate_up = [torch.cat([t(e, "gate_proj", kind), t(e, "up_proj", kind)]) for e in experts]
            down = [t(e, "down_proj", kind).reshape(()) for e in experts]
        else:
            cols = slice(tp_rank * shard // per, (tp_rank + 1) * shard // per)
            gate_up = [
                torch.cat([t(e, "gate_proj", kind)[rows], t(e, "up_proj", kind)[rows]])
                for e in experts
            ]
            # Per-channel scales of down are one per output row: every rank keeps them all.
            down = [
                t(e, "down_proj", kind) if kind == "weight_scale" and per == 1 and
                t(e, "down_proj", kind).shape[1] == 1 else t(e, "down_proj", kind)[:, cols]
                for e in experts
            ]  # fmt: skip
        want[f"w13{dest}"], want[f"w2{dest}"] = torch.stack(gate_up), torch.stack(down)
    return want


INT8_KINDS = {"weight": 1, "weight_scale": 1}
NVFP4_KINDS = {
    "weight_packed": 2,
    "weight_scale": FP4_GROUP,
    "weight_global_scale": 0,
    "input_global_scale": 0,
}


def test_int8_detected_as_channel_scaled(int8):
    with fml.open(int8) as ckpt:
        assert ckpt.unsupported_groups() == []
        layer = ckpt.experts(prefix())
        assert (layer.pack, layer.dtype) == (1, torch.int8)
        assert str(layer.quantization) == (
            "compressed-tensors int8, channel scales in bfloat16 (weight_scale)"
        )


def test_nvfp4_detected_with_global_scales(nvfp4):
    with fml.open(nvfp4) as ckpt:
        assert ckpt.unsupported_groups() == []
        layer = ckpt.experts(prefix())
        assert (layer.pack, layer.dtype) == (2, torch.uint8)
        q = layer.quantization
        assert q is not None and q.weights == "nvfp4"
        assert str(q) == (
            "compressed-tensors nvfp4, 16-value group scales in float8_e4m3fn "
            "(input_global_scale, weight_global_scale, weight_scale)"
        )
        assert not q.companion("input_global_scale").merged_w13


@pytest.mark.parametrize(("tp_rank", "tp"), [(0, 1), (1, 2), (3, 4)])
def test_int8_loads_as_sliced_by_hand(int8, tp_rank, tp):
    experts = [2, 0, 2]
    want = expected(int8, tp_rank, tp, experts, INT8_KINDS)
    assert want["w13_weight_scale"].shape == (3, 2 * INTER // tp, 1)
    assert want["w2_weight_scale"].shape == (3, H, 1)
    assert_loads_as(int8, prefix(), want, tp_rank=tp_rank, tp_size=tp, local_experts=experts)


def test_int8_scales_land_in_vllms_float32(int8):
    """vLLM's parameters are float32: the bfloat16 scales convert exactly (`allow_cast`)."""
    want = expected(int8, 1, 2, [1], INT8_KINDS)
    exact = {k: v.float() if k.endswith("scale") else v for k, v in want.items()}
    assert_loads_as(int8, prefix(), exact, tp_rank=1, tp_size=2, local_experts=[1], allow_cast=True)


@pytest.mark.parametrize(("tp_rank", "tp"), [(0, 1), (1, 2), (3, 4)])
def test_nvfp4_loads_as_sliced_by_hand(nvfp4, tp_rank, tp):
    experts = [3, 1]
    want = expected(nvfp4, tp_rank, tp, experts, NVFP4_KINDS)
    assert want["w13_weight_global_scale"].shape == (2, 2)
    assert want["w2_input_global_scale"].shape == (2,)
    assert_loads_as(nvfp4, prefix(), want, tp_rank=tp_rank, tp_size=tp, local_experts=experts)
