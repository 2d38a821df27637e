"""Zero-copy views: `keys()`, `tensor()`, expert views, their lifetime after close, and what
writing into them does (and must not do)."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import fastmoe_load as fml
import pytest
import torch
from conftest import assert_bitwise_equal, poisoned
from safetensors import safe_open
from safetensors.torch import load_file, save_file

P = "model.layers.0.mlp.experts"
E, H, INTER = 4, 12, 8
GATE_UP, DOWN = f"{P}.gate_up_proj", f"{P}.down_proj"

DTYPES = [
    torch.bfloat16,
    torch.float16,
    torch.float32,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]
SHAPES = [(), (0,), (3, 0, 2), (1,), (7,), (3, 5), (2, 3, 4)]


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g, dtype=torch.float32) * 3).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)


def fused_experts(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        GATE_UP: torch.randn(E, 2 * INTER, H, generator=g).bfloat16(),
        DOWN: torch.randn(E, H, INTER, generator=g).bfloat16(),
    }


@pytest.fixture
def fused(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = fused_experts()
    path = tmp_path / "model.safetensors"
    save_file(tensors, path)
    return path, tensors


# --- tensor() and keys() ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tensor_equals_safetensors(tmp_path, dtype):
    g = torch.Generator().manual_seed(1)
    tensors = {
        f"t.{i}": random_tensor(shape, dtype, g) for i, shape in enumerate(SHAPES)
    }  # includes a scalar and two 0-element tensors
    path = tmp_path / "model.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    expected = load_file(path)
    with fml.open(path) as ckpt:
        with safe_open(path, "pt") as reference:
            assert sorted(ckpt.keys()) == sorted(reference.keys())
        assert len(set(ckpt.keys())) == len(ckpt.keys())
        for name, want in expected.items():
            got = ckpt.tensor(name)
            assert got.dtype == dtype
            assert_bitwise_equal(got, want, name)
            assert_bitwise_equal(got, tensors[name], name)


def test_keys_of_directory_are_every_shard(tmp_path):
    a = {"model.embed.weight": torch.randn(4, 3), "model.norm.weight": torch.randn(3)}
    b = {"lm_head.weight": torch.randn(5, 3).half()}
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    with fml.open(tmp_path) as ckpt:
        assert sorted(ckpt.keys()) == sorted({**a, **b})
        assert ckpt.shard_paths == [
            str(tmp_path / "a.safetensors"),
            str(tmp_path / "b.safetensors"),
        ]
        for name, want in {**a, **b}.items():
            assert_bitwise_equal(ckpt.tensor(name), want, name)


def test_directory_without_index_finds_split_experts(tmp_path):
    """A fused group whose gate_up and down lie in different shards, found without an index."""
    tensors = fused_experts()
    save_file({GATE_UP: tensors[GATE_UP]}, tmp_path / "part-a.safetensors")
    save_file({DOWN: tensors[DOWN]}, tmp_path / "part-b.safetensors")
    with fml.open(tmp_path) as ckpt:
        (layer,) = ckpt.moe_layers()
        assert (layer.prefix, layer.format) == (P, "fused")
        for e in range(E):
            assert_bitwise_equal(layer.w2(e), tensors[DOWN][e])


def test_contains(fused):
    path, tensors = fused
    with fml.open(path) as ckpt:
        for name in tensors:
            assert name in ckpt
        assert f"{P}.up_proj" not in ckpt
        assert "" not in ckpt
        assert 3 not in ckpt
        assert None not in ckpt


def test_missing_tensor_raises(fused):
    path, _ = fused
    with (
        fml.open(path) as ckpt,
        pytest.raises(fml.TensorNotFoundError, match="up_proj") as info,
    ):
        ckpt.tensor(f"{P}.up_proj")
    assert str(path) in str(info.value)
    assert isinstance(info.value, fml.FastMoeLoadError)


# --- lifetime --------------------------------------------------------------------------------


def test_views_survive_close(fused):
    path, tensors = fused
    ckpt = fml.open(path)
    gate_up = ckpt.tensor(GATE_UP)
    layer = ckpt.experts(P)
    w1, w3, w2 = layer.w1(1), layer.w3(1), layer.w2(1)
    ckpt.close()
    assert ckpt.closed
    assert_bitwise_equal(gate_up, tensors[GATE_UP])
    assert_bitwise_equal(w1, tensors[GATE_UP][1, :INTER])
    assert_bitwise_equal(w3, tensors[GATE_UP][1, INTER:])
    assert_bitwise_equal(w2, tensors[DOWN][1])
    with pytest.raises(fml.CheckpointError, match="closed"):
        ckpt.tensor(GATE_UP)


def test_views_survive_del_and_gc(fused):
    path, tensors = fused
    ckpt = fml.open(path)
    down = ckpt.tensor(DOWN)
    w1 = ckpt.experts(P).w1(3)
    del ckpt
    gc.collect()
    assert_bitwise_equal(down, tensors[DOWN])
    assert_bitwise_equal(w1, tensors[GATE_UP][3, :INTER])
    assert_bitwise_equal(down.clone(), tensors[DOWN])


def test_close_is_idempotent_and_context_manager_closes(fused):
    path, _ = fused
    with fml.open(path) as ckpt:
        assert not ckpt.closed
        assert "closed" not in repr(ckpt)
    assert ckpt.closed
    assert "closed" in repr(ckpt)
    ckpt.close()
    assert ckpt.closed


def test_context_manager_closes_on_error(fused):
    path, _ = fused
    with pytest.raises(KeyError), fml.open(path) as ckpt:
        raise KeyError("boom")
    assert ckpt.closed


# --- writing into views ----------------------------------------------------------------------


def test_writing_into_view_leaves_file_unchanged(fused):
    path, tensors = fused
    before = path.read_bytes()
    with fml.open(path) as ckpt:
        view = ckpt.tensor(GATE_UP)
        view.fill_(0)
        ckpt.experts(P).w2(0).fill_(1)
        assert bool((view == 0).all())
    assert path.read_bytes() == before
    assert_bitwise_equal(load_file(path)[GATE_UP], tensors[GATE_UP])
    with fml.open(path) as again:
        assert_bitwise_equal(again.tensor(GATE_UP), tensors[GATE_UP])
        assert_bitwise_equal(again.tensor(DOWN), tensors[DOWN])


@pytest.mark.parametrize("io", ["mmap", "pread"])
def test_writing_into_view_does_not_change_later_loads(tmp_path, io):
    # Rows of 64 KiB, so that io="pread" reads w13's runs with pread.
    experts, hidden, inter = 2, 32768, 4
    g = torch.Generator().manual_seed(2)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=g).bfloat16()
    down = torch.randn(experts, hidden, inter, generator=g).bfloat16()
    save_file({GATE_UP: gate_up, DOWN: down}, tmp_path / "model.safetensors")
    with fml.open(tmp_path / "model.safetensors", io=io) as ckpt:
        ckpt.tensor(GATE_UP).fill_(0)
        ckpt.tensor(DOWN).fill_(0)
        half = inter // 2
        w13, w2 = poisoned((experts, inter, hidden)), poisoned((experts, hidden, half))
        fml.load_fused_moe(ckpt, P, w13, w2, tp_rank=1, tp_size=2)
        gate, up = gate_up[:, half:inter], gate_up[:, inter + half :]
        assert_bitwise_equal(w13, torch.cat([gate, up], dim=1), "w13 after a write into a view")
        assert_bitwise_equal(w2, down[:, :, half:], "w2 after a write into a view")


def test_views_of_one_checkpoint_share_its_copy_on_write_pages(fused):
    """As with safetensors' safe_open: views of one open checkpoint share one private mapping,
    so a write shows in later views of that checkpoint, never in the file or another open."""
    path, tensors = fused
    with fml.open(path) as ckpt:
        ckpt.tensor(DOWN).fill_(0)
        assert not ckpt.tensor(DOWN).any()
        with fml.open(path) as other:
            assert_bitwise_equal(other.tensor(DOWN), tensors[DOWN], "a second open")


# --- config ----------------------------------------------------------------------------------


def test_config_and_model_type(fused):
    path, _ = fused
    config = {"model_type": "qwen3_moe", "hidden_size": H, "num_experts": E}
    (path.parent / "config.json").write_text(json.dumps(config))
    with fml.open(path) as ckpt:
        assert ckpt.config == config
        assert ckpt.model_type == "qwen3_moe"
    with fml.open(path.parent) as ckpt:
        assert ckpt.config == config
        assert ckpt.model_type == "qwen3_moe"


def test_model_type_under_text_config(fused):
    path, _ = fused
    (path.parent / "config.json").write_text(
        json.dumps({"architectures": ["X"], "text_config": {"model_type": "llama4_text"}})
    )
    with fml.open(path) as ckpt:
        assert ckpt.model_type == "llama4_text"


def test_no_config(fused):
    path, _ = fused
    with fml.open(path) as ckpt:
        assert ckpt.config is None
        assert ckpt.model_type is None


# --- open ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [str, Path])
def test_open_accepts_str_and_path(fused, kind):
    path, tensors = fused
    with fml.open(kind(path)) as ckpt:
        assert ckpt.path == str(path)
        assert ckpt.shard_paths == [str(path)]
        assert_bitwise_equal(ckpt.tensor(DOWN), tensors[DOWN])
    with fml.open(kind(path.parent)) as ckpt:
        assert ckpt.path == str(path.parent)
        assert sorted(ckpt.keys()) == sorted(tensors)


# --- expert groups and expert views ----------------------------------------------------------


def test_no_experts_gives_no_layers(tmp_path):
    dense = {
        "model.embed_tokens.weight": torch.randn(16, H),
        # a dense fused MLP (Phi-3) and shared experts are not routed experts
        "model.layers.0.mlp.gate_up_proj.weight": torch.randn(2 * INTER, H),
        "model.layers.0.mlp.down_proj.weight": torch.randn(H, INTER),
        "model.layers.1.mlp.shared_experts.0.gate_proj.weight": torch.randn(INTER, H),
        "model.layers.1.mlp.shared_experts.0.up_proj.weight": torch.randn(INTER, H),
        "model.layers.1.mlp.shared_experts.0.down_proj.weight": torch.randn(H, INTER),
    }
    save_file(dense, tmp_path / "model.safetensors")
    with fml.open(tmp_path / "model.safetensors") as ckpt:
        assert ckpt.moe_layers() == []
        with pytest.raises(fml.TensorNotFoundError):
            ckpt.experts("model.layers.0.mlp")


def test_experts_is_the_listed_object(fused):
    path, _ = fused
    with fml.open(path) as ckpt:
        (layer,) = ckpt.moe_layers()
        assert ckpt.experts(P) is layer
        assert ckpt.moe_layers()[0] is layer
    with fml.open(path) as ckpt:
        first = ckpt.experts(P)  # before moe_layers()
        assert ckpt.moe_layers()[0] is first


def test_layer_description(fused):
    path, _ = fused
    with fml.open(path) as ckpt:
        layer = ckpt.experts(P)
        assert (layer.prefix, layer.format) == (P, "fused")
        assert (layer.num_experts, layer.hidden_size, layer.intermediate_size) == (E, H, INTER)
        assert layer.dtype == torch.bfloat16
        assert not layer.has_bias and not layer.transposed and not layer.interleaved
        assert set(layer.tensor_names) == {GATE_UP, DOWN}


def test_expert_views_are_zero_copy(fused):
    path, tensors = fused
    with fml.open(path) as ckpt:
        layer = ckpt.experts(P)
        for name, views in ((GATE_UP, (layer.w1, layer.w3)), (DOWN, (layer.w2,))):
            whole = ckpt.tensor(name)
            lo, hi = whole.data_ptr(), whole.data_ptr() + whole.nbytes
            for view_of in views:
                for e in range(E):
                    view = view_of(e)
                    assert lo <= view.untyped_storage().data_ptr() < hi, (name, e)
                    assert lo <= view.data_ptr() < hi, (name, e)
                    assert view.data_ptr() + view.nbytes <= hi, (name, e)
        assert layer.w1(2).shape == layer.w3(2).shape == (INTER, H)
        assert layer.w2(2).shape == (H, INTER)
        for e in range(E):
            assert_bitwise_equal(layer.w1(e), tensors[GATE_UP][e, :INTER])
            assert_bitwise_equal(layer.w3(e), tensors[GATE_UP][e, INTER:])
            assert_bitwise_equal(layer.w2(e), tensors[DOWN][e])


def test_interleaved_override(fused):
    path, tensors = fused
    gate_up = tensors[GATE_UP]
    with fml.open(path, interleaved=True) as ckpt:
        layer = ckpt.experts(P)
        assert layer.format == "fused_interleaved"
        assert layer.interleaved
        whole = ckpt.tensor(GATE_UP)
        for e in range(E):
            w1, w3 = layer.w1(e), layer.w3(e)
            assert_bitwise_equal(w1, gate_up[e, 0::2], f"w1({e})")
            assert_bitwise_equal(w3, gate_up[e, 1::2], f"w3({e})")
            assert whole.data_ptr() <= w1.data_ptr() < whole.data_ptr() + whole.nbytes
        w13, w2 = poisoned((2, INTER, H)), poisoned((2, H, INTER // 2))
        fml.load_fused_moe(ckpt, P, w13, w2, tp_rank=1, tp_size=2, local_experts=[3, 0])
        half = INTER // 2
        gate, up = gate_up[[3, 0], 0::2][:, half:], gate_up[[3, 0], 1::2][:, half:]
        assert_bitwise_equal(w13, torch.cat([gate, up], dim=1))
        assert_bitwise_equal(w2, tensors[DOWN][[3, 0]][:, :, half:])
    with fml.open(path) as ckpt:
        assert ckpt.experts(P).format == "fused"


def test_model_type_sets_interleaving_and_override_wins(fused):
    path, tensors = fused
    (path.parent / "config.json").write_text(json.dumps({"model_type": "gpt_oss"}))
    with fml.open(path) as ckpt:
        assert ckpt.experts(P).format == "fused_interleaved"
    with fml.open(path, interleaved=False) as ckpt:
        layer = ckpt.experts(P)
        assert layer.format == "fused"
        assert_bitwise_equal(layer.w1(0), tensors[GATE_UP][0, :INTER])
