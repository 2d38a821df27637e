"""int4 packed (compressed-tensors `pack-quantized`, W4A16 group 32, as Kimi-K2-Thinking
ships it): per expert `weight_packed` int32 `[out, in/8]` (eight int4 values along the input
dimension), `weight_scale` bfloat16 `[out, in/32]`, `weight_shape` int32 `[2]`; loaded into
the parameters vLLM's `CompressedTensorsWNA16MoEMethod` creates (`w13_weight_packed`,
`w13_weight_scale`, `w13_weight_shape`, ...) and compared bit for bit with slices taken by hand
(vLLM's own loader: test_vllm_real.py)."""

from __future__ import annotations

from pathlib import Path

import fastmoe_load as fml
import pytest
import torch
from conftest import assert_bitwise_equal, seed_filled
from fastmoe_load.cli import main
from safetensors.torch import load_file
from test_quant import save

E, H, INTER = 4, 128, 64
LAYERS = 2
GROUP = 32
MODULES = {"gate_proj": (INTER, H), "up_proj": (INTER, H), "down_proj": (H, INTER)}


def prefix(layer: int = 1) -> str:
    return f"model.layers.{layer}.mlp.experts"


def int4_pack_quantized(path: Path, symmetric: bool = True) -> Path:
    """Kimi-K2-Thinking's experts, scaled down, with a bf16 router beside them."""
    gen = torch.Generator().manual_seed(2)
    tensors = {}
    for layer in range(LAYERS):
        for e in range(E):
            for module, (rows, cols) in MODULES.items():
                name = f"{prefix(layer)}.{e}.{module}"
                tensors[f"{name}.weight_packed"] = torch.randint(
                    -(2**31), 2**31 - 1, (rows, cols // 8), dtype=torch.int32, generator=gen
                )
                tensors[f"{name}.weight_scale"] = torch.rand(
                    rows, cols // GROUP, generator=gen
                ).bfloat16()
                tensors[f"{name}.weight_shape"] = torch.tensor([rows, cols], dtype=torch.int32)
                if not symmetric:
                    tensors[f"{name}.weight_zero_point"] = torch.randint(
                        0, 2**31 - 1, (rows // 8, cols // GROUP), dtype=torch.int32
                    )
        tensors[f"model.layers.{layer}.mlp.gate.weight"] = torch.randn(E, H).bfloat16()
    weights = {
        "num_bits": 4,
        "type": "int",
        "symmetric": symmetric,
        "strategy": "group",
        "group_size": GROUP,
        "dynamic": False,
        "actorder": None,
    }
    quant = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
        "ignore": ["lm_head", "re:.*self_attn.*", "re:.*mlp.gate$"],
    }
    return save(path, tensors, "kimi_k2", quant)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return int4_pack_quantized(tmp_path_factory.mktemp("int4"))


def expected(path: Path, tp_rank: int, tp: int, experts: list[int]) -> dict[str, torch.Tensor]:
    """vLLM's WNA16 parameters sliced by hand, in the checkpoint's dtypes (vLLM's
    `w13_weight_shape` is float32: converted by the caller)."""
    tensors = load_file(path / "model.safetensors")
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

    return {
        "w13": w13("weight_packed"),
        "w2": torch.stack([t(e, "down_proj", "weight_packed")[:, cols(8)] for e in experts]),
        "w13_weight_scale": w13("weight_scale"),
        "w2_weight_scale": torch.stack(
            [t(e, "down_proj", "weight_scale")[:, cols(GROUP)] for e in experts]
        ),
        "w13_weight_shape": torch.stack([t(e, "up_proj", "weight_shape") for e in experts]),
        "w2_weight_shape": torch.stack([t(e, "down_proj", "weight_shape") for e in experts]),
    }


def test_detected_with_packing_and_companions(checkpoint):
    with fml.open(checkpoint) as ckpt:
        assert [x.prefix for x in ckpt.moe_layers()] == [prefix(0), prefix(1)]
        assert ckpt.unsupported_groups() == []
        layer = ckpt.experts(prefix())
        assert (layer.num_experts, layer.hidden_size, layer.intermediate_size) == (E, H, INTER)
        assert (layer.dtype, layer.pack) == (torch.int32, 8)
        assert str(layer.quantization) == (
            "compressed-tensors int4, 32-value group scales in bfloat16 "
            "(weight_scale, weight_shape)"
        )
        tensors = load_file(checkpoint / "model.safetensors")
        for e in (0, 3):
            for matrix, module in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                name = f"{prefix()}.{e}.{module}"
                assert_bitwise_equal(getattr(layer, matrix)(e), tensors[f"{name}.weight_packed"])
                assert_bitwise_equal(
                    getattr(layer, f"{matrix}_scale")(e), tensors[f"{name}.weight_scale"]
                )
                assert_bitwise_equal(
                    layer.companion("weight_shape", matrix, e),
                    tensors[f"{name}.weight_shape"].view(1, 2),
                )


@pytest.mark.parametrize(
    ("tp_rank", "tp", "experts"), [(0, 1, None), (1, 2, None), (0, 2, [3, 1, 3])]
)
def test_load_fused_moe_matches_hand_slices(checkpoint, tp_rank, tp, experts):
    local = list(range(E)) if experts is None else experts
    want = expected(checkpoint, tp_rank, tp, local)
    got = {}
    for name, tensor in want.items():
        got[name] = torch.empty_like(tensor)
        got[name].view(torch.uint8).fill_(0xA5)  # poison
    with fml.open(checkpoint) as ckpt:
        fml.load_fused_moe(
            ckpt,
            prefix(),
            got["w13"],
            got["w2"],
            tp_rank=tp_rank,
            tp_size=tp,
            local_experts=experts,
            scales={k: v for k, v in got.items() if k not in ("w13", "w2")},
        )
    for name, tensor in want.items():
        assert_bitwise_equal(got[name], tensor, name)


def test_split_that_cuts_a_scale_group_names_the_sizes_that_fit(checkpoint):
    """I=64 at tp=4 gives 16 values a rank: half of a 32-value scale group."""
    shard = INTER // 4
    with fml.open(checkpoint) as ckpt, pytest.raises(fml.RequestError) as error:
        fml.load_fused_moe(
            ckpt,
            prefix(),
            torch.empty(E, 2 * shard, H // 8, dtype=torch.int32),
            torch.empty(E, H, shard // 8, dtype=torch.int32),
            tp_size=4,
        )
    assert "tp_size that fit: 1, 2" in str(error.value)


def test_without_config_the_bits_are_unknown(tmp_path):
    """Packed int32 weights say nothing of their bits: without config.json they are named."""
    path = int4_pack_quantized(tmp_path / "ckpt")
    (path / "config.json").unlink()
    with fml.open(path) as ckpt, pytest.warns(fml.UnsupportedWarning):
        assert ckpt.moe_layers() == []
        groups = ckpt.unsupported_groups()
    assert [g.prefix for g in groups] == [prefix(0), prefix(1)]
    assert groups[0].reason.startswith("unknown quantization:")
    assert "weight_packed" in groups[0].reason


def test_convert_refuses_to_fuse(checkpoint, tmp_path):
    from fastmoe_load.convert import convert

    with pytest.raises(fml.RequestError, match="weight_scale, weight_shape scales"):
        convert(checkpoint, tmp_path / "fused", to="fused")
    assert not (tmp_path / "fused").exists()


def test_inspect_names_the_scheme(checkpoint, capsys):
    main(["inspect", str(checkpoint)])
    assert "quantized   compressed-tensors int4, 32-value group" in capsys.readouterr().out


@pytest.mark.parametrize(("tp_rank", "tp", "experts"), [(1, 2, None), (0, 2, [3, 1, 3])])
def test_seed_path_matches_hand_slices(checkpoint, tp_rank, tp, experts):
    """The pure-Python vLLM loop of the bench fills the same parameters the same way."""
    local = list(range(E)) if experts is None else experts
    want = expected(checkpoint, tp_rank, tp, local)
    got = seed_filled(checkpoint, prefix(), want, tp_rank, tp, local)
    for name, tensor in want.items():
        assert_bitwise_equal(got[name], tensor, name)


@pytest.mark.parametrize("scheme", ["nvfp4", "int4"])
def test_quant_bench_rows(tmp_path, capsys, scheme):
    """`bench --quant nvfp4|int4` on a tiny checkpoint: fastmoe_load and the seed path per
    case, beside the bf16 rows; sizes off the scale groups are refused in one line."""
    root = tmp_path / "quant"
    options = ["--quant", scheme, "--experts", "8", "--hidden", "256", "--intermediate", "256"]
    options += ["--layers", "1", "--repeats", "1", "--dir", str(root), "--clean"]
    assert main(["bench", *options]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint: {root / scheme} (1 layer(s) of 8 experts, " in out
    for case in ("TP=1", "TP=2 rank 1", "EP=8 rank 1"):
        for path in (f"fastmoe_load {scheme} + scales", f"seed: vLLM per-expert loop, {scheme}"):
            assert any(line.startswith(path) and case in line for line in out.splitlines())
    assert not root.exists()
    assert main(["bench", *options[:-3], "--hidden", "200", "--dir", str(root)]) == 1
    assert "must be multiples of" in capsys.readouterr().err
