"""Experts of transformers models, saved in every format, loaded per TP rank and EP placement
equal the models' own parameters bit for bit, and equal vLLM's pure-Python path."""

from __future__ import annotations

import fastmoe_load as fml
import pytest
import torch
from conftest import (
    FAMILIES,
    assert_bitwise_equal,
    layer_index,
    poisoned,
    reference_experts,
)
from fastmoe_load.bench.seed import seed_load

FORMATS = [(family, original) for family in FAMILIES for original in (True, False)]
PLACEMENTS = {
    "all": lambda e: list(range(e)),
    "ep2_linear_rank1": lambda e: fml.expert_placement(e, 2, 1, "linear"),
    "ep3_round_robin_rank0": lambda e: fml.expert_placement(e, 3, 0, "round_robin"),
    "replicas": lambda e: [3, 0, 3, e - 1],
}


def load(ckpt, layer, experts, tp_rank, tp_size):
    n, shard, h = len(experts), layer.intermediate_size // tp_size, layer.hidden_size
    out = {"w13": poisoned((n, 2 * shard, h)), "w2": poisoned((n, h, shard))}
    biases = {}
    if layer.has_bias:
        out["w13_bias"] = biases["w13_bias"] = poisoned((n, 2 * shard))
        out["w2_bias"] = biases["w2_bias"] = poisoned((n, h))
    stats = fml.load_fused_moe(
        ckpt,
        layer.prefix,
        out["w13"],
        out["w2"],
        tp_rank=tp_rank,
        tp_size=tp_size,
        local_experts=experts,
        **biases,
    )
    assert stats.bytes == sum(t.numel() * t.element_size() for t in out.values())
    return out


@pytest.mark.parametrize(
    ("family", "original"), FORMATS, ids=[f"{f}-{'orig' if o else 'v5'}" for f, o in FORMATS]
)
def test_layers_match_model(saved_models, family, original):
    saved = saved_models[family, original]
    reference = reference_experts(saved.model, family)
    with fml.open(saved.path) as ckpt:
        layers = ckpt.moe_layers()
        assert len(ckpt.shard_paths) > 1
        assert {layer_index(layer.prefix) for layer in layers} == set(reference)
        for layer in layers:
            ref = reference[layer_index(layer.prefix)]
            assert layer.format == saved.expected_format
            assert (layer.num_experts, layer.hidden_size, layer.intermediate_size) == (5, 48, 40)
            assert layer.dtype == torch.bfloat16
            assert layer.has_bias == (ref.gate_bias is not None)
            for tp_size in (1, 2, 4):
                for tp_rank in range(tp_size):
                    for place, experts_of in PLACEMENTS.items():
                        experts = experts_of(layer.num_experts)
                        out = load(ckpt, layer, experts, tp_rank, tp_size)
                        what = f"{layer.prefix} tp {tp_rank}/{tp_size} {place}"
                        assert_bitwise_equal(out["w13"], ref.w13(experts, tp_rank, tp_size), what)
                        assert_bitwise_equal(out["w2"], ref.w2(experts, tp_rank, tp_size), what)
                        if layer.has_bias:
                            assert_bitwise_equal(
                                out["w13_bias"], ref.w13_bias(experts, tp_rank, tp_size), what
                            )
                            assert_bitwise_equal(out["w2_bias"], ref.w2_bias(experts), what)


def test_transposed_groups_transposed_on_the_destination_device(saved_models, monkeypatch):
    """The path CUDA destinations take for transposed groups (stored rows into scratch, a
    few experts at a time, transposed by torch where the destination lives), run on the
    CPU: the same bytes as the model's own experts."""
    import fastmoe_load.loader as loader

    monkeypatch.setattr(loader, "_transposes_on_device", lambda tensor: True)
    monkeypatch.setattr(loader, "TRANSPOSE_SCRATCH_BYTES", 1)  # one expert at a time
    checked = set()
    for (family, _), saved in saved_models.items():
        reference = reference_experts(saved.model, family)
        with fml.open(saved.path) as ckpt:
            for layer in ckpt.moe_layers():
                if not layer.transposed:
                    continue
                checked.add(layer.format)
                ref = reference[layer_index(layer.prefix)]
                for tp_rank, tp_size, experts in ((0, 1, [0, 1, 2, 3, 4]), (1, 2, [4, 2, 2])):
                    n, shard, h = len(experts), layer.intermediate_size // tp_size, 48
                    w13, w2 = poisoned((n, 2 * shard, h)), poisoned((n, h, shard))
                    destinations = loader.plan_destinations(
                        ckpt,
                        layer.prefix,
                        w13,
                        w2,
                        tp_rank=tp_rank,
                        tp_size=tp_size,
                        local_experts=experts,
                    )
                    assert len(destinations) == 2 * n  # one expert per plan
                    assert all(d.stored for d in destinations)
                    loader.fill(ckpt, destinations)
                    what = f"{family} {layer.prefix} tp {tp_rank}/{tp_size}"
                    assert_bitwise_equal(w13, ref.w13(experts, tp_rank, tp_size), what)
                    assert_bitwise_equal(w2, ref.w2(experts, tp_rank, tp_size), what)
    assert checked == {"fused_transposed", "fused_transposed_interleaved"}


@pytest.mark.parametrize(
    ("family", "original"), FORMATS, ids=[f"{f}-{'orig' if o else 'v5'}" for f, o in FORMATS]
)
def test_expert_views_match_model(saved_models, family, original):
    saved = saved_models[family, original]
    reference = reference_experts(saved.model, family)
    with fml.open(saved.path) as ckpt:
        for layer in ckpt.moe_layers():
            assert ckpt.experts(layer.prefix) is layer
            ref = reference[layer_index(layer.prefix)]
            for e in range(layer.num_experts):
                assert_bitwise_equal(layer.w1(e), ref.gate[e])
                assert_bitwise_equal(layer.w3(e), ref.up[e])
                assert_bitwise_equal(layer.w2(e), ref.down[e])
                if layer.has_bias:
                    assert_bitwise_equal(layer.b1(e), ref.gate_bias[e])
                    assert_bitwise_equal(layer.b3(e), ref.up_bias[e])
                    assert_bitwise_equal(layer.b2(e), ref.down_bias[e])


@pytest.mark.parametrize(
    ("family", "original"), FORMATS, ids=[f"{f}-{'orig' if o else 'v5'}" for f, o in FORMATS]
)
def test_matches_seed_path(saved_models, family, original):
    saved = saved_models[family, original]
    with fml.open(saved.path) as ckpt:
        for layer in ckpt.moe_layers():
            for tp_rank, tp_size, experts in ((0, 1, None), (1, 2, [4, 1, 1]), (3, 4, [2, 0])):
                n = layer.num_experts if experts is None else len(experts)
                shard, h = layer.intermediate_size // tp_size, layer.hidden_size
                seed13, seed2 = poisoned((n, 2 * shard, h)), poisoned((n, h, shard))
                seed_load(
                    str(saved.path), layer, seed13, seed2, tp_rank=tp_rank, local_experts=experts
                )
                ours13, ours2 = poisoned((n, 2 * shard, h)), poisoned((n, h, shard))
                fml.load_fused_moe(
                    ckpt,
                    layer.prefix,
                    ours13,
                    ours2,
                    tp_rank=tp_rank,
                    tp_size=tp_size,
                    local_experts=experts,
                )
                assert_bitwise_equal(ours13, seed13, layer.prefix)
                assert_bitwise_equal(ours2, seed2, layer.prefix)
