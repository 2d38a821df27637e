"""The staging pipeline's bookkeeping, checked on the CPU with a stand-in for CUDA streams
and events: windows of many destinations (small ones sharing a buffer) land where they
belong, a buffer is never refilled before its transfers were queued, and progress counts
every byte. (The real asynchronous copies are covered by the GPU tests.)"""

from __future__ import annotations

import contextlib

import fastmoe_load as fml
import pytest
import torch
from fastmoe_load.loader import Destination
from fastmoe_load.staging import StagingPool
from safetensors.torch import save_file


class FakeEvent:
    """Fails if its buffer is handed out again before the transfer that reads it."""

    def __init__(self) -> None:
        self.state = "free"

    def synchronize(self) -> None:  # called when the pool hands the buffer out
        assert self.state in ("free", "transferred"), "buffer reused before its transfer"
        self.state = "filling"

    def record(self, stream: object) -> None:  # called once the buffer's copies are queued
        assert self.state == "filling"
        self.state = "transferred"


class FakeStream:
    def __init__(self, *args: object) -> None:
        pass

    def wait_stream(self, other: object) -> None:
        pass


@pytest.fixture
def fake_cuda(monkeypatch):
    empty = torch.empty

    def unpinned(*args, pin_memory=False, **kwargs):
        return empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", unpinned)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: None)


class Counter:
    def __init__(self) -> None:
        self.bytes = 0

    def advance(self, nbytes: int) -> None:
        self.bytes += nbytes


def test_windows_of_many_destinations_land_in_place(tmp_path, fake_cuda):
    g = torch.Generator().manual_seed(5)
    # Sizes around the 1 MiB buffer: many small tensors share buffers, large ones span several.
    sizes = [7, 4096, 300_000, 1, 2_500_000, 65_536, 900_000, 13, 1_048_576]
    tensors = {
        f"t{i}": torch.randint(0, 255, (n,), dtype=torch.uint8, generator=g)
        for i, n in enumerate(sizes)
    }
    save_file(tensors, tmp_path / "model.safetensors")
    pool = StagingPool(buffer_bytes=1 << 20, count=3)
    progress = Counter()
    with fml.open(tmp_path / "model.safetensors") as ckpt:
        destinations = [
            Destination(name, torch.zeros_like(t), ckpt._handle.tensor_plan(name))
            for name, t in tensors.items()
        ]
        pool.fill(destinations, progress)
    for d in destinations:
        assert torch.equal(d.tensor, tensors[d.name]), d.name
    assert progress.bytes == sum(sizes)
    assert pool.nbytes == 3 << 20
    pool.close()
    assert pool.nbytes == 0
