"""vLLM's own dense layers (attention's fused q/k/v, a fused gate/up, row-parallel, the
vocabulary-parallel embedding and head, replicated; bf16 and fp8 with block scales), built as
a TP rank and filled by their own weight loaders twice: from tensors in memory, as vLLM's
default loader hands them, and from the checkpoint's views inside `DirectCopies`. Every
parameter must be equal bit for bit, and the copies made by fastmoe_load. Skipped where vLLM
is not installed."""

from __future__ import annotations

import os
from contextlib import ExitStack
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from safetensors.torch import save_file

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
vllm = pytest.importorskip("vllm")

import fastmoe_load as fml  # noqa: E402
from fastmoe_load.direct_copies import DirectCopies  # noqa: E402

H, HEAD, HEADS, KV_HEADS, INTER, VOCAB = 256, 128, 8, 2, 1024, 1000


def build_layers(tp_size: int, rank: int, fp8: bool) -> dict[str, torch.nn.Module]:
    """A Llama/Qwen-shaped block of vLLM's layers as TP rank `rank` of `tp_size`, every
    parameter poisoned (NaN, or 0xA5 bytes for fp8)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor import parameter
    from vllm.model_executor.kernels import linear as kernels
    from vllm.model_executor.layers import linear, vocab_parallel_embedding
    from vllm.model_executor.layers.quantization import fp8 as fp8_method
    from vllm.model_executor.layers.quantization.fp8 import Fp8Config
    from vllm.utils.torch_utils import set_default_torch_dtype

    quant = (
        Fp8Config(
            is_checkpoint_fp8_serialized=True,
            activation_scheme="dynamic",
            weight_block_size=[128, 128],
        )
        if fp8
        else None
    )
    with ExitStack() as stack:
        for module in (linear, vocab_parallel_embedding, parameter):
            stack.enter_context(
                mock.patch.object(module, "get_tensor_model_parallel_rank", lambda: rank)
            )
            stack.enter_context(
                mock.patch.object(module, "get_tensor_model_parallel_world_size", lambda: tp_size)
            )
        stack.enter_context(set_current_vllm_config(VllmConfig()))
        # Fp8LinearMethod reads the model's dtype, which a config without a model lacks.
        model = SimpleNamespace(model_config=SimpleNamespace(dtype=torch.bfloat16))
        stack.enter_context(mock.patch.object(fp8_method, "get_current_vllm_config", lambda: model))
        # vLLM's CPU fp8 kernels need AMX tiles; they run no forward pass here.
        supported = mock.patch.object(
            kernels, "is_supported_and_can_implement_kernel", lambda *_: (True, None)
        )
        stack.enter_context(supported)
        stack.enter_context(set_default_torch_dtype(torch.bfloat16))
        layers = {
            "qkv_proj": linear.QKVParallelLinear(
                H, HEAD, HEADS, KV_HEADS, bias=not fp8, quant_config=quant, prefix="qkv_proj"
            ),
            "o_proj": linear.RowParallelLinear(
                HEADS * HEAD, H, bias=False, quant_config=quant, prefix="o_proj"
            ),
            "gate_up_proj": linear.MergedColumnParallelLinear(
                H, [INTER, INTER], bias=False, quant_config=quant, prefix="gate_up_proj"
            ),
            "down_proj": linear.RowParallelLinear(
                INTER, H, bias=False, quant_config=quant, prefix="down_proj"
            ),
            "router": linear.ReplicatedLinear(H, 8, bias=False, prefix="router"),
            "embed_tokens": vocab_parallel_embedding.VocabParallelEmbedding(VOCAB, H),
            "lm_head": vocab_parallel_embedding.ParallelLMHead(VOCAB, H, prefix="lm_head"),
        }
    with torch.no_grad():
        for layer in layers.values():
            for param in layer.parameters():
                if param.is_floating_point() and param.element_size() > 1:
                    param.fill_(float("nan"))
                else:
                    param.view(torch.uint8).fill_(0xA5)
    return layers


# checkpoint tensor -> (layer, parameter, shard id or None), as a model's load_weights maps it
def mapping(fp8: bool) -> dict[str, tuple[str, str, object]]:
    weights = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "o_proj": ("o_proj", None),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
        "down_proj": ("down_proj", None),
    }
    out = {}
    for name, (layer, shard) in weights.items():
        out[f"{name}.weight"] = (layer, "weight", shard)
        if fp8:
            out[f"{name}.weight_scale_inv"] = (layer, "weight_scale_inv", shard)
    if not fp8:
        for name in ("q_proj", "k_proj", "v_proj"):
            out[f"{name}.bias"] = ("qkv_proj", "bias", name[0])
    out["router.weight"] = ("router", "weight", None)
    out["embed_tokens.weight"] = ("embed_tokens", "weight", None)
    out["lm_head.weight"] = ("lm_head", "weight", None)
    return out


def checkpoint(path, fp8: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    shapes = {
        "q_proj": (HEADS * HEAD, H),
        "k_proj": (KV_HEADS * HEAD, H),
        "v_proj": (KV_HEADS * HEAD, H),
        "o_proj": (H, HEADS * HEAD),
        "gate_proj": (INTER, H),
        "up_proj": (INTER, H),
        "down_proj": (H, INTER),
    }
    tensors = {}
    for name, (rows, cols) in shapes.items():
        weight = torch.randn(rows, cols)
        if fp8:
            tensors[f"{name}.weight"] = weight.to(torch.float8_e4m3fn)
            blocks = (-(-rows // 128), -(-cols // 128))
            tensors[f"{name}.weight_scale_inv"] = torch.rand(blocks, dtype=torch.float32)
        else:
            tensors[f"{name}.weight"] = weight.to(torch.bfloat16)
    if not fp8:
        for name in ("q_proj", "k_proj", "v_proj"):
            tensors[f"{name}.bias"] = torch.randn(shapes[name][0], dtype=torch.bfloat16)
    tensors["router.weight"] = torch.randn(8, H, dtype=torch.bfloat16)
    tensors["embed_tokens.weight"] = torch.randn(VOCAB, H, dtype=torch.bfloat16)
    tensors["lm_head.weight"] = torch.randn(VOCAB, H, dtype=torch.bfloat16)
    save_file(tensors, path / "model.safetensors")
    return tensors


def load(layers, tensors, fp8: bool) -> None:
    """What a vLLM model's `load_weights` does with each checkpoint tensor."""
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    for name, loaded in tensors:
        layer, param_name, shard = mapping(fp8)[name]
        param = getattr(layers[layer], param_name)
        weight_loader = getattr(param, "weight_loader", default_weight_loader)
        if shard is None:
            weight_loader(param, loaded)
        else:
            weight_loader(param, loaded, shard)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8-block"])
@pytest.mark.parametrize(("tp_size", "rank"), [(1, 0), (2, 1), (4, 3), (8, 5)])
def test_weight_loaders_fill_the_same_through_direct_copies(
    vllm_process_groups, tmp_path, tp_size, rank, fp8
):
    """At TP=4 and 8 the two k/v heads are replicated across ranks; the vocabulary is
    padded to whole 64-row blocks per rank (the padding zeroed); fp8 block scales are cut
    on their 128-row blocks."""
    tensors = checkpoint(tmp_path, fp8)
    theirs = build_layers(tp_size, rank, fp8)
    ours = build_layers(tp_size, rank, fp8)
    load(theirs, ((name, tensor.clone()) for name, tensor in tensors.items()), fp8)
    with fml.open(tmp_path) as ckpt:
        with DirectCopies(ckpt, "cpu") as copies:
            load(ours, copies.views(tensors), fp8)
    for layer, module in theirs.items():
        for name, expected in module.named_parameters():
            actual = ours[layer].get_parameter(name)
            assert actual.shape == expected.shape, (layer, name)
            assert torch.equal(actual.view(torch.uint8), expected.view(torch.uint8)), (layer, name)
    # Each tensor's one copy was made by fastmoe_load, none by torch one at a time.
    assert copies.copies_made == len(tensors)
