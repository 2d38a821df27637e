"""`python -m fastmoe_load bench`: fastmoe_load beside pure-Python loading and, on a GPU, the
peer loaders, in one run.

Every row loads the same generated checkpoint (warm in the page cache, or emptied before every
run with --cold) into vLLM-layout `w13`/`w2` destinations and reports the median of several
runs. GB/s counts the bytes that land in the destinations. fastmoe_load and the seed path
reopen the checkpoint on every run, so each run pays for its own mapping and page faults, as a
real load does. Where peers are installed (GPU only), a second table follows: each of them
loading TP and EP ranks as vLLM uses it, beside fastmoe_load's load of the same ranks
(`peer_ranks`).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace

import torch

from .._text import plural
from .generate import Shape, announce, check_dir, claim, default_dir, generate, generated, remove
from .harness import (
    CPU_CASES,
    CUDA_CASES,
    Bench,
    describe_machine,
    drop_page_cache,
    legend,
    safetensors_load_file,
)
from .seed import shard_of_tensors


def default_layers(device: torch.device, layer_bytes: int) -> int:
    if device.type == "cuda":
        return 8  # 9.66 GB with Qwen3-30B-A3B's experts, the size of the reference measurements
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(1, min(8, ram // 8 // layer_bytes))


def main(
    device: str = "cpu",
    layers: int | None = None,
    directory: str | None = None,
    repeats: int | None = None,
    threads: int | None = None,
    explore: bool = False,
    cold: bool = False,
    transposed: bool = False,
    clean: bool = False,
    experts: int | None = None,
    hidden: int | None = None,
    intermediate: int | None = None,
) -> Bench:
    """Generates the checkpoint (Qwen3-30B-A3B's experts unless `experts`, `hidden` or
    `intermediate` say otherwise; `layers` of them, default: sized for the machine) in
    `directory` (default: `default_dir`, reused while the shape matches; removed afterwards
    with `clean`), times every contender and prints the table and its legend."""
    dev = torch.device(device)
    shape = Shape(layers=1, transposed=transposed)
    shape = replace(
        shape,
        experts=experts or shape.experts,
        hidden=hidden or shape.hidden,
        intermediate=intermediate or shape.intermediate,
    )
    shape = replace(shape, layers=layers or default_layers(dev, shape.layer_bytes))
    path = directory or default_dir("fastmoe_bench" + ("_transposed" if transposed else ""))
    check_dir(path)
    with claim(path):  # no other bench writes or removes it meanwhile
        layout = "fused transposed" if transposed else "fused v5"
        announce(
            path,
            f"{plural(shape.layers, 'layer')} of E={shape.experts}, H={shape.hidden}, "
            f"I={shape.intermediate}, bf16, {layout}, {shape.total_bytes / 1e9:.3g} GB",
            generated(path, "experts", asdict(shape)),
            clean,
        )
        if explore and dev.type != "cuda":
            print(
                "--explore: the extra rows time the parts of a CUDA load (the fill of pinned "
                "staging buffers alone, the copies to the GPU alone, other buffer sizes); a CPU "
                "load has no staging, so this run has the usual rows only"
            )
        reference = (
            "disk read" if cold else "pinned host->device" if dev.type == "cuda" else "memcpy"
        )
        try:
            generate(path, shape)
            print(describe_machine(dev, path), flush=True)
            bench = Bench(path, shape, dev, repeats, threads, reference)
            if cold:
                _run_cold(bench)
            elif dev.type == "cuda":
                _run_cuda(bench, explore)
            else:
                _run_cpu(bench)
            ranks = _run_ranks(bench, cold)
            print()
            print(legend(bench, cold, [ranks] if ranks is not None else []))
        finally:
            if clean:
                remove(path)
    return bench


def _run_ranks(bench: Bench, cold: bool) -> Bench | None:
    """The peers' rank rows (`peer_ranks`), each peer in its buffered mode, or cold in its
    O_DIRECT one; on a GPU, a line instead where no peer is installed."""
    from . import peer_ranks, peers

    readers = peers.readers(bench.device, direct=cold)
    if not readers and bench.device.type == "cuda":
        print(
            f"\nno peer installed ({', '.join(peers.PACKAGES)}): no rows of peers loading a rank",
            flush=True,
        )
    return peer_ranks.run(bench, readers, before_each=drop_page_cache if cold else None)


def _run_cold(bench: Bench) -> None:
    """Every run starts from an empty page cache; the disk's own rate (every shard read in
    64 MiB blocks by 16 threads) is measured the same way."""
    files = sorted(set(shard_of_tensors(bench.path).values()))
    block = 64 << 20
    blocks = [(f, at) for f in files for at in range(0, os.path.getsize(f), block)]
    local = threading.local()

    def read(task: tuple[str, int]) -> int:
        file, at = task
        if not hasattr(local, "buffer"):
            local.buffer = bytearray(block)
        fd = os.open(file, os.O_RDONLY)
        try:
            return os.preadv(fd, [local.buffer], at)
        finally:
            os.close(fd)

    def disk_read(_dests: list) -> int:
        with ThreadPoolExecutor(16) as pool:
            return sum(pool.map(read, blocks))

    full = CUDA_CASES[0] if bench.device.type == "cuda" else CPU_CASES[0]
    contenders = {
        "disk read (64 MiB blocks, 16 threads)": disk_read,
        "fastmoe_load": bench.fastmoe(full),
        "fastmoe_load (prefetch=True)": bench.fastmoe(full, prefetch=True),
        "fastmoe_load (io=pread)": bench.fastmoe(full, io="pread"),
        "fastmoe_load (io=pread, prefetch=True)": bench.fastmoe(full, io="pread", prefetch=True),
        "seed: vLLM per-expert loop": bench.seed(full),
    }
    bench.compare(full, contenders, before_each=drop_page_cache)


def _run_cpu(bench: Bench) -> None:
    for case in CPU_CASES:
        for touched in (False, True):
            contenders = {
                "fastmoe_load": bench.fastmoe(case),
                "fastmoe_load (io=pread)": bench.fastmoe(case, io="pread"),
                "seed: vLLM per-expert loop": bench.seed(case),
                "memcpy, 1 thread": bench.memcpy(),
            }
            bench.compare(case, contenders, touched)


def _run_cuda(bench: Bench, explore: bool) -> None:
    from . import peers

    bench.link_rate(pinned=True)
    bench.link_rate(pinned=False)
    full = CUDA_CASES[0]
    for case in CUDA_CASES:
        contenders = {
            "fastmoe_load": bench.fastmoe(case),
            "seed: vLLM per-expert loop": bench.seed(case),
        }
        if case == full:
            contenders["one pageable copy_ per fused tensor"] = bench.pageable_per_tensor()
            contenders["Python pinned double buffer (2x256 MiB)"] = bench.python_double_buffer()
        bench.compare(case, contenders)
    # Loaders of whole files into tensors of their own, each with the GPU to itself.
    whole = {"safetensors load_file(device=cuda)": bench.whole_files(safetensors_load_file)}
    for name, load in peers.available().items():
        whole[name] = bench.whole_files(load)
    bench.compare(full, whole, own_memory=True)
    if explore:
        from . import probe

        for case in CUDA_CASES:
            bench.compare(case, probe.contenders(bench, case))
