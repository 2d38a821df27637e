"""CUDA destinations: the same references as on the CPU, through pinned staging buffers and
asynchronous copies; and the stream contract (the caller's stream sees the result)."""

from __future__ import annotations

import fastmoe_load as fml
import pytest
import torch
from conftest import (
    FAMILIES,
    assert_bitwise_equal,
    assert_loads_as,
    layer_index,
    poisoned,
    reference_experts,
)
from fastmoe_load.bench.generate import Shape, generate

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


# (tp_rank, tp_size, local experts)
REQUESTS = [(0, 1, [0, 1, 2, 3, 4]), (1, 2, [4, 2, 2]), (3, 4, [1])]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("original", [True, False], ids=["orig", "v5"])
def test_layers_match_model_on_cuda(saved_models, family, original):
    saved = saved_models[family, original]
    reference = reference_experts(saved.model, family)
    # Tiny buffers so that every layer spans several staging windows.
    with fml.open(saved.path, staging_bytes=1 << 20, staging_buffers=2) as ckpt:
        for layer in ckpt.moe_layers():
            ref = reference[layer_index(layer.prefix)]
            for tp_rank, tp_size, experts in (
                (0, 1, [0, 1, 2, 3, 4]),
                (1, 2, [4, 2, 2]),
                (3, 4, [1]),
            ):
                n, shard, h = len(experts), layer.intermediate_size // tp_size, layer.hidden_size
                w13 = poisoned((n, 2 * shard, h), device="cuda")
                w2 = poisoned((n, h, shard), device="cuda")
                biases = {}
                if layer.has_bias:
                    biases = {
                        "w13_bias": poisoned((n, 2 * shard), device="cuda"),
                        "w2_bias": poisoned((n, h), device="cuda"),
                    }
                fml.load_fused_moe(
                    ckpt,
                    layer.prefix,
                    w13,
                    w2,
                    tp_rank=tp_rank,
                    tp_size=tp_size,
                    local_experts=experts,
                    **biases,
                )
                assert_bitwise_equal(w13, ref.w13(experts, tp_rank, tp_size), layer.prefix)
                assert_bitwise_equal(w2, ref.w2(experts, tp_rank, tp_size), layer.prefix)
                if layer.has_bias:
                    assert_bitwise_equal(
                        biases["w13_bias"], ref.w13_bias(experts, tp_rank, tp_size)
                    )
                    assert_bitwise_equal(biases["w2_bias"], ref.w2_bias(experts))


@pytest.fixture(scope="module")
def big_layer(tmp_path_factory):
    """One Qwen3-30B-A3B-shaped layer (1.2 GB): transfers long enough to expose a race."""
    path = str(tmp_path_factory.mktemp("big"))
    generate(path, Shape(layers=1))
    return path, Shape(layers=1)


def test_caller_stream_sees_result_without_synchronize(big_layer):
    path, shape = big_layer
    prefix = shape.prefix(0)
    with fml.open(path) as ckpt:
        gate_up = ckpt.tensor(f"{prefix}.gate_up_proj")
        down = ckpt.tensor(f"{prefix}.down_proj")
        for stream in (torch.cuda.current_stream(), torch.cuda.Stream()):
            with torch.cuda.stream(stream):
                w13 = poisoned(tuple(gate_up.shape), device="cuda")
                w2 = poisoned(tuple(down.shape), device="cuda")
                fml.load_fused_moe(ckpt, prefix, w13, w2)
                # Enqueued on the caller's stream right away: no synchronize in between.
                copies = (w13.clone(), w2.clone())
            stream.synchronize()
            assert_bitwise_equal(copies[0], gate_up)
            assert_bitwise_equal(copies[1], down)


def test_staging_memory_is_bounded_and_freed_on_close(big_layer):
    path, shape = big_layer
    prefix = shape.prefix(0)
    ckpt = fml.open(path, staging_bytes=8 << 20, staging_buffers=3)
    layer = ckpt.experts(prefix)
    i, h = layer.intermediate_size, layer.hidden_size
    for tp_rank in (0, 1):
        experts = fml.expert_placement(layer.num_experts, 4, 2)
        w13 = poisoned((len(experts), i, h), device="cuda")
        w2 = poisoned((len(experts), h, i // 2), device="cuda")
        stats = fml.load_fused_moe(
            ckpt, prefix, w13, w2, tp_rank=tp_rank, tp_size=2, local_experts=experts
        )
        assert stats.bytes == (w13.numel() + w2.numel()) * 2
        assert ckpt.staging.nbytes == 3 * (8 << 20)
        assert not w13.isnan().any() and not w2.isnan().any()
    ckpt.close()
    assert ckpt.staging.nbytes == 0


def test_cpu_and_cuda_destinations_are_not_mixed(big_layer):
    path, shape = big_layer
    with fml.open(path) as ckpt:
        layer = ckpt.experts(shape.prefix(0))
        w13 = poisoned((1, 2 * layer.intermediate_size, layer.hidden_size), device="cuda")
        w2 = poisoned((1, layer.hidden_size, layer.intermediate_size))
        with pytest.raises(fml.RequestError, match="several devices"):
            fml.load_fused_moe(ckpt, layer.prefix, w13, w2, local_experts=[0])
        assert w13.isnan().all() and w2.isnan().all()


def _quantized(scheme: str, path):
    """A test checkpoint of `scheme` as its releases store it, its experts' prefix, and the
    hand-sliced reference of each destination for `(tp_rank, tp, experts)`."""
    import test_int4
    import test_mxfp4
    import test_nvfp4

    if scheme == "nvfp4":
        path = test_nvfp4.nvfp4_modelopt(path)
        tensors = test_nvfp4.stored(path)
        return path, test_nvfp4.prefix(), lambda *request: test_nvfp4.expected(tensors, *request)
    if scheme == "int4":
        path = test_int4.int4_pack_quantized(path)
        return path, test_int4.prefix(), lambda *request: test_int4.expected(path, *request)
    path = test_mxfp4.gpt_oss_mxfp4(path)
    tensors = test_mxfp4.stored(path)
    return path, test_mxfp4.prefix(), lambda *request: test_mxfp4.expected(tensors, *request)


@pytest.mark.parametrize("scheme", ["nvfp4", "int4", "mxfp4"])
def test_quantized_layers_on_cuda(tmp_path, scheme):
    """Packed weights, their scales (and gpt-oss' biases) through the staging pipeline into
    CUDA destinations, equal to the hand slices the CPU tests check."""
    path, prefix, expected = _quantized(scheme, tmp_path / scheme)
    for tp_rank, tp, experts in ((0, 1, [0, 1, 2, 3]), (1, 2, [3, 1, 3])):
        want = expected(tp_rank, tp, experts)
        if scheme == "int4":  # vLLM keeps the shapes as float32: a conversion on the GPU
            want = {k: v.float() if k.endswith("weight_shape") else v for k, v in want.items()}
        assert_loads_as(
            path,
            prefix,
            want,
            device="cuda",
            open_options={"staging_bytes": 1 << 20, "staging_buffers": 2},
            tp_rank=tp_rank,
            tp_size=tp,
            local_experts=experts,
            allow_cast=scheme == "int4",
        )


def test_weight_loader_copies_land_on_the_device_bit_for_bit(saved_models):
    """`DirectCopies` on a GPU: rank 1 of 2's rows and columns of every 2-D tensor, and
    every other tensor whole, copied from the checkpoint's views into the second half of
    poisoned CUDA tensors as weight loaders copy into a parameter's shard, land through the
    staging pipeline equal to the file's bytes, and nothing else is written."""
    from fastmoe_load.direct_copies import DirectCopies

    saved = saved_models["qwen3_moe", False]
    with fml.open(saved.path, staging_bytes=1 << 20, staging_buffers=2) as ckpt:
        wanted, landed = {}, {}
        with DirectCopies(ckpt, "cuda") as copies:
            for name, view in copies.views(ckpt.keys()):
                parts = [view]
                if view.dim() == 2:
                    rows, cols = view.shape
                    parts = [view[rows // 2 :], view[:, cols // 2 :]]
                for i, part in enumerate(parts):
                    wanted[name, i] = part.clone()
                    landed[name, i] = poisoned((2, *part.shape), part.dtype, "cuda")
                    landed[name, i][1].copy_(part)
        for key, tensor in landed.items():
            assert tensor[0].isnan().all(), key
            assert_bitwise_equal(tensor[1].cpu(), wanted[key], str(key))
        assert copies.copied_bytes == sum(t.nbytes // 2 for t in landed.values())
