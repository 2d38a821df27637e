"""int4 packed (compressed-tensors `pack-quantized`, W4A16 group 32, as Kimi-K2-Thinking
ships it): per expert `weight_packed` int32 `[out, in/8]` (eight int4 values along the input
dimension), `weight_scale` bfloat16 `[out, in/32]`, `weight_shape` int32 `[2]`; loaded into
the parameters vLLM's `CompressedTensorsWNA16MoEMethod` creates (`w13_weight_packed`,
`w13_weight_scale`, `w13_weight_shape`, ...) and compared bit for bit with slices taken by hand
(vLLM's own loader: test_vllm_real.py). Asymmetric weights (llm-compressor's `W4A16_ASYM`,
`symmetric: false`) carry `weight_zero_point` int32 `[out/8, in/group]` beside them: eight
4-bit zero points of consecutive rows in each int32 (`pack_to_int32(..., packed_dim=0)`),
vLLM's `w13_weight_zero_point [E, 2I/tp/8, H/group]`, `w2_weight_zero_point [E, H/8,
I/tp/group]`."""

from __future__ import annotations

from pathlib import Path

import fastmoe_load as fml
import pytest
import torch
from conftest import assert_bitwise_equal, assert_loads_as, group_error, seed_filled
from fastmoe_load.cli import main
from safetensors.torch import load_file, save_file
from test_quant import save

E, H, INTER = 4, 128, 64
LAYERS = 2
GROUP = 32
MODULES = {"gate_proj": (INTER, H), "up_proj": (INTER, H), "down_proj": (H, INTER)}


def prefix(layer: int = 1) -> str:
    return f"model.layers.{layer}.mlp.experts"


def int32(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int32, generator=gen)


def int4_pack_quantized(
    path: Path,
    symmetric: bool = True,
    group: int = GROUP,
    zero_points: bool | None = None,
    shape_dtype: torch.dtype = torch.int32,
) -> Path:
    """Kimi-K2-Thinking's experts, scaled down, with a bf16 router beside them; asymmetric
    (`symmetric=False`) with zero points beside each weight unless `zero_points` says
    otherwise."""
    gen = torch.Generator().manual_seed(2)
    zero_points = not symmetric if zero_points is None else zero_points
    tensors = {}
    for layer in range(LAYERS):
        for e in range(E):
            for module, (rows, cols) in MODULES.items():
                name = f"{prefix(layer)}.{e}.{module}"
                tensors[f"{name}.weight_packed"] = int32(rows, cols // 8, gen=gen)
                tensors[f"{name}.weight_scale"] = torch.rand(
                    rows, cols // group, generator=gen
                ).bfloat16()
                tensors[f"{name}.weight_shape"] = torch.tensor([rows, cols], dtype=shape_dtype)
                if zero_points:
                    tensors[f"{name}.weight_zero_point"] = int32(rows // 8, cols // group, gen=gen)
        tensors[f"model.layers.{layer}.mlp.gate.weight"] = torch.randn(E, H).bfloat16()
    weights = {
        "num_bits": 4,
        "type": "int",
        "symmetric": symmetric,
        "strategy": "group",
        "group_size": group,
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


@pytest.fixture(scope="module")
def asymmetric(tmp_path_factory) -> Path:
    return int4_pack_quantized(tmp_path_factory.mktemp("int4-asymmetric"), symmetric=False)


def expected(path: Path, tp_rank: int, tp: int, experts: list[int]) -> dict[str, torch.Tensor]:
    """vLLM's WNA16 parameters sliced by hand, in the checkpoint's dtypes (vLLM's
    `w13_weight_shape` is float32: converted by the caller), with the zero points where the
    checkpoint has them (rows of gate and up in packs of 8, down's columns by group)."""
    tensors = load_file(path / "model.safetensors")
    shard = INTER // tp
    rows = slice(tp_rank * shard, (tp_rank + 1) * shard)

    def cols(per: int) -> slice:
        return slice(tp_rank * shard // per, (tp_rank + 1) * shard // per)

    def t(e: int, module: str, kind: str) -> torch.Tensor:
        return tensors[f"{prefix()}.{e}.{module}.{kind}"]

    def w13(kind: str, rows: slice = rows) -> torch.Tensor:
        return torch.stack(
            [
                torch.cat([t(e, "gate_proj", kind)[rows], t(e, "up_proj", kind)[rows]])
                for e in experts
            ]
        )

    zero_points = {}
    if f"{prefix()}.0.gate_proj.weight_zero_point" in tensors:
        packs = slice(rows.start // 8, rows.stop // 8)
        zero_points = {
            "w13_weight_zero_point": w13("weight_zero_point", packs),
            "w2_weight_zero_point": torch.stack(
                [t(e, "down_proj", "weight_zero_point")[:, cols(GROUP)] for e in experts]
            ),
        }
    return zero_points | {
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


@pytest.mark.parametrize("files", ["checkpoint", "asymmetric"])
@pytest.mark.parametrize(
    ("tp_rank", "tp", "experts"), [(0, 1, None), (1, 2, None), (0, 2, [3, 1, 3]), (0, 1, [2, 3])]
)
def test_load_fused_moe_matches_hand_slices(request, files, tp_rank, tp, experts):
    checkpoint = request.getfixturevalue(files)
    local = list(range(E)) if experts is None else experts
    want = expected(checkpoint, tp_rank, tp, local)
    assert_loads_as(checkpoint, prefix(), want, tp_rank=tp_rank, tp_size=tp, local_experts=experts)


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


def test_asymmetric_zero_points_detected_with_views(asymmetric):
    with fml.open(asymmetric) as ckpt:
        assert ckpt.unsupported_groups() == []
        layer = ckpt.experts(prefix())
        assert (layer.dtype, layer.pack) == (torch.int32, 8)
        assert str(layer.quantization) == (
            "compressed-tensors int4, 32-value group scales in bfloat16 "
            "(weight_scale, weight_shape, weight_zero_point)"
        )
        zero_point = layer.quantization.companion("weight_zero_point")
        assert (zero_point.scheme, zero_point.block, zero_point.dtype) == (
            "block",
            (8, GROUP),
            torch.int32,
        )
        tensors = load_file(asymmetric / "model.safetensors")
        for e in (0, 3):
            for matrix, module in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                rows, cols = MODULES[module]
                view = layer.companion("weight_zero_point", matrix, e)
                assert tuple(view.shape) == (rows // 8, cols // GROUP)
                stored = tensors[f"{prefix()}.{e}.{module}.weight_zero_point"]
                assert_bitwise_equal(view, stored)


def test_split_that_cuts_a_zero_point_pack_names_the_sizes_that_fit(tmp_path):
    """With 4-value groups, I=64 at tp=16 gives 4 rows a rank: half of an int32 of eight
    packed zero points (and of a `weight_packed` int32 of down)."""
    path = int4_pack_quantized(tmp_path / "ckpt", symmetric=False, group=4)
    shard = INTER // 16
    poisoned = torch.full((E, 2 * shard, H // 8), 0x5A5A5A5A, dtype=torch.int32)
    with fml.open(path) as ckpt, pytest.raises(fml.RequestError) as error:
        fml.load_fused_moe(
            ckpt,
            prefix(),
            poisoned,
            torch.empty(E, H, 1, dtype=torch.int32),
            tp_size=16,
            tp_rank=1,
        )
    message = str(error.value)
    assert f"tp_size=16 gives each rank {shard} of the intermediate size {INTER}" in message
    zero_point = f"`{prefix()}.0.gate_proj.weight_zero_point`"
    assert f"8-value blocks (scales or packs) of {zero_point}" in message
    assert message.endswith("tp_size that fit: 1, 2, 4, 8")
    assert (poisoned == 0x5A5A5A5A).all()


@pytest.mark.parametrize(
    ("symmetric", "zero_points", "error"),
    [
        (False, False, "declares asymmetric integer weights .* no `weight_zero_point` beside"),
        (True, True, "weight_zero_point` holds zero points, but config.json declares symmetric"),
    ],
)
def test_zero_points_must_match_the_config(tmp_path, symmetric, zero_points, error):
    path = int4_pack_quantized(tmp_path / "ckpt", symmetric=symmetric, zero_points=zero_points)
    with fml.open(path) as ckpt, pytest.raises(fml.LayoutError, match=error):
        ckpt.experts(prefix())


def test_zero_points_of_another_shape_are_named(tmp_path):
    """Zero points unpacked (one int32 a row) do not fit the packed grid: said with the shape
    they should have."""
    path = int4_pack_quantized(tmp_path / "ckpt", symmetric=False)
    tensors = load_file(path / "model.safetensors")
    name = f"{prefix(0)}.2.up_proj.weight_zero_point"
    tensors[name] = torch.zeros(INTER, H // GROUP, dtype=torch.int32)
    save_file(tensors, path / "model.safetensors")
    with fml.open(path) as ckpt, pytest.raises(fml.LayoutError) as error:
        ckpt.experts(prefix(0))
    assert f"`{name}` is I32 [{INTER}, {H // GROUP}]; the zero points of a [{INTER}, {H}]" in str(
        error.value
    )
    assert f"I32 [{INTER // 8}, {H // GROUP}] (8 rows packed in each int32" in str(error.value)


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


def test_convert_refuses_to_fuse(checkpoint, asymmetric, tmp_path):
    from fastmoe_load.cli.convert import convert

    with pytest.raises(fml.RequestError, match="weight_scale, weight_shape beside their weights"):
        convert(checkpoint, tmp_path / "fused", to="fused")
    assert not (tmp_path / "fused").exists()
    with pytest.raises(
        fml.RequestError, match="weight_shape, weight_zero_point beside their weights"
    ):
        convert(asymmetric, tmp_path / "fused", to="fused")
    assert not (tmp_path / "fused").exists()


def test_convert_per_expert_carries_zero_points(asymmetric, tmp_path):
    """Rewritten per expert, every tensor comes back as stored, zero points included."""
    from fastmoe_load.cli.convert import convert

    convert(asymmetric, tmp_path / "out", to="per_expert")
    before = load_file(asymmetric / "model.safetensors")
    with fml.open(tmp_path / "out") as ckpt:
        assert sorted(ckpt.keys()) == sorted(before)
        for name, tensor in before.items():
            assert_bitwise_equal(ckpt.tensor(name), tensor, name)
        zero_point = ckpt.experts(prefix()).quantization.companion("weight_zero_point")
        assert zero_point is not None


def test_inspect_names_the_scheme(checkpoint, asymmetric, capsys):
    main(["inspect", str(checkpoint)])
    assert "quantized   compressed-tensors int4, 32-value group" in capsys.readouterr().out
    main(["inspect", str(asymmetric)])
    assert "(weight_scale, weight_shape, weight_zero_point)" in capsys.readouterr().out


@pytest.mark.parametrize("files", ["checkpoint", "asymmetric"])
@pytest.mark.parametrize(("tp_rank", "tp", "experts"), [(1, 2, None), (0, 2, [3, 1, 3])])
def test_seed_path_matches_hand_slices(request, files, tp_rank, tp, experts):
    """The pure-Python vLLM loop of the bench fills the same parameters the same way."""
    checkpoint = request.getfixturevalue(files)
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
    assert f"checkpoint: {root / scheme} (1 layer of 8 experts, " in out
    for case in ("TP=1", "TP=2 rank 1", "EP=8 rank 1"):
        for path in (f"fastmoe_load {scheme} + scales", f"seed: vLLM per-expert loop, {scheme}"):
            assert any(line.startswith(path) and case in line for line in out.splitlines())
    assert not root.exists()
    assert main(["bench", *options[:-3], "--hidden", "200", "--dir", str(root)]) == 1
    assert "must be multiples of" in capsys.readouterr().err


def test_int64_weight_shape_loads(tmp_path):
    """compressed-tensors writes `weight_shape` as `torch.tensor(weight.shape)`, int64: it
    loads as the int32 form does, into int64 or (cast) vLLM's float32 destinations."""
    path = int4_pack_quantized(tmp_path / "ckpt", shape_dtype=torch.int64)
    want = expected(path, 1, 2, [3, 1])
    assert want["w13_weight_shape"].dtype == torch.int64
    assert_loads_as(path, prefix(), want, tp_rank=1, tp_size=2, local_experts=[3, 1])
    as_vllm = {k: v.float() if k.endswith("weight_shape") else v for k, v in want.items()}
    assert_loads_as(
        path, prefix(), as_vllm, tp_rank=1, tp_size=2, local_experts=[3, 1], allow_cast=True
    )


def test_a_weight_shape_that_contradicts_its_weight_is_named(tmp_path):
    """`weight_shape` says how many values a packed weight holds; one that disagrees with
    the stored weight is a `LayoutError` naming it, at detection, before any load."""
    path = int4_pack_quantized(tmp_path / "ckpt")
    tensors = load_file(path / "model.safetensors")
    name = f"{prefix()}.2.up_proj.weight_shape"
    tensors[name] = torch.tensor([INTER, 2 * H], dtype=torch.int32)
    save_file(tensors, path / "model.safetensors")
    with fml.open(path) as ckpt:
        message = group_error(ckpt)
    assert f"`{name}` records the weight as [{INTER}, {2 * H}]" in message
    assert f"holds [{INTER}, {H}] values" in message
