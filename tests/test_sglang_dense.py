"""SGLang's own dense layers (attention's fused q/k/v, a fused gate/up, row-parallel, the
vocabulary-parallel embedding and head, replicated), built as a TP rank and filled by their
own weight loaders twice: from tensors in memory, as SGLang's default loader hands them, and
from the checkpoint's views inside `DirectCopies`, as `FastMoeModelLoader` does. Every
parameter must be equal bit for bit, and the copies made by fastmoe_load. Skipped where
SGLang is not installed."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sglang.srt.layers.linear")

from dense_layers import assert_direct_copies_fill_the_same, build_block


def build_layers(tp_size: int, rank: int) -> dict[str, torch.nn.Module]:
    from sglang.srt.layers import linear
    from sglang.srt.layers import vocab_parallel_embedding as embedding
    from sglang.srt.runtime_context import get_context, get_parallel

    ranks = dict(tp_rank=rank, tp_size=tp_size, attn_tp_rank=rank, attn_tp_size=tp_size)
    with get_context().override_server_args(tp_size=tp_size), get_parallel().override(**ranks):
        return build_block(linear, embedding)


@pytest.mark.parametrize(("tp_size", "rank"), [(1, 0), (2, 1), (4, 3), (8, 5)])
def test_weight_loaders_fill_the_same_through_direct_copies(tmp_path, tp_size, rank):
    """At TP=4 and 8 the two k/v heads are replicated across ranks; the vocabulary is
    padded per rank (the padding zeroed)."""
    from sglang.srt.model_loader.weight_utils import default_weight_loader

    build = lambda: build_layers(tp_size, rank)  # noqa: E731
    assert_direct_copies_fill_the_same(build, tmp_path, False, default_weight_loader)
