"""Several GPUs of one host, one process each, launched with torchrun:

    torchrun --nproc-per-node 4 -m fastmoe_load.bench.distributed [--check] [--cold]

Every rank opens the same generated checkpoint and fills its own `w13`/`w2` for each layer:
as a TP rank (`--parallel tp`), as an EP rank with linear or round-robin placement
(`--parallel ep`, `--placement`), or as a data-parallel replica holding every expert
(`--parallel dp`), either reading everything itself or, with `--share`, reading a slice and
exchanging slices with the other replicas over NCCL.

Rank 0 prints the pinned host-to-device rate measured on every GPU at once, each rank's load
rate, the aggregate rate (all bytes landed / slowest rank), the bytes landed in each rank's
parameters and, on a cold run, what `/proc/self/io` says each rank read from disk.
`--check` compares every rank's parameters with a single-process CPU load, bit for bit.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

import fastmoe_load as fml

from .generate import Shape, generate
from .run import drop_page_cache


def _read_bytes() -> int:
    """Bytes this process caused to be read from storage (not from the page cache)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))


def _pinned_rate(device: torch.device, nbytes: int = 1 << 30) -> float:
    host = torch.ones(nbytes, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    rates = []
    for _ in range(4):
        dist.barrier()
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        target.copy_(host, non_blocking=True)
        torch.cuda.synchronize(device)
        rates.append(nbytes / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates[1:])


def _request(shape: Shape, parallel: str, placement: str, rank: int, size: int):
    """(tp_rank, tp_size, experts the rank keeps) of `rank` among `size` ranks. Data-parallel
    replicas keep every expert."""
    if parallel == "tp":
        return rank, size, list(range(shape.experts))
    if parallel == "dp":
        return 0, 1, list(range(shape.experts))
    return 0, 1, fml.expert_placement(shape.experts, size, rank, placement)  # type: ignore[arg-type]


def _load(
    path: str, shape: Shape, device: torch.device, request, share: bool
) -> tuple[list, float, int]:
    """Loads every layer for `request`; returns the destinations, the seconds and the bytes
    landed. With `share`, each rank reads only its slice of the experts and the slices are
    exchanged over NCCL (replicas that read the checkpoint once between them)."""
    tp_rank, tp_size, experts = request
    rank, size = dist.get_rank(), dist.get_world_size()
    n, shard, h = len(experts), shape.intermediate // tp_size, shape.hidden
    dests = [
        (
            torch.empty(n, 2 * shard, h, dtype=torch.bfloat16, device=device),
            torch.empty(n, h, shard, dtype=torch.bfloat16, device=device),
        )
        for _ in range(shape.layers)
    ]
    part = slice(rank * n // size, (rank + 1) * n // size) if share else slice(0, n)
    torch.cuda.synchronize(device)
    dist.barrier()
    start = time.perf_counter()
    total = 0
    with fml.open(path) as ckpt:
        for layer, (w13, w2) in enumerate(dests):
            stats = fml.load_fused_moe(
                ckpt,
                shape.prefix(layer),
                w13[part],
                w2[part],
                tp_rank=tp_rank,
                tp_size=tp_size,
                local_experts=experts[part],
            )
            total += stats.bytes
            if share:
                for t in (w13, w2):
                    dist.all_gather_into_tensor(t, t[part])
    torch.cuda.synchronize(device)
    landed = sum(t.nbytes for pair in dests for t in pair)
    return dests, time.perf_counter() - start, landed if share else total


def _check(path: str, shape: Shape, dests: list, request) -> bool:
    """This rank's parameters against a CPU load of the same request."""
    tp_rank, tp_size, experts = request
    with fml.open(path) as ckpt:
        for layer, (w13, w2) in enumerate(dests):
            cpu13, cpu2 = torch.empty_like(w13, device="cpu"), torch.empty_like(w2, device="cpu")
            fml.load_fused_moe(
                ckpt,
                shape.prefix(layer),
                cpu13,
                cpu2,
                tp_rank=tp_rank,
                tp_size=tp_size,
                local_experts=experts,
            )
            for ours, reference in ((w13, cpu13), (w2, cpu2)):
                if not torch.equal(ours.cpu().view(torch.int16), reference.view(torch.int16)):
                    return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(prog="torchrun ... -m fastmoe_load.bench.distributed")
    parser.add_argument("--parallel", choices=["tp", "ep", "dp"], default="ep")
    parser.add_argument(
        "--share", action="store_true", help="dp: read each expert once, exchange over NCCL"
    )
    parser.add_argument("--placement", choices=["linear", "round_robin"], default="linear")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dir")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--check", action="store_true", help="compare with a CPU load")
    parser.add_argument("--cold", action="store_true", help="empty the page cache first")
    args = parser.parse_args()

    dist.init_process_group("nccl")
    rank, size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    torch.cuda.set_device(device)
    shape = Shape(layers=args.layers)
    path = args.dir or os.path.join(tempfile.gettempdir(), f"fastmoe_bench_{shape.layers}")
    if rank == 0:
        generate(path, shape)
    dist.barrier()

    pinned = _pinned_rate(device)
    request = _request(shape, args.parallel, args.placement, rank, size)
    rows = []
    for run in range(args.repeats + 1):
        if args.cold:
            if rank == 0:
                drop_page_cache()
            dist.barrier()
        before = _read_bytes()
        dests, seconds, nbytes = _load(path, shape, device, request, args.share)
        disk = _read_bytes() - before
        if run:
            rows.append((seconds, nbytes, disk))
    ok = _check(path, shape, dests, request) if args.check else None
    seconds = statistics.median(r[0] for r in rows)
    mine = (pinned, seconds, rows[0][1], statistics.median(r[2] for r in rows), ok)
    gathered: list = [None] * size
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        mode = f"{args.parallel}={size}" + (f" {args.placement}" if args.parallel == "ep" else "")
        mode += " (each expert read once, shared over NCCL)" if args.share else ""
        cache = "cold" if args.cold else "warm"
        print(
            f"{torch.cuda.get_device_name(device)} x {size}, {mode}, {cache} page cache, "
            f"{shape.total_bytes / 1e9:.2f} GB checkpoint"
        )
        print(
            f"{'rank':>4} {'pinned GB/s':>11} {'load GB/s':>9} {'plan bytes':>12} "
            f"{'disk bytes':>12} {'check':>6}"
        )
        for r, (p, s, n, d, good) in enumerate(gathered):
            check = "-" if good is None else "ok" if good else "FAIL"
            print(f"{r:>4} {p:11.2f} {n / s / 1e9:9.2f} {n:12d} {int(d):12d} {check:>6}")
        print(
            "(plan bytes: bytes landed in the rank's parameters; with --share, after the exchange)"
        )
        landed = sum(g[2] for g in gathered)
        slowest = max(g[1] for g in gathered)
        print(
            f"aggregate: {landed / slowest / 1e9:.2f} GB/s "
            f"({landed / 1e9:.2f} GB in {slowest:.3f} s)"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
