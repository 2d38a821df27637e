"""`fastmoe_load.engines.vllm.load_fused_moe_layer` against re-implementations of vLLM's
own loading: `FusedMoE.weight_loader` (through the seed path) for concatenated layouts, with
expert maps and EPLB replicas, and vLLM's gpt-oss loader for interleaved experts with
biases."""

from __future__ import annotations

from types import SimpleNamespace

import fastmoe_load as fml
import pytest
import torch
from conftest import assert_bitwise_equal, poisoned
from fastmoe_load.bench.seed import seed_load
from fastmoe_load.engines.vllm import load_fused_moe_layer, local_experts_of
from safetensors import safe_open


def vllm_layer(num_local, inter, hidden, tp_rank=0, tp_size=1, expert_map=None, bias=False):
    """The attributes of a vLLM FusedMoE layer the adapter reads, poisoned."""
    shard = inter // tp_size
    layer = SimpleNamespace(
        w13_weight=torch.nn.Parameter(poisoned((num_local, 2 * shard, hidden)), False),
        w2_weight=torch.nn.Parameter(poisoned((num_local, hidden, shard)), False),
        tp_rank=tp_rank,
        tp_size=tp_size,
        expert_map=expert_map,
    )
    if bias:
        layer.w13_bias = torch.nn.Parameter(poisoned((num_local, 2 * shard)), False)
        layer.w2_bias = torch.nn.Parameter(poisoned((num_local, hidden)), False)
    return layer


def expert_map(num_physical, slots_of):
    """vLLM's expert map: local slot of each physical expert, -1 elsewhere."""
    table = torch.full((num_physical,), -1, dtype=torch.int32)
    for slot, physical in enumerate(slots_of):
        table[physical] = slot
    return table


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "llama4_text"])
@pytest.mark.parametrize("original", [True, False], ids=["orig", "v5"])
def test_expert_maps_and_replicas_match_vllm_weight_loader(saved_models, family, original):
    saved = saved_models[family, original]
    with fml.open(saved.path) as ckpt:
        for group in ckpt.moe_layers():
            e, i, h = group.num_experts, group.intermediate_size, group.hidden_size
            # EP rank 1 of 2, linear placement, over 5 logical + 3 redundant physical experts.
            physical = fml.expert_placement(e + 3, 2, 1)
            layer = vllm_layer(
                len(physical), i, h, tp_rank=1, tp_size=2, expert_map=expert_map(e + 3, physical)
            )
            consumed = load_fused_moe_layer(layer, ckpt, group.prefix)
            assert consumed == list(group.tensor_names)
            logical = [p % e for p in physical]
            assert local_experts_of(layer, e) == logical
            seed13, seed2 = poisoned(layer.w13_weight.shape), poisoned(layer.w2_weight.shape)
            seed_load(str(saved.path), group, seed13, seed2, tp_rank=1, local_experts=logical)
            assert_bitwise_equal(layer.w13_weight.data, seed13, group.prefix)
            assert_bitwise_equal(layer.w2_weight.data, seed2, group.prefix)


def vllm_gpt_oss(path, prefix, tp_rank, tp_size):
    """vLLM's gpt-oss loader (bf16): keeps the interleaved rows; w2_bias on TP rank 0 only."""
    tensors = {}
    for name in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"):
        for file in sorted(path.glob("*.safetensors")):
            with safe_open(file, "pt") as f:
                if f"{prefix}.{name}" in f.keys():
                    tensors[name] = f.get_tensor(f"{prefix}.{name}")
    inter = tensors["down_proj"].shape[1]
    per_rank = inter // tp_size
    s, e = tp_rank * per_rank, (tp_rank + 1) * per_rank
    w13 = tensors["gate_up_proj"][:, :, 2 * s : 2 * e].permute(0, 2, 1).contiguous()
    w2 = tensors["down_proj"][:, s:e, :].permute(0, 2, 1).contiguous()
    b13 = tensors["gate_up_proj_bias"][:, 2 * s : 2 * e]
    b2 = tensors["down_proj_bias"] if tp_rank == 0 else torch.zeros_like(tensors["down_proj_bias"])
    return w13, w2, b13, b2


@pytest.mark.parametrize("tp", [(0, 1), (0, 2), (1, 2), (3, 4)])
def test_gpt_oss_matches_vllm_gpt_oss_loader(saved_models, tp):
    tp_rank, tp_size = tp
    saved = saved_models["gpt_oss", False]
    with fml.open(saved.path) as ckpt:
        for group in ckpt.moe_layers():
            assert group.format == "fused_transposed_interleaved"
            e, i, h = group.num_experts, group.intermediate_size, group.hidden_size
            layer = vllm_layer(e, i, h, tp_rank, tp_size, bias=True)
            load_fused_moe_layer(layer, ckpt, group.prefix)
            w13, w2, b13, b2 = vllm_gpt_oss(saved.path, group.prefix, tp_rank, tp_size)
            assert_bitwise_equal(layer.w13_weight.data, w13, "w13")
            assert_bitwise_equal(layer.w2_weight.data, w2, "w2")
            assert_bitwise_equal(layer.w13_bias.data, b13, "w13_bias")
            assert_bitwise_equal(layer.w2_bias.data, b2, "w2_bias")


@pytest.mark.parametrize("tp", [(0, 1), (1, 2)])
def test_interleaving_is_the_layers_whatever_the_files_hold(saved_models, tmp_path, tp):
    """gpt-oss rewritten with gate and up concatenated (recorded in its shards) fills a
    `swigluoai` layer exactly as the original interleaved files do; a layer whose activation
    wants gate rows then up rows gets them from either."""
    from fastmoe_load.cli.convert import convert

    tp_rank, tp_size = tp
    saved = saved_models["gpt_oss", False]
    concatenated = tmp_path / "concatenated"
    convert(saved.path, concatenated, to="fused", progress=False)
    filled = {}
    for path in (saved.path, concatenated):
        with fml.open(path) as ckpt:
            for group in ckpt.moe_layers():
                e, i, h = group.num_experts, group.intermediate_size, group.hidden_size
                for activation in ("swigluoai", "silu"):
                    layer = vllm_layer(e, i, h, tp_rank, tp_size, bias=True)
                    layer.moe_config = SimpleNamespace(activation=activation)
                    load_fused_moe_layer(layer, ckpt, group.prefix)
                    key = (group.prefix, activation)
                    filled.setdefault(key, []).append((layer.w13_weight.data, layer.w13_bias.data))
    for (prefix, activation), ((w13, b13), (w13_c, b13_c)) in filled.items():
        assert_bitwise_equal(w13_c, w13, f"{prefix} {activation}")
        assert_bitwise_equal(b13_c, b13, f"{prefix} {activation}")
    w13, _, _, _ = vllm_gpt_oss(saved.path, prefix, tp_rank, tp_size)
    assert_bitwise_equal(filled[prefix, "swigluoai"][1][0], w13, "swigluoai")
    gate_then_up = torch.cat([w13[:, 0::2], w13[:, 1::2]], dim=1)
    assert_bitwise_equal(filled[prefix, "silu"][1][0], gate_then_up, "silu")


def test_expert_map_with_an_empty_slot_is_refused(saved_models):
    saved = saved_models["qwen3_moe", False]
    with fml.open(saved.path) as ckpt:
        group = ckpt.moe_layers()[0]
        layer = vllm_layer(
            3, group.intermediate_size, group.hidden_size, expert_map=expert_map(5, [0, 4])
        )
        with pytest.raises(fml.RequestError, match="local slot 2 empty"):
            load_fused_moe_layer(layer, ckpt, group.prefix)
        assert layer.w13_weight.isnan().all()


def fp8_tensor_layer(method: str, experts: int, inter: int, hidden: int):
    """The parameters a vLLM fp8 per-tensor MoE method creates (weights, `w13_weight_scale
    [E, 2]`, `w2_weight_scale [E]`, input scales `[E]`), poisoned, under `method`'s name."""
    layer = SimpleNamespace(
        w13_weight=torch.nn.Parameter(
            torch.full((experts, 2 * inter, hidden), 0x7F, dtype=torch.uint8).view(
                torch.float8_e4m3fn
            ),
            False,
        ),
        w2_weight=torch.nn.Parameter(
            torch.full((experts, hidden, inter), 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn),
            False,
        ),
        w13_weight_scale=torch.nn.Parameter(poisoned((experts, 2), torch.float32), False),
        w2_weight_scale=torch.nn.Parameter(poisoned((experts,), torch.float32), False),
        w13_input_scale=torch.nn.Parameter(poisoned((experts,), torch.float32), False),
        w2_input_scale=torch.nn.Parameter(poisoned((experts,), torch.float32), False),
        tp_rank=0,
        tp_size=1,
        expert_map=None,
        quant_method=type(method, (), {})(),
    )
    return layer


def test_gate_and_up_input_scales_follow_each_methods_rule(tmp_path):
    """compressed-tensors static fp8 whose gate and up input scales differ: vLLM refuses it
    for its compressed-tensors method ("input_scales of w1 and w3 of a layer must be
    equal"), so the adapter refuses it too, before writing; its fp8 and ModelOpt methods keep
    the up projection's, and so does the adapter."""
    import test_quant

    path = test_quant.compressed_tensors(tmp_path / "ct", "tensor", input_scales=(0.1833, 0.55))
    e, inter, hidden = test_quant.E, test_quant.INTER, test_quant.H
    with fml.open(path) as ckpt:
        refused = fp8_tensor_layer("CompressedTensorsW8A8Fp8MoEMethod", e, inter, hidden)
        with pytest.raises(fml.RequestError, match=r"gate input_scale 0\.1833 and up input_sc"):
            load_fused_moe_layer(refused, ckpt, test_quant.PREFIX)
        assert refused.w13_input_scale.isnan().all() and refused.w13_weight_scale.isnan().all()
        assert (refused.w13_weight.data.view(torch.uint8) == 0x7F).all()
        for method in ("Fp8MoEMethod", "ModelOptFp8MoEMethod"):
            kept = fp8_tensor_layer(method, e, inter, hidden)
            load_fused_moe_layer(kept, ckpt, test_quant.PREFIX)
            assert kept.w13_input_scale.data.tolist() == [0.550000011920929] * e
