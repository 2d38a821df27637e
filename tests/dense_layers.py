"""Engine-neutral parts of the dense weight-loader tests (`test_vllm_dense.py`,
`test_sglang_dense.py`): a checkpoint of a Llama/Qwen-shaped block's dense tensors, what a
model's `load_weights` does with each, and the comparison of the engine's layers filled from
tensors in memory with the same layers filled from the checkpoint inside `DirectCopies`."""

from __future__ import annotations

from collections.abc import Callable

import fastmoe_load as fml
import torch
from fastmoe_load.direct_copies import DirectCopies
from safetensors.torch import save_file

H, HEAD, HEADS, KV_HEADS, INTER, VOCAB = 256, 128, 8, 2, 1024, 1000


def build_block(linear, embedding, quant_config=None) -> dict[str, torch.nn.Module]:
    """A Llama/Qwen-shaped block of an engine's own layers, from its `linear` and
    `vocab_parallel_embedding` modules (vLLM's and SGLang's share their classes' names and
    arguments), bfloat16, every parameter poisoned; `quant_config` quantizes the linear
    layers but the router. Built as the TP rank the engine's parallel state says."""
    options = {"params_dtype": torch.bfloat16}
    quantized = {**options, "quant_config": quant_config} if quant_config else options
    return poison(
        {
            "qkv_proj": linear.QKVParallelLinear(
                H, HEAD, HEADS, KV_HEADS, bias=quant_config is None, **quantized
            ),
            "o_proj": linear.RowParallelLinear(HEADS * HEAD, H, bias=False, **quantized),
            "gate_up_proj": linear.MergedColumnParallelLinear(
                H, [INTER, INTER], bias=False, **quantized
            ),
            "down_proj": linear.RowParallelLinear(INTER, H, bias=False, **quantized),
            "router": linear.ReplicatedLinear(H, 8, bias=False, **options),
            "embed_tokens": embedding.VocabParallelEmbedding(VOCAB, H, **options),
            "lm_head": embedding.ParallelLMHead(VOCAB, H, **options),
        }
    )


def poison(layers: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    """Every parameter NaN, or 0xA5 bytes where it holds one-byte values."""
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


def load(layers, tensors, fp8: bool, default_weight_loader: Callable) -> None:
    """What a model's `load_weights` does with each checkpoint tensor."""
    for name, loaded in tensors:
        layer, param_name, shard = mapping(fp8)[name]
        param = getattr(layers[layer], param_name)
        weight_loader = getattr(param, "weight_loader", default_weight_loader)
        if shard is None:
            weight_loader(param, loaded)
        else:
            weight_loader(param, loaded, shard)


def assert_direct_copies_fill_the_same(
    build: Callable[[], dict[str, torch.nn.Module]],
    path,
    fp8: bool,
    default_weight_loader: Callable,
) -> None:
    """Two sets of `build()`'s layers, one filled from tensors in memory, as an engine's
    default loader hands them, one from the checkpoint's views inside `DirectCopies`: every
    parameter equal bit for bit, and each tensor's one copy made by fastmoe_load."""
    tensors = checkpoint(path, fp8)
    theirs, ours = build(), build()
    copied = ((name, tensor.clone()) for name, tensor in tensors.items())
    load(theirs, copied, fp8, default_weight_loader)
    with fml.open(path) as ckpt:
        with DirectCopies(ckpt, "cpu") as copies:
            load(ours, copies.views(tensors), fp8, default_weight_loader)
    for layer, module in theirs.items():
        for name, expected in module.named_parameters():
            actual = ours[layer].get_parameter(name)
            assert actual.shape == expected.shape, (layer, name)
            assert torch.equal(actual.view(torch.uint8), expected.view(torch.uint8)), (layer, name)
    assert copies.copies_made == len(tensors)
