"""NVFP4 (ModelOpt: the FP4 re-releases of DeepSeek-R1, Kimi-K2.5, Qwen3-235B): per expert
`weight` uint8 `[out, in/2]` (two e2m1 values a byte along the input dimension),
`weight_scale` float8_e4m3fn `[out, in/16]`, `weight_scale_2` and `input_scale` float32
scalars; loaded into the parameters vLLM's `ModelOptNvFp4FusedMoE` creates and compared bit
for bit with slices taken by hand (vLLM's own loader: test_vllm_real.py)."""

from __future__ import annotations

import warnings
from pathlib import Path

import fastmoe_load as fml
import pytest
import torch
from conftest import assert_bitwise_equal, assert_loads_as, seed_filled
from fastmoe_load.cli import main
from test_quant import fp8, save

E, H, INTER = 4, 128, 64
LAYERS = 2
MODULES = {"gate_proj": (INTER, H), "up_proj": (INTER, H), "down_proj": (H, INTER)}
FP4_GROUP = 16


def prefix(layer: int = 1) -> str:
    return f"model.layers.{layer}.mlp.experts"


def nvfp4_modelopt(path: Path, quant_algo: str = "NVFP4", config: bool = True) -> Path:
    """Per-expert NVFP4 as ModelOpt exports it, with a bf16 router and shared expert."""
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for layer in range(LAYERS):
        for e in range(E):
            for module, (rows, cols) in MODULES.items():
                name = f"{prefix(layer)}.{e}.{module}"
                tensors[f"{name}.weight"] = torch.randint(
                    0, 256, (rows, cols // 2), dtype=torch.uint8, generator=gen
                )
                tensors[f"{name}.weight_scale"] = fp8(rows, cols // FP4_GROUP, gen=gen)
                tensors[f"{name}.weight_scale_2"] = torch.rand((), generator=gen) + 0.5
                tensors[f"{name}.input_scale"] = torch.rand((), generator=gen) + 0.5
        mlp = f"model.layers.{layer}.mlp"
        tensors[f"{mlp}.gate.weight"] = torch.randn(E, H, generator=gen).bfloat16()
        tensors[f"{mlp}.shared_experts.up_proj.weight"] = torch.randn(INTER, H).bfloat16()
    quant = {
        "quant_method": "modelopt",
        "quant_algo": quant_algo,
        "group_size": FP4_GROUP,
        "kv_cache_quant_algo": None,
        "exclude_modules": ["lm_head", "model.layers.*.mlp.gate"],
    }
    return save(path, tensors, "qwen3_moe", quant if config else None)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return nvfp4_modelopt(tmp_path_factory.mktemp("nvfp4"))


def stored(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def expected(tensors, tp_rank: int, tp: int, experts: list[int]) -> dict[str, torch.Tensor]:
    """vLLM's NVFP4 parameters sliced by hand: rows of gate and up, columns of down, in
    stored elements (packs of 2 values, groups of 16 per scale)."""
    shard = INTER // tp
    rows = slice(tp_rank * shard, (tp_rank + 1) * shard)

    def cols(per: int) -> slice:
        return slice(tp_rank * shard // per, (tp_rank + 1) * shard // per)

    def t(e: int, module: str, kind: str) -> torch.Tensor:
        return tensors[f"{prefix()}.{e}.{module}.{kind}"]

    def w13(kind: str) -> torch.Tensor:
        return torch.stack(
            [
                torch.cat([t(e, "gate_proj", kind)[rows], t(e, "up_proj", kind)[rows]])
                for e in experts
            ]
        )

    def pair(kind: str) -> torch.Tensor:
        return torch.stack(
            [torch.stack([t(e, "gate_proj", kind), t(e, "up_proj", kind)]) for e in experts]
        )

    return {
        "w13": w13("weight"),
        "w2": torch.stack([t(e, "down_proj", "weight")[:, cols(2)] for e in experts]),
        "w13_weight_scale": w13("weight_scale"),
        "w2_weight_scale": torch.stack(
            [t(e, "down_proj", "weight_scale")[:, cols(FP4_GROUP)] for e in experts]
        ),
        "w13_weight_scale_2": pair("weight_scale_2"),
        "w2_weight_scale_2": torch.stack([t(e, "down_proj", "weight_scale_2") for e in experts]),
        "w13_input_scale": pair("input_scale"),
        "w2_input_scale": torch.stack([t(e, "down_proj", "input_scale") for e in experts]),
    }


def test_detected_with_packing_and_companions(checkpoint):
    with fml.open(checkpoint) as ckpt:
        layers = ckpt.moe_layers()
        assert ckpt.unsupported_groups() == []
        layer = ckpt.experts(prefix())
        assert [x.prefix for x in layers] == [prefix(0), prefix(1)]
        assert (layer.format, layer.num_experts, layer.hidden_size, layer.intermediate_size) == (
            "per_expert",
            E,
            H,
            INTER,
        )
        assert (layer.dtype, layer.pack) == (torch.uint8, 2)
        q = layer.quantization
        assert q is not None
        assert str(q) == (
            "modelopt nvfp4, 16-value group scales in float8_e4m3fn "
            "(input_scale, weight_scale, weight_scale_2)"
        )
        assert q.weight_scale.kind == "weight_scale"
        assert not q.companion("input_scale").merged_w13  # vLLM keeps gate's and up's
        tensors = stored(checkpoint)
        for e in (0, 3):
            for matrix, module in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                name = f"{prefix()}.{e}.{module}"
                view = getattr(layer, matrix)(e)
                assert_bitwise_equal(view, tensors[f"{name}.weight"], f"{matrix}({e})")
                scale = layer.companion("weight_scale", matrix, e)
                assert_bitwise_equal(scale, tensors[f"{name}.weight_scale"], f"{matrix} scale")
                global_scale = layer.companion("weight_scale_2", matrix, e)
                assert_bitwise_equal(global_scale, tensors[f"{name}.weight_scale_2"].view(1, 1), "")
            assert_bitwise_equal(
                layer.w2_scale(e), tensors[f"{prefix()}.{e}.down_proj.weight_scale"]
            )


@pytest.mark.parametrize(
    ("tp_rank", "tp", "experts"), [(0, 1, None), (1, 2, None), (3, 4, None), (0, 2, [3, 1, 3])]
)
def test_load_fused_moe_matches_hand_slices(checkpoint, tp_rank, tp, experts):
    local = list(range(E)) if experts is None else experts
    want = expected(stored(checkpoint), tp_rank, tp, local)
    assert_loads_as(checkpoint, prefix(), want, tp_rank=tp_rank, tp_size=tp, local_experts=experts)


def test_split_that_cuts_a_scale_group_names_the_sizes_that_fit(checkpoint):
    """I=64 at tp=8 gives 8 values a rank: half of a 16-value scale group."""
    shard = INTER // 8
    with fml.open(checkpoint) as ckpt, pytest.raises(fml.RequestError) as error:
        fml.load_fused_moe(
            ckpt,
            prefix(),
            torch.empty(E, 2 * shard, H // 2, dtype=torch.uint8),
            torch.empty(E, H, shard // 2, dtype=torch.uint8),
            tp_rank=0,
            tp_size=8,
        )
    message = str(error.value)
    assert "tp_size=8 gives each rank 8 of the intermediate size 64" in message
    assert "tp_size that fit: 1, 2, 4" in message


def test_detected_from_the_files_alone(tmp_path):
    """Without config.json, `weight_scale_2` beside uint8 weights says NVFP4 (and keeps
    them from being read as compressed-tensors fp8, whose names they share)."""
    path = nvfp4_modelopt(tmp_path / "ckpt", config=False)
    (path / "config.json").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with fml.open(path) as ckpt:
            layer = ckpt.experts(prefix())
    assert layer.pack == 2
    assert layer.quantization is not None
    assert str(layer.quantization).startswith("modelopt nvfp4, 16-value group scales")


def test_packed_weights_without_their_global_scale_are_not_loaded(tmp_path):
    """uint8 weights beside only `weight_scale`: no scheme the loader knows, so named."""
    path = nvfp4_modelopt(tmp_path / "ckpt", config=False)
    (path / "config.json").unlink()
    tensors = {k: v for k, v in stored(path).items() if not k.endswith("weight_scale_2")}
    save(path, tensors, "qwen3_moe", None)
    (path / "config.json").unlink()
    with fml.open(path) as ckpt, pytest.warns(fml.UnsupportedWarning):
        assert ckpt.moe_layers() == []
        groups = ckpt.unsupported_groups()
    assert [g.prefix for g in groups] == [prefix(0), prefix(1)]
    assert all(g.reason.startswith("unknown quantization:") for g in groups)


def test_inspect_names_the_scheme(checkpoint, capsys):
    main(["inspect", "--tp", "2", str(checkpoint)])
    out = capsys.readouterr().out
    assert "quantized   modelopt nvfp4, 16-value group scales in float8_e4m3fn" in out
    assert f"{prefix(1)}  per_expert" in out


def test_convert_refuses_to_fuse_and_keeps_per_expert(checkpoint, tmp_path):
    """transformers has no fused NVFP4 experts: fusing is refused before anything is written;
    to per_expert the groups are copied unchanged, scales included, and load the same."""
    from fastmoe_load.cli.convert import convert

    with pytest.raises(fml.RequestError, match="weight_scale, weight_scale_2 beside their weights"):
        convert(checkpoint, tmp_path / "fused", to="fused")
    assert not (tmp_path / "fused").exists()
    report = convert(checkpoint, tmp_path / "copy", to="per_expert")
    assert report.kept == [prefix(0), prefix(1)]
    original = stored(checkpoint)
    with fml.open(tmp_path / "copy") as copy:
        assert sorted(copy.keys()) == sorted(original)
        for name, tensor in original.items():
            assert_bitwise_equal(copy.tensor(name), tensor, name)
        assert copy.experts(prefix()).pack == 2


@pytest.mark.parametrize(("tp_rank", "tp", "experts"), [(1, 2, None), (0, 2, [3, 1, 3])])
def test_seed_path_matches_hand_slices(checkpoint, tp_rank, tp, experts):
    """The pure-Python vLLM loop of the bench fills the same parameters the same way."""
    local = list(range(E)) if experts is None else experts
    want = expected(stored(checkpoint), tp_rank, tp, local)
    got = seed_filled(checkpoint, prefix(), want, tp_rank, tp, local)
    for name, tensor in want.items():
        assert_bitwise_equal(got[name], tensor, name)
