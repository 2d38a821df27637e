"""`load_model` fills whole transformers models: a model on the meta device equals
`from_pretrained` of the same checkpoint bit for bit, in every family and save format, and
so do its logits; mismatches are reported, or raised in strict mode before any write."""

from __future__ import annotations

import fastmoe_load as fml
import pytest
import torch
from conftest import FAMILIES, assert_bitwise_equal, bits, build_model

transformers = pytest.importorskip("transformers")

FORMATS = [(family, original) for family in FAMILIES for original in (True, False)]
IDS = [f"{f}-{'orig' if o else 'v5'}" for f, o in FORMATS]


def meta_model(path) -> torch.nn.Module:
    config = transformers.AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def assert_same_model(actual: torch.nn.Module, expected: torch.nn.Module) -> None:
    ours = actual.state_dict()
    for name, tensor in expected.state_dict().items():
        assert_bitwise_equal(ours[name], tensor, name)
    ours_buffers = dict(actual.named_buffers())
    for name, buffer in expected.named_buffers():  # non-persistent ones too (rotary tables)
        assert torch.equal(bits(ours_buffers[name]), bits(buffer)), name
    tokens = torch.tensor([[1, 5, 9, 3, 7, 2]])
    with torch.no_grad():
        assert torch.equal(actual(tokens).logits, expected(tokens).logits)


@pytest.mark.parametrize(("family", "original"), FORMATS, ids=IDS)
def test_meta_model_equals_from_pretrained(saved_models, family, original):
    saved = saved_models[family, original]
    expected = transformers.AutoModelForCausalLM.from_pretrained(saved.path, dtype=torch.bfloat16)
    model = meta_model(saved.path)
    report = fml.load_model(model, saved.path, device="cpu")
    assert (report.missing, report.unexpected, report.mismatched) == ([], [], {})
    assert report.expert_groups == len(fml.open(saved.path).moe_layers())
    assert report.bytes > 0
    assert_same_model(model.eval(), expected.eval())


def test_model_with_empty_weights_and_an_open_checkpoint(saved_models):
    saved = saved_models["mixtral", True]
    expected = transformers.AutoModelForCausalLM.from_pretrained(saved.path, dtype=torch.bfloat16)
    model = build_model("mixtral", seed=7)  # real, different weights
    with fml.open(saved.path) as ckpt:
        fml.load_model(model, ckpt, strict=True)
    assert_same_model(model.eval(), expected.eval())


def test_strict_mode_raises_before_writing(saved_models):
    saved = saved_models["qwen3_moe", False]
    model = build_model("qwen3_moe", seed=7)
    model.extra = torch.nn.Linear(4, 4, dtype=torch.bfloat16)  # not in the checkpoint
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(fml.RequestError, match=r"2 missing \(extra.bias, extra.weight\)"):
        fml.load_model(model, saved.path, strict=True)
    for name, tensor in model.state_dict().items():
        assert_bitwise_equal(tensor, before[name], name)
    report = fml.load_model(model, saved.path)
    assert report.missing == ["extra.bias", "extra.weight"]
    assert_bitwise_equal(model.extra.weight, before["extra.weight"])


def test_mismatches_are_reported_not_cast(saved_models):
    saved = saved_models["mixtral", True]
    model = build_model("mixtral", seed=1)
    model.lm_head.weight.data = model.lm_head.weight.data.float()
    report = fml.load_model(model, saved.path)
    assert "no cast" in report.mismatched["lm_head.weight"]
    assert "lm_head.weight" not in report.loaded
    with pytest.raises(fml.RequestError, match=r"lm_head\.weight: dtype torch\.float32"):
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
    with pytest.raises(fml.RequestError, match=r"experts\.gate_up_proj: \(5, 80, 48\)"):
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
