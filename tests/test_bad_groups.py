"""One expert group that cannot be loaded never blocks the rest of a checkpoint: it is listed
by `unsupported_groups()` and `inspect` with its reason, raises `LayoutError` when used, and
every other group and every dense weight loads. And one file of a sharded checkpoint, opened
alone, never passes for the whole of a group that continues in other files."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import fastmoe_load as fml
import pytest
import torch
from conftest import assert_bitwise_equal, poisoned
from fastmoe_load.cli import main
from safetensors.torch import save_file

E, H = 4, 256
GOOD, BAD = "model.layers.0.mlp.experts", "model.layers.1.mlp.experts"
DENSE = "model.layers.1.self_attn.q_proj.weight"


def fp8(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(torch.float8_e4m3fn)


def good_group(gen: torch.Generator, inter: int = 128) -> dict[str, torch.Tensor]:
    return {
        f"{GOOD}.gate_up_proj": torch.randn(E, 2 * inter, H, generator=gen).bfloat16(),
        f"{GOOD}.down_proj": torch.randn(E, H, inter, generator=gen).bfloat16(),
    }


def save(path: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(config))
    return path


def transformers_fused_fp8(path: Path, inter: int = 192) -> Path:
    """transformers v5's own fused fp8 save where I is no multiple of the 128 block: its
    `gate_up_proj_scale_inv` grid blocks the concatenated `[2I, H]` matrix as a whole,
    `[E, ceil(2I/128), ceil(H/128)]`, so that a block straddles gate and up."""
    gen = torch.Generator().manual_seed(0)
    tensors = good_group(gen)
    tensors |= {
        f"{BAD}.gate_up_proj": fp8(E, 2 * inter, H, gen=gen),
        f"{BAD}.gate_up_proj_scale_inv": torch.rand(
            E, math.ceil(2 * inter / 128), H // 128, generator=gen
        ),
        f"{BAD}.down_proj": fp8(E, H, inter, gen=gen),
        f"{BAD}.down_proj_scale_inv": torch.rand(
            E, H // 128, math.ceil(inter / 128), generator=gen
        ),
        DENSE: torch.randn(H, H, generator=gen).bfloat16(),
    }
    quant = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    return save(path, tensors, {"model_type": "qwen3_moe", "quantization_config": quant})


def granite_fp8_dynamic(path: Path, inter: int = 128) -> Path:
    """GraniteMoe's pre-v5 fused names with compressed-tensors FP8_DYNAMIC per-channel
    scales (`block_sparse_moe.input_linear.weight_scale [E, 2I, 1]`,
    `output_linear.weight_scale [E, H, 1]`), beside a bfloat16 fused group."""
    gen = torch.Generator().manual_seed(1)
    moe = "model.layers.1.block_sparse_moe"
    tensors = good_group(gen)
    tensors |= {
        f"{moe}.input_linear.weight": fp8(E, 2 * inter, H, gen=gen),
        f"{moe}.input_linear.weight_scale": torch.rand(E, 2 * inter, 1, generator=gen),
        f"{moe}.output_linear.weight": fp8(E, H, inter, gen=gen),
        f"{moe}.output_linear.weight_scale": torch.rand(E, H, 1, generator=gen),
        DENSE: torch.randn(H, H, generator=gen).bfloat16(),
    }
    scheme = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}
    quant = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": scheme}},
    }
    return save(path, tensors, {"model_type": "granitemoe", "quantization_config": quant})


@pytest.mark.parametrize("make", [transformers_fused_fp8, granite_fp8_dynamic])
def test_a_group_that_cannot_be_loaded_leaves_the_rest_loadable(tmp_path, make, capsys):
    path = make(tmp_path / "ckpt")
    with fml.open(path) as ckpt:
        with pytest.warns(fml.UnsupportedWarning, match="experts that cannot be loaded"):
            layers = ckpt.moe_layers()
        assert [layer.prefix for layer in layers] == [GOOD]
        (bad,) = ckpt.unsupported_groups()
        assert bad.prefix.startswith("model.layers.1.") and bad.reason
        assert all(name.startswith(bad.prefix + ".") for name in bad.tensor_names)
        with pytest.raises(fml.LayoutError, match="cannot be loaded"):
            ckpt.experts(bad.prefix)
        assert ckpt.tensor(DENSE).shape == (H, H)
        group = ckpt.experts(GOOD)
        w13 = poisoned((E, 2 * group.intermediate_size, H))
        w2 = poisoned((E, H, group.intermediate_size))
        fml.load_fused_moe(ckpt, GOOD, w13, w2)
        assert_bitwise_equal(w13, ckpt.tensor(f"{GOOD}.gate_up_proj"), "w13")
        assert_bitwise_equal(w2, ckpt.tensor(f"{GOOD}.down_proj"), "w2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fml.UnsupportedWarning)
        assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert GOOD in out and bad.prefix in out and bad.reason[:40] in out


def sharded(path: Path) -> Path:
    """A per-expert checkpoint in two files whose index places experts 0-1 of layer 0 in
    the first and experts 2-3 in the second (as a size-capped save splits a layer)."""
    gen = torch.Generator().manual_seed(2)
    inter = 64
    files: list[dict[str, torch.Tensor]] = [{}, {}]
    for e in range(E):
        for module, shape in (("gate_proj", (inter, H)), ("up_proj", (inter, H))):
            files[e // 2][f"{GOOD}.{e}.{module}.weight"] = torch.randn(*shape, generator=gen)
        files[e // 2][f"{GOOD}.{e}.down_proj.weight"] = torch.randn(H, inter, generator=gen)
    files[1][DENSE] = torch.randn(H, H, generator=gen)
    path.mkdir()
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {}
    for name, tensors in zip(names, files, strict=True):
        save_file(tensors, path / name)
        weight_map |= dict.fromkeys(tensors, name)
    index = {"metadata": {}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


def test_one_file_of_a_sharded_checkpoint_says_to_open_the_directory(tmp_path):
    path = sharded(tmp_path / "ckpt")
    with fml.open(path) as whole:
        assert whole.experts(GOOD).num_experts == E
    with fml.open(path / "model-00001-of-00002.safetensors") as one:
        with pytest.warns(fml.UnsupportedWarning):
            assert one.moe_layers() == []
        (group,) = one.unsupported_groups()
        assert group.prefix == GOOD
        assert "model-00002-of-00002.safetensors" in group.reason
        with pytest.raises(fml.LayoutError, match=f"open the directory {path}, not one"):
            one.experts(GOOD)


def longcat(path: Path) -> Path:
    """LongCat-Flash's layer: two ordinary dense MLPs, `mlps.0` and `mlps.1` (gate, up and
    down projections each), beside its routed experts under `mlp.experts`."""
    gen = torch.Generator().manual_seed(3)
    inter = 64
    tensors = {}
    for module in ("mlps.0", "mlps.1"):
        for proj, shape in (
            ("gate_proj", (inter, H)),
            ("up_proj", (inter, H)),
            ("down_proj", (H, inter)),
        ):
            tensors[f"model.layers.0.{module}.{proj}.weight"] = torch.randn(*shape, generator=gen)
    for e in range(E):
        for proj, shape in (
            ("gate_proj", (inter, H)),
            ("up_proj", (inter, H)),
            ("down_proj", (H, inter)),
        ):
            tensors[f"{GOOD}.{e}.{proj}.weight"] = torch.randn(*shape, generator=gen)
    return save(path, tensors, {"model_type": "longcat_flash"})


def test_numbered_dense_mlps_are_not_an_expert_group(tmp_path, capsys):
    """Two numbered siblings are not an expert group: LongCat-Flash's `mlps.0`/`mlps.1` stay
    dense weights (not listed, not fused by convert), its experts are the one group."""
    from fastmoe_load.cli.convert import convert

    path = longcat(tmp_path / "longcat")
    with fml.open(path) as ckpt:
        assert [layer.prefix for layer in ckpt.moe_layers()] == [GOOD]
        assert ckpt.unsupported_groups() == []
    assert main(["inspect", str(path)]) == 0
    assert "layers.0.mlps" not in capsys.readouterr().out
    convert(path, tmp_path / "fused", to="fused", progress=False)
    with fml.open(tmp_path / "fused") as fused:
        names = set(fused.keys())
        assert "model.layers.0.mlps.0.gate_proj.weight" in names
        assert not any("mlps.gate_up_proj" in n for n in names)
        assert [layer.prefix for layer in fused.moe_layers()] == [GOOD]
