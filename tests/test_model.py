"""`load_model` fills whole transformers models: a model on the meta device equals
`from_pretrained` of the same checkpoint bit for bit, in every family and save format, and
so do its logits, also where transformers widens dtypes (DeepSeek-V3's float32 router over a
bfloat16 release, a model built in float32) and for tied embeddings stored under either
name or both; mismatches are reported, or raised in strict mode before any write."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import fastmoe_load as fml
import pytest
import torch
from conftest import FAMILIES, assert_bitwise_equal, bits, build_model, release_dtype
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

FORMATS = [(family, original) for family in FAMILIES for original in (True, False)]
IDS = [f"{f}-{'orig' if o else 'v5'}" for f, o in FORMATS]


def meta_model(path, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """The model of `path`'s config on the meta device, built as the README shows."""
    config = transformers.AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)


def from_pretrained(path, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def assert_same_model(actual: torch.nn.Module, expected: torch.nn.Module) -> None:
    ours = actual.state_dict()
    assert ours.keys() == expected.state_dict().keys()
    for name, tensor in expected.state_dict().items():
        assert_bitwise_equal(ours[name], tensor, name)
    ours_buffers = dict(actual.named_buffers())
    for name, buffer in expected.named_buffers():  # non-persistent ones too (rotary tables)
        assert torch.equal(bits(ours_buffers[name]), bits(buffer)), name
    tokens = torch.tensor([[1, 5, 9, 3, 7, 2]])
    with torch.no_grad():
        assert torch.equal(actual(tokens).logits, expected(tokens).logits)


def no_load_warning(load, *args, **kwargs) -> fml.ModelLoadReport:
    with warnings.catch_warnings():
        warnings.simplefilter("error", fml.LoadWarning)
        return load(*args, **kwargs)


@pytest.mark.parametrize(("family", "original"), FORMATS, ids=IDS)
def test_meta_model_equals_from_pretrained(saved_models, family, original):
    saved = saved_models[family, original]
    expected = from_pretrained(saved.path)
    model = meta_model(saved.path)
    report = no_load_warning(fml.load_model, model, saved.path, device="cpu", strict=True)
    assert (report.missing, report.unexpected, report.mismatched) == ([], [], {})
    assert report.loaded == sorted(model.state_dict())
    # DeepSeek-V3's router weight is stored in bfloat16 and widened into the model's float32.
    widened = {
        name: f"{release_dtype(family, name)} -> {tensor.dtype}"
        for name, tensor in model.state_dict().items()
        if release_dtype(family, name) not in (None, tensor.dtype)
    }
    assert report.cast == widened
    assert bool(widened) == (family == "deepseek_v3")
    assert report.expert_groups == len(fml.open(saved.path).moe_layers())
    assert report.bytes > 0
    assert_same_model(model.eval(), expected)


@pytest.mark.parametrize(("family", "original"), FORMATS, ids=IDS)
def test_float32_model_is_widened_like_from_pretrained(saved_models, family, original):
    """A model built in float32 over a bfloat16 checkpoint: every weight widened exactly,
    experts of every layout too, as `from_pretrained(dtype=torch.float32)` does."""
    saved = saved_models[family, original]
    expected = from_pretrained(saved.path, torch.float32)
    model = meta_model(saved.path, torch.float32)
    report = no_load_warning(fml.load_model, model, saved.path, strict=True)
    assert set(report.cast.values()) == {"torch.bfloat16 -> torch.float32"}
    experts = [n for n in report.loaded if n.endswith(("gate_up_proj", "down_proj"))]
    assert experts and all(n in report.cast for n in experts)
    assert "lm_head.weight" in report.cast
    assert_same_model(model.eval(), expected)


def test_model_with_empty_weights_and_an_open_checkpoint(saved_models):
    saved = saved_models["mixtral", True]
    expected = from_pretrained(saved.path)
    model = build_model("mixtral", seed=7)  # real, different weights
    with fml.open(saved.path) as ckpt:
        fml.load_model(model, ckpt, strict=True)
    assert_same_model(model.eval(), expected)


# ---------------------------------------------------------------------------------------------
# tied embeddings

TIE_CASES = ["embedding_only", "head_only", "both_equal", "both_different"]


def tied_checkpoint(directory: Path, case: str) -> Path:
    """A Qwen3-MoE checkpoint whose config ties the embeddings, storing the embedding only
    (as transformers saves it), the LM head only, both with equal values (as `.bin`
    conversions do), or an embedding and a different head."""
    model = build_model("qwen3_moe", tie_word_embeddings=case != "both_different")
    path = directory / case
    model.save_pretrained(path)
    file = path / "model.safetensors"
    tensors = load_file(file)
    if case == "head_only":
        tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")
    elif case == "both_equal":
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, file, metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("meta", [True, False], ids=["meta", "real"])
@pytest.mark.parametrize("case", TIE_CASES)
def test_tied_embeddings_end_as_from_pretrained_leaves_them(tmp_path, case, meta):
    path = tied_checkpoint(tmp_path, case)
    stored = load_file(path / "model.safetensors")
    expected = from_pretrained(path)
    if meta:
        model = meta_model(path)
    else:
        model = build_model("qwen3_moe", seed=7, tie_word_embeddings=True)
    head, embedding = "lm_head.weight", "model.embed_tokens.weight"
    if case == "both_different":
        with pytest.warns(fml.LoadWarning, match="loaded untied"):
            report = fml.load_model(model, path, strict=True)
        assert sorted(report.untied) == [head, embedding]
        assert report.tied == {}
    else:
        report = no_load_warning(fml.load_model, model, path, strict=True)
        assert report.untied == []
        keeper = head if case == "head_only" else embedding
        assert report.tied == {head if keeper == embedding else embedding: keeper}
    assert (report.missing, report.unexpected, report.mismatched) == ([], [], {})
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == (expected.lm_head.weight is expected.model.embed_tokens.weight)
    assert tied == (case != "both_different")
    assert model.all_tied_weights_keys == expected.all_tied_weights_keys
    for name, other in ((head, embedding), (embedding, head)):  # every stored tensor landed
        assert_bitwise_equal(model.state_dict()[name], stored.get(name, stored.get(other)))
    assert_same_model(model.eval(), expected)


# ---------------------------------------------------------------------------------------------
# mismatches


def test_strict_mode_raises_before_writing(saved_models):
    saved = saved_models["qwen3_moe", False]
    model = build_model("qwen3_moe", seed=7)
    model.extra = torch.nn.Linear(4, 4, dtype=torch.bfloat16)  # not in the checkpoint
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(fml.RequestError, match=r"2 missing from the checkpoint \(extra.bias, "):
        fml.load_model(model, saved.path, strict=True)
    for name, tensor in model.state_dict().items():
        assert_bitwise_equal(tensor, before[name], name)
    with pytest.warns(fml.LoadWarning, match=r"2 missing"):
        report = fml.load_model(model, saved.path)
    assert report.missing == ["extra.bias", "extra.weight"]
    assert_bitwise_equal(model.extra.weight, before["extra.weight"])


def test_narrowing_is_refused_with_the_dtype_to_build_in(saved_models):
    """A float32 checkpoint tensor and a bfloat16 weight: not cast (bits would be lost);
    the error says which dtype to build the model in."""
    saved = saved_models["deepseek_v3", False]  # stores e_score_correction_bias in float32
    model = build_model("deepseek_v3", seed=1)
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    module = model.get_submodule(bias.rpartition(".")[0])
    module.e_score_correction_bias = module.e_score_correction_bias.bfloat16()
    with pytest.warns(fml.LoadWarning, match=r"build the model in torch\.float32"):
        report = fml.load_model(model, saved.path)
    assert "a cast would not be exact" in report.mismatched[bias]
    assert bias not in report.loaded and bias not in report.missing
    with pytest.raises(fml.RequestError, match=rf"{bias}: torch\.bfloat16 in the model, "):
        fml.load_model(model, saved.path, strict=True)


def test_tensor_and_expert_parallel_shards(saved_models):
    """A rank's model holds its slice of the dense weights (found by shape) and its experts."""
    saved = saved_models["qwen3_moe", True]
    full = transformers.AutoModelForCausalLM.from_pretrained(saved.path, dtype=torch.bfloat16)
    for tp_rank, ep_rank in ((0, 1), (1, 0)):
        model = build_model("qwen3_moe", seed=3)
        q = model.model.layers[0].self_attn.q_proj
        q.weight = torch.nn.Parameter(q.weight.data[: q.weight.shape[0] // 2].clone())
        local = fml.expert_placement(5, 2, ep_rank)
        inter = slice(tp_rank * 20, (tp_rank + 1) * 20)  # I = 40 over two ranks
        for layer in model.model.layers:
            experts = layer.mlp.experts
            gate, up = experts.gate_up_proj.data[local].chunk(2, dim=1)
            gate_up = torch.cat([gate[:, inter], up[:, inter]], dim=1)
            experts.gate_up_proj = torch.nn.Parameter(torch.zeros_like(gate_up))
            down = experts.down_proj.data[local][:, :, inter]
            experts.down_proj = torch.nn.Parameter(torch.zeros_like(down.contiguous()))
        report = fml.load_model(
            model, saved.path, tp_rank=tp_rank, tp_size=2, ep_rank=ep_rank, ep_size=2
        )
        assert report.mismatched == {}
        rows = full.model.layers[0].self_attn.q_proj.weight.shape[0] // 2
        expected_q = full.model.layers[0].self_attn.q_proj.weight[tp_rank * rows :][:rows]
        assert_bitwise_equal(q.weight, expected_q)
        for layer, reference in zip(model.model.layers, full.model.layers, strict=True):
            gate, up = reference.mlp.experts.gate_up_proj[local].chunk(2, dim=1)
            expected = torch.cat([gate[:, inter], up[:, inter]], dim=1)
            assert_bitwise_equal(layer.mlp.experts.gate_up_proj, expected)
            expected_down = reference.mlp.experts.down_proj[local][:, :, inter]
            assert_bitwise_equal(layer.mlp.experts.down_proj, expected_down)

    # A rank's model whose expert modules are not sized for the rank: refused before writing.
    model = build_model("qwen3_moe", seed=3)
    with pytest.raises(fml.RequestError, match=r"\(5, 80, 48\) in the model, this rank's "):
        fml.load_model(model, saved.path, tp_size=2, strict=True)


def test_tensor_parallel_attention_with_expert_parallel_experts(saved_models):
    """vLLM's expert parallelism: dense weights sliced for TP rank 1 of 2, experts whole
    (`expert_tp_size=1`) and placed over two EP ranks."""
    saved = saved_models["qwen3_moe", False]
    full = transformers.AutoModelForCausalLM.from_pretrained(saved.path, dtype=torch.bfloat16)
    model = build_model("qwen3_moe", seed=3)
    q = model.model.layers[0].self_attn.q_proj
    rows = q.weight.shape[0] // 2
    q.weight = torch.nn.Parameter(q.weight.data[:rows].clone())
    local = fml.expert_placement(5, 2, 0)
    for layer in model.model.layers:
        experts = layer.mlp.experts
        experts.gate_up_proj = torch.nn.Parameter(torch.zeros_like(experts.gate_up_proj[local]))
        experts.down_proj = torch.nn.Parameter(torch.zeros_like(experts.down_proj[local]))
    report = fml.load_model(
        model,
        saved.path,
        tp_rank=1,
        tp_size=2,
        ep_rank=0,
        ep_size=2,
        expert_tp_rank=0,
        expert_tp_size=1,
        strict=True,
    )
    assert report.mismatched == {}
    assert_bitwise_equal(q.weight, full.model.layers[0].self_attn.q_proj.weight[rows:])
    for layer, reference in zip(model.model.layers, full.model.layers, strict=True):
        ours, theirs = layer.mlp.experts, reference.mlp.experts
        assert_bitwise_equal(ours.gate_up_proj, theirs.gate_up_proj[local])
        assert_bitwise_equal(ours.down_proj, theirs.down_proj[local])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("family", "original"), FORMATS, ids=IDS)
def test_meta_model_on_cuda_equals_from_pretrained(saved_models, family, original):
    saved = saved_models[family, original]
    expected = transformers.AutoModelForCausalLM.from_pretrained(saved.path, dtype=torch.bfloat16)
    model = meta_model(saved.path)
    fml.load_model(model, saved.path, device="cuda", strict=True)
    assert next(model.parameters()).device.type == "cuda"
    ours = model.state_dict()
    for name, tensor in expected.state_dict().items():
        assert_bitwise_equal(ours[name], tensor, name)
