"""The background fill that feeds CUDA staging buffers, checked on the CPU: `submit` writes
exactly what `execute` writes, a ticket keeps its buffer alive and waits for the fill when it
is dropped, and errors surface at `wait`."""

from __future__ import annotations

import gc
import os

import fastmoe_load as fml
import pytest
import torch
from safetensors.torch import save_file

P = "model.layers.0.mlp.experts"


@pytest.fixture
def checkpoint(tmp_path):
    g = torch.Generator().manual_seed(3)
    # Rows of 512 KiB, so that plans hold many 1 MiB operations and pread runs.
    tensors = {
        f"{P}.gate_up_proj": torch.randn(6, 16, 262144, generator=g).bfloat16(),
        f"{P}.down_proj": torch.randn(6, 262144, 8, generator=g).bfloat16(),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, path)
    return path


@pytest.mark.parametrize("io", ["mmap", "pread"])
@pytest.mark.parametrize("target", ["w13", "w2"])
def test_submit_writes_what_execute_writes(checkpoint, io, target):
    with fml.open(checkpoint, io=io, num_threads=3) as ckpt:
        plan = ckpt._handle.plan(P, target, tp_rank=1, tp_size=2, experts=[5, 0, 5, 2])
        expected = torch.zeros(plan.nbytes, dtype=torch.uint8)
        plan.execute(expected.data_ptr())
        windows = plan.windows(3 << 20)
        assert len(windows) > 2
        buffers = [torch.full((end - start,), 0xAB, dtype=torch.uint8) for start, end in windows]
        tickets = [
            plan.submit(b.data_ptr(), start, end, b)
            for b, (start, end) in zip(buffers, windows, strict=True)
        ]
        for ticket in tickets:
            ticket.wait()
            ticket.wait()  # a second wait returns at once
        assert torch.equal(torch.cat(buffers), expected)


def test_dropping_a_ticket_waits_for_its_fill(checkpoint):
    with fml.open(checkpoint, num_threads=2) as ckpt:
        plan = ckpt._handle.plan(P, "w13", tp_rank=0, tp_size=1, experts=list(range(6)) * 4)
        expected = torch.zeros(plan.nbytes, dtype=torch.uint8)
        plan.execute(expected.data_ptr())
        buffer = torch.zeros(plan.nbytes, dtype=torch.uint8)
        plan.submit(buffer.data_ptr(), 0, plan.nbytes, buffer)  # dropped at once
        gc.collect()
        assert torch.equal(buffer, expected)


def test_fill_errors_surface_at_wait(checkpoint):
    with fml.open(checkpoint, io="pread", num_threads=2) as ckpt:
        plan = ckpt._handle.plan(P, "w13", tp_rank=0, tp_size=1, experts=[5])
        buffer = torch.zeros(plan.nbytes, dtype=torch.uint8)
        with pytest.raises(ValueError, match="not a window"):
            plan.submit(buffer.data_ptr(), 1, plan.nbytes, buffer)
        os.truncate(checkpoint, 4096)
        with pytest.raises(fml.FileChangedError, match=str(checkpoint)):
            plan.submit(buffer.data_ptr(), 0, plan.nbytes, buffer)
