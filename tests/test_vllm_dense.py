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

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
vllm = pytest.importorskip("vllm")

from dense_layers import assert_direct_copies_fill_the_same, build_block  # noqa: E402


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
        return build_block(linear, vocab_parallel_embedding, quant)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8-block"])
@pytest.mark.parametrize(("tp_size", "rank"), [(1, 0), (2, 1), (4, 3), (8, 5)])
def test_weight_loaders_fill_the_same_through_direct_copies(
    vllm_process_groups, tmp_path, tp_size, rank, fp8
):
    """At TP=4 and 8 the two k/v heads are replicated across ranks; the vocabulary is
    padded to whole 64-row blocks per rank (the padding zeroed); fp8 block scales are cut
    on their 128-row blocks."""
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    build = lambda: build_layers(tp_size, rank, fp8)  # noqa: E731
    assert_direct_copies_fill_the_same(build, tmp_path, fp8, default_weight_loader)
