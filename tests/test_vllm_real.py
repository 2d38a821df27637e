"""The vLLM adapter against vLLM itself: a `FusedMoE` layer (vLLM >= 0.33, built on the CPU)
filled by its own `load_weights` and by `fastmoe_load.vllm.load_fused_moe_layer` from the same
checkpoint, bit for bit, for TP=1, TP rank 1 of 2 and EP rank 1 of 2, per-expert and fused
checkpoints. Skipped where vLLM is not installed (it is not a test dependency: it pins its
own torch)."""

from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import save_file

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
vllm = pytest.importorskip("vllm")

import fastmoe_load as fml  # noqa: E402
from fastmoe_load.vllm import load_fused_moe_layer  # noqa: E402

E, TOP_K, H, INTER = 8, 2, 64, 32
PREFIX = "model.layers.0.mlp.experts"


@contextmanager
def as_tp_rank(rank: int):
    """Builds layers as TP rank `rank` in this one process (loading never communicates)."""
    import vllm.model_executor.layers.fused_moe.config as config

    original = config.get_tensor_model_parallel_rank
    config.get_tensor_model_parallel_rank = lambda: rank
    try:
        yield
    finally:
        config.get_tensor_model_parallel_rank = original


def build(tp_size: int, rank: int, expert_parallel: bool, name: str):
    from vllm.config import ParallelConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.fused_moe import FusedMoEFactory

    config = VllmConfig(parallel_config=ParallelConfig(enable_expert_parallel=expert_parallel))
    with as_tp_rank(rank), set_current_vllm_config(config):
        runner = FusedMoEFactory(
            num_experts=E,
            top_k=TOP_K,
            hidden_size=H,
            intermediate_size=INTER,
            params_dtype=torch.bfloat16,
            tp_size=tp_size,
            prefix=f"{name}.experts",
            renormalize=True,
        )
    for p in (runner.routed_experts.w13_weight, runner.routed_experts.w2_weight):
        p.data.fill_(float("nan"))
    return runner


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    gate = torch.randn(E, INTER, H, generator=g).bfloat16()
    up = torch.randn(E, INTER, H, generator=g).bfloat16()
    down = torch.randn(E, H, INTER, generator=g).bfloat16()
    fused = tmp_path_factory.mktemp("fused") / "model.safetensors"
    save_file(
        {f"{PREFIX}.gate_up_proj": torch.cat([gate, up], 1), f"{PREFIX}.down_proj": down}, fused
    )
    per_expert = tmp_path_factory.mktemp("per_expert") / "model.safetensors"
    tensors = {}
    for e in range(E):
        tensors[f"{PREFIX}.{e}.gate_proj.weight"] = gate[e].contiguous()
        tensors[f"{PREFIX}.{e}.up_proj.weight"] = up[e].contiguous()
        tensors[f"{PREFIX}.{e}.down_proj.weight"] = down[e].contiguous()
    save_file(tensors, per_expert)
    return {"fused": fused, "per_expert": per_expert}


@pytest.mark.parametrize("layout", ["fused", "per_expert"])
@pytest.mark.parametrize(("tp_size", "rank", "ep"), [(1, 0, False), (2, 1, False), (2, 1, True)])
def test_adapter_matches_vllm_load_weights(
    vllm_process_groups, checkpoints, layout, tp_size, rank, ep
):
    path = checkpoints[layout]
    theirs = build(tp_size, rank, ep, f"theirs{tp_size}{rank}{ep}{layout}")
    with fml.open(path) as ckpt:
        names = {n: ckpt.tensor(n) for n in ckpt.keys()}
        loaded = list(
            theirs.load_weights(iter((n[len(PREFIX) + 1 :], t) for n, t in names.items()))
        )
        assert loaded
        ours = build(tp_size, rank, ep, f"ours{tp_size}{rank}{ep}{layout}")
        consumed = load_fused_moe_layer(ours, ckpt, PREFIX)
    assert sorted(consumed) == sorted(names)
    for param in ("w13_weight", "w2_weight"):
        expected = getattr(theirs.routed_experts, param).data
        actual = getattr(ours.routed_experts, param).data
        assert not expected.isnan().any()
        assert torch.equal(actual.view(torch.int16), expected.view(torch.int16)), param
