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
