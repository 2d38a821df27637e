"""Where the time of a CUDA load goes: the host fill and the host-to-device copy measured
alone, beside the whole pipeline (`bench --explore`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

import fastmoe_load as fml

from ..loader import plan_destinations
from ..staging import DEFAULT_BUFFER_BYTES, DEFAULT_BUFFER_COUNT
from .harness import Bench, Case

Load = Callable[[list[tuple[torch.Tensor, torch.Tensor]]], int]


def _pinned_ring() -> list[torch.Tensor]:
    return [
        torch.empty(DEFAULT_BUFFER_BYTES, dtype=torch.uint8, pin_memory=True)
        for _ in range(DEFAULT_BUFFER_COUNT)
    ]


def fill_only(bench: Bench, case: Case) -> Load:
    """The background fill of every staging window, as the pipeline queues it, with no copy
    to the GPU."""
    ring = _pinned_ring()

    def load(dests: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
        total, k, pending = 0, 0, []
        with fml.open(bench.path, num_threads=bench.threads) as ckpt:
            for layer, (w13, w2) in enumerate(dests):
                for d in plan_destinations(
                    ckpt,
                    bench.shape.prefix(layer),
                    w13,
                    w2,
                    tp_rank=case.tp_rank,
                    tp_size=case.tp_size,
                    local_experts=case.experts(bench.shape.experts),
                ):
                    for start, end in d.plan.windows(DEFAULT_BUFFER_BYTES):
                        if len(pending) == len(ring) - 1:
                            pending.pop(0).wait()
                        buffer = ring[k % len(ring)]
                        pending.append(d.plan.submit(buffer.data_ptr(), start, end, buffer))
                        total, k = total + end - start, k + 1
        for ticket in pending:
            ticket.wait()
        return total

    return load


def copy_only(bench: Bench) -> Load:
    """The pipeline's copies from pinned buffers into the destinations, with no fill."""
    ring = _pinned_ring()
    events = [torch.cuda.Event() for _ in ring]
    stream = torch.cuda.Stream(bench.device)

    def load(dests: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
        k, total = 0, 0
        stream.wait_stream(torch.cuda.current_stream(bench.device))
        for pair in dests:
            for t in pair:
                flat = t.view(-1).view(torch.uint8)
                for start in range(0, flat.numel(), DEFAULT_BUFFER_BYTES):
                    end = min(start + DEFAULT_BUFFER_BYTES, flat.numel())
                    buffer, event = ring[k % len(ring)], events[k % len(ring)]
                    event.synchronize()
                    with torch.cuda.stream(stream):
                        flat[start:end].copy_(buffer[: end - start], non_blocking=True)
                        event.record(stream)
                    k, total = k + 1, total + end - start
        torch.cuda.current_stream(bench.device).wait_stream(stream)
        return total

    return load


def contenders(bench: Bench, case: Case) -> dict[str, Load]:
    runs = {
        "fastmoe_load, timed beside the probes": bench.fastmoe(case),
        "probe: fill only, no copy": fill_only(bench, case),
        "probe: copy only, no fill": copy_only(bench),
        "probe: io=pread": bench.fastmoe(case, io="pread"),
    }
    for size, count in ((16, 8), (64, 3), (128, 4)):
        name = f"probe: staging {size} MiB x {count}"
        runs[name] = bench.fastmoe(case, staging_bytes=size << 20, staging_buffers=count)
    return runs
