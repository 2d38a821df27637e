"""DBRX's expert layout: `transformer.blocks.N.ffn.experts.mlp.w1 / v1 / w2`, each a 2-D
tensor of all experts stacked, `[E·I, H]`, with down stored per expert as `[I, H]` (the
transpose of its `[H, I]`: transformers' `DbrxExpertGLU` computes `h @ w2_e`, vLLM's dbrx.py
reshapes to `[E, I, H]` and transposes). Checked against slices of the stored tensors taken
by hand; against vLLM's own DBRX loader in test_vllm_real.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import fastmoe_load as fml
import pytest
import torch
from conftest import assert_bitwise_equal, group_error, poisoned
from fastmoe_load.cli import main
from fastmoe_load.cli.convert import convert
from safetensors.torch import save_file

E, H, INTER = 4, 128, 64
BLOCKS = 2


def prefix(block: int) -> str:
    return f"transformer.blocks.{block}.ffn.experts"


def dbrx_config(num_experts: int = E) -> dict:
    """DBRX's config.json, scaled down: the expert count lives under `ffn_config`."""
    return {
        "model_type": "dbrx",
        "d_model": H,
        "n_layers": BLOCKS,
        "ffn_config": {
            "ffn_hidden_size": INTER,
            "moe_num_experts": num_experts,
            "moe_top_k": 2,
            "ffn_act_fn": {"name": "silu"},
        },
    }


def dbrx(path: Path, config: dict | None = None) -> tuple[Path, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    tensors = {"transformer.wte.weight": torch.randn(32, H, generator=gen).bfloat16()}
    for block in range(BLOCKS):
        for name in ("w1", "v1", "w2"):
            tensors[f"{prefix(block)}.mlp.{name}"] = torch.randn(
                E * INTER, H, generator=gen
            ).bfloat16()
        router = f"transformer.blocks.{block}.ffn.router.layer.weight"
        tensors[router] = torch.randn(E, H, generator=gen).bfloat16()
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(config or dbrx_config()))
    return path, tensors


@pytest.fixture
def checkpoint(tmp_path):
    return dbrx(tmp_path / "dbrx")


def expected(tensors: dict[str, torch.Tensor], block: int, tp_rank: int, tp: int, experts):
    """`w13 [E_local, 2I/tp, H]` and `w2 [E_local, H, I/tp]` sliced by hand."""
    shard = slice(tp_rank * INTER // tp, (tp_rank + 1) * INTER // tp)
    w1, v1, w2 = (tensors[f"{prefix(block)}.mlp.{n}"].view(E, INTER, H) for n in ("w1", "v1", "w2"))
    w13 = torch.stack([torch.cat([w1[e, shard], v1[e, shard]]) for e in experts])
    down = torch.stack([w2[e, shard].T for e in experts])
    return w13, down


def test_detected_as_stacked_with_views(checkpoint):
    path, tensors = checkpoint
    with fml.open(path) as ckpt:
        layers = ckpt.moe_layers()
        assert [layer.prefix for layer in layers] == [prefix(b) for b in range(BLOCKS)]
        assert ckpt.unsupported_groups() == []  # the routers are not experts
        layer = layers[1]
        assert (layer.format, layer.num_experts, layer.hidden_size) == ("stacked", E, H)
        assert (layer.intermediate_size, layer.dtype, layer.has_bias) == (
            INTER,
            torch.bfloat16,
            False,
        )
        assert layer.quantization is None
        w1, v1, w2 = (tensors[f"{prefix(1)}.mlp.{n}"].view(E, INTER, H) for n in ("w1", "v1", "w2"))
        for e in range(E):
            assert_bitwise_equal(layer.w1(e), w1[e], f"w1({e})")
            assert_bitwise_equal(layer.w3(e), v1[e], f"w3({e})")
            assert_bitwise_equal(layer.w2(e), w2[e].T, f"w2({e})")
        with pytest.raises(fml.RequestError, match="no biases"):
            layer.b1(0)


@pytest.mark.parametrize(
    ("tp_rank", "tp", "experts"), [(0, 1, None), (1, 2, None), (0, 2, [3, 1, 3])]
)
def test_load_fused_moe_matches_hand_slices(checkpoint, tp_rank, tp, experts):
    path, tensors = checkpoint
    local = list(range(E)) if experts is None else experts
    w13 = poisoned((len(local), 2 * INTER // tp, H))
    w2 = poisoned((len(local), H, INTER // tp))
    with fml.open(path) as ckpt:
        stats = fml.load_fused_moe(
            ckpt, prefix(1), w13, w2, tp_rank=tp_rank, tp_size=tp, local_experts=experts
        )
    want13, want2 = expected(tensors, 1, tp_rank, tp, local)
    assert_bitwise_equal(w13, want13, "w13")
    assert_bitwise_equal(w2, want2, "w2")
    assert stats.bytes == (w13.numel() + w2.numel()) * 2


def test_expert_count_comes_from_config(tmp_path):
    path, _ = dbrx(tmp_path / "dbrx")
    (path / "config.json").unlink()
    with fml.open(path) as ckpt:
        message = group_error(ckpt)
    assert "transformer.blocks.0.ffn.experts.mlp.w1" in message
    assert "ffn_config.moe_num_experts" in message


def test_expert_count_that_does_not_divide_the_rows(tmp_path):
    path, _ = dbrx(tmp_path / "dbrx", dbrx_config(num_experts=3))
    with fml.open(path) as ckpt:
        assert "does not hold 3 experts" in group_error(ckpt)


def test_mismatched_stacked_shapes(tmp_path):
    path, tensors = dbrx(tmp_path / "dbrx")
    tensors[f"{prefix(0)}.mlp.v1"] = tensors[f"{prefix(0)}.mlp.v1"][:-1].clone()
    save_file(tensors, path / "model.safetensors")
    with fml.open(path) as ckpt:
        assert "should all be [E·I, H]" in group_error(ckpt)


def test_inspect_names_the_layout(checkpoint, capsys):
    path, _ = checkpoint
    main(["inspect", "--tp", "2", str(path)])
    out = capsys.readouterr().out
    assert f"{prefix(0)}  stacked" in out
    assert "2 routed-expert groups" in out


@pytest.mark.parametrize("to", ["fused", "per_expert"])
def test_convert_refuses_stacked_experts(checkpoint, tmp_path, to):
    path, _ = checkpoint
    dst = tmp_path / "out"
    with pytest.raises(fml.RequestError, match="stacked as DBRX stores them"):
        convert(path, dst, to=to)
    assert not dst.exists()


def dbrx_model(dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> torch.nn.Module:
    """transformers' `DbrxForCausalLM`, scaled down, of random weights: it keeps the experts
    stacked as the checkpoint does (`ffn.experts.mlp.w1 / v1 / w2 [E·I, H]`)."""
    import transformers

    config = transformers.DbrxConfig(
        d_model=H,
        n_heads=4,
        n_layers=BLOCKS,
        max_seq_len=64,
        vocab_size=64,
        attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},  # as released
        ffn_config={"ffn_hidden_size": INTER, "moe_num_experts": E, "moe_top_k": 2},
    )
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dbrx-model")
    dbrx_model().save_pretrained(path, max_shard_size="40KB")
    return path


def stacked(model: torch.nn.Module, block: int) -> tuple[torch.Tensor, ...]:
    """The model's `w1`, `v1`, `w2` of `block` as `[E, I, H]`."""
    mlp = model.transformer.blocks[block].ffn.experts.mlp
    return tuple(getattr(mlp, n).detach().view(-1, INTER, H) for n in ("w1", "v1", "w2"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_load_model_equals_from_pretrained(saved_model, dtype):
    """A meta `DbrxForCausalLM` filled by `load_model` equals `from_pretrained`, weights,
    buffers and logits; in float32 the bfloat16 experts are widened exactly, as transformers
    widens them."""
    from test_model import assert_same_model, from_pretrained, meta_model, no_load_warning

    expected = from_pretrained(saved_model, dtype)
    model = meta_model(saved_model, dtype)
    report = no_load_warning(fml.load_model, model, saved_model, device="cpu", strict=True)
    assert (report.missing, report.unexpected, report.mismatched) == ([], [], {})
    assert report.loaded == sorted(model.state_dict())
    assert report.expert_groups == BLOCKS
    experts = {f"{prefix(b)}.mlp.{n}" for b in range(BLOCKS) for n in ("w1", "v1", "w2")}
    widened = experts if dtype == torch.float32 else set()
    assert experts.issubset(report.cast) if widened else not report.cast
    assert_same_model(model.eval(), expected)


def test_load_model_rank_holds_its_experts_shard(saved_model):
    """A rank's model whose stacked expert weights hold its experts (EP rank 1 of 2) and its
    TP shard (rank 1 of 2) of each, `[E_local·I/2, H]`: sliced per expert, not as one
    tensor; a model not sized for the rank is refused before anything is written."""
    full = dbrx_model()
    local = fml.expert_placement(E, 2, 1)
    inter = slice(INTER // 2, INTER)
    model = dbrx_model(seed=3)
    for block in model.transformer.blocks:
        mlp = block.ffn.experts.mlp
        for name in ("w1", "v1", "w2"):
            shape = (len(local) * INTER // 2, H)
            setattr(mlp, name, torch.nn.Parameter(poisoned(shape)))
    options = dict(ep_rank=1, ep_size=2, expert_tp_rank=1, expert_tp_size=2, strict=True)
    report = fml.load_model(model, saved_model, **options)
    assert report.mismatched == {}
    assert report.expert_groups == BLOCKS
    for b, block in enumerate(model.transformer.blocks):
        mlp = block.ffn.experts.mlp
        for name, reference in zip(("w1", "v1", "w2"), stacked(full, b), strict=True):
            want = reference[local][:, inter].reshape(-1, H)
            assert_bitwise_equal(getattr(mlp, name), want, f"block {b} {name}")
    before = dbrx_model(seed=4)
    unsized = dbrx_model(seed=4)
    message = f"{(E * INTER, H)} in the model, this rank's experts (TP rank 1 of 2, EP rank 1 of 2)"
    with pytest.raises(fml.RequestError, match=re.escape(message)):
        fml.load_model(unsized, saved_model, **options)
    for ours, theirs in zip(
        unsized.state_dict().values(), before.state_dict().values(), strict=True
    ):
        assert torch.equal(ours, theirs)  # untouched
