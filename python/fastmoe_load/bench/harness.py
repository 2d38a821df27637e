"""What every bench table is made of: the cases a rank loads, the timed rows, the contenders
that fill vLLM-layout destinations (fastmoe_load, the seed path, plain copies), and the table
and its legend."""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import platform
import statistics
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

import fastmoe_load as fml

from .._text import plural
from .generate import Shape
from .seed import seed_load, shard_of_tensors


@dataclass(frozen=True)
class Case:
    """Which part of every layer a rank loads."""

    label: str
    tp_rank: int = 0
    tp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    # How the engine splits a share that cuts the scale blocks (vLLM's ways, see
    # `engines.vllm`): "blocks" (gpt-oss: whole 32-value blocks, the last rank short),
    # "refined" (fp8: a finer scale grid) or "padded" (fp8: whole 128-blocks a rank).
    split: str | None = None

    def experts(self, num_experts: int) -> list[int]:
        return fml.expert_placement(num_experts, self.ep_size, self.ep_rank)


CPU_CASES = [Case("TP=1"), Case("TP=2 rank 1", tp_rank=1, tp_size=2)]
CUDA_CASES = [*CPU_CASES, Case("EP=4 rank 1", ep_rank=1, ep_size=4)]


# A row's figure is rough (marked `~`) with fewer timed runs than this, or when its runs
# spread by more than ROUGH_SPREAD of their median ((max - min) / median): on a busy machine
# one run can land anywhere, and a ratio between two such rows means little.
MIN_RUNS = 3
ROUGH_SPREAD = 0.25
# Timed runs a row gets when --repeats is not given: on a CPU, enough that the fastest row
# of a group is timed for MIN_ROW_SECONDS in all (short runs are the noisy ones), between
# DEFAULT_REPEATS and MAX_REPEATS, and no more than GROUP_SECONDS for the whole group.
DEFAULT_REPEATS = 5
MAX_REPEATS = 25
MIN_ROW_SECONDS = 2.0
GROUP_SECONDS = 60.0


def auto_repeats(warm_up_seconds: list[float]) -> int:
    """Timed runs for a group of rows whose warm-up runs took `warm_up_seconds` each."""
    fastest, group = max(min(warm_up_seconds), 1e-6), max(sum(warm_up_seconds), 1e-6)
    wanted = math.ceil(MIN_ROW_SECONDS / fastest)
    affordable = math.floor(GROUP_SECONDS / group)
    return max(DEFAULT_REPEATS, min(wanted, affordable, MAX_REPEATS))


@dataclass
class Row:
    path: str
    case: str
    destination: str
    seconds: list[float] = field(default_factory=list)
    nbytes: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """(max - min) / median of the timed runs."""
        return (max(self.seconds) - min(self.seconds)) / self.median

    @property
    def rough(self) -> bool:
        """Whether the figure is too noisy to mean much (see MIN_RUNS, ROUGH_SPREAD)."""
        return len(self.seconds) < MIN_RUNS or self.spread > ROUGH_SPREAD

    @property
    def gb_per_s(self) -> float:
        return self.nbytes / self.median / 1e9


@dataclass
class Bench:
    """One run of the comparison: every measured row is printed once, as a line of the
    table, as soon as its group of contenders is done."""

    path: str
    shape: Shape
    device: torch.device
    # Timed runs a row; None: DEFAULT_REPEATS on a GPU, `auto_repeats` on a CPU.
    repeats: int | None
    threads: int | None
    # The row label (its start) of the machine's limit the last column divides by.
    reference: str
    rows: list[Row] = field(default_factory=list)
    # Set for a table printed after another: a blank line and this line come before its
    # header (the rough note is said once, before the first).
    title: str | None = None

    def add(self, rows: list[Row]) -> None:
        if not self.rows:
            note = rough_note(self) if self.title is None else f"\n{self.title}"
            if note is not None:
                print(note, flush=True)
            print(table_header(self.reference), flush=True)
        self.rows.extend(rows)
        for row in rows:
            print(table_line(row, self.rows, self.reference), flush=True)

    # -- destinations -------------------------------------------------------------------

    def destinations(self, case: Case, touched: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        s = self.shape
        n, shard = len(case.experts(s.experts)), s.intermediate // case.tp_size
        out = []
        for _ in range(s.layers):
            w13 = torch.empty((n, 2 * shard, s.hidden), dtype=torch.bfloat16, device=self.device)
            w2 = torch.empty((n, s.hidden, shard), dtype=torch.bfloat16, device=self.device)
            if touched:
                w13.zero_(), w2.zero_()
            out.append((w13, w2))
        return out

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def compare(
        self,
        case: Case,
        contenders: dict[str, Callable[[list[tuple[torch.Tensor, torch.Tensor]]], int]],
        touched: bool = True,
        own_memory: bool = False,
        before_each: Callable[[], None] | None = None,
    ) -> None:
        """Times each `load(destinations) -> bytes landed`, round-robin over the contenders
        so that drift of the machine spreads over all of them, after one warm-up run each.
        Each run gets fresh destinations, unless `touched`: then one set, allocated and
        written once, serves every run (each run overwrites all of it). Contenders that
        allocate `own_memory` get no destinations, and the device's cache is emptied
        between them, so that each has the whole GPU. `before_each` runs before every timed
        run (outside the timing)."""
        destination = "own tensors" if own_memory else "pre-touched" if touched else "fresh"
        rows = {name: Row(name, case.label, destination) for name in contenders}
        kept = [] if own_memory else self.destinations(case, True) if touched else None
        warm_up: list[float] = []
        runs = 1 + (self.repeats or DEFAULT_REPEATS)
        run = 0
        while run < runs:
            for name, load in contenders.items():
                if own_memory and self.device.type == "cuda":
                    torch.cuda.empty_cache()
                current = kept if kept is not None else self.destinations(case, False)
                if before_each is not None:
                    before_each()
                self.sync()
                start = time.perf_counter()
                rows[name].nbytes = load(current)
                self.sync()
                if run:
                    rows[name].seconds.append(time.perf_counter() - start)
                else:
                    warm_up.append(time.perf_counter() - start)
                del current
            if run == 0 and self.repeats is None and self.device.type != "cuda":
                runs = 1 + auto_repeats(warm_up)
            run += 1
        self.add(list(rows.values()))

    # -- contenders ---------------------------------------------------------------------

    # A layer's destinations are `(w13, w2)`, or `(w13, w2, scales)` for quantized experts
    # (scales by vLLM parameter name); fastmoe_load and the seed path take both.

    # Whether the destinations keep gate and up interleaved (vLLM's gpt-oss layers).
    w13_interleaved = False
    # Whether the destinations keep each expert input-first (vLLM's GPTQ and AWQ methods).
    k_first = False

    def fastmoe(self, case: Case, **open_args: Any) -> Callable[[list], int]:
        open_args = {"num_threads": self.threads, **open_args}

        def load(dests: list[tuple]) -> int:
            total = 0
            with fml.open(self.path, **open_args) as ckpt:
                for layer, (w13, w2, *scales) in enumerate(dests):
                    stats = fml.load_fused_moe(
                        ckpt,
                        self.shape.prefix(layer),
                        w13,
                        w2,
                        tp_rank=case.tp_rank,
                        tp_size=case.tp_size,
                        local_experts=case.experts(self.shape.experts),
                        scales=scales[0] if scales else None,
                        w13_interleaved=self.w13_interleaved,
                        k_first=self.k_first,
                    )
                    total += stats.bytes
            return total

        return load

    def seed(self, case: Case, **options: Any) -> Callable[[list], int]:
        """vLLM's pure-Python loop (`seed_load`, given `options` besides the case's)."""
        with fml.open(self.path) as ckpt:  # only for the layer descriptions
            layers = ckpt.moe_layers()

        def load(dests: list[tuple]) -> int:
            where = shard_of_tensors(self.path)
            for layer, (w13, w2, *scales) in zip(layers, dests, strict=True):
                seed_load(
                    self.path,
                    layer,
                    w13,
                    w2,
                    tp_rank=case.tp_rank,
                    tp_size=case.tp_size,
                    local_experts=case.experts(self.shape.experts),
                    where=where,
                    scales=scales[0] if scales else None,
                    k_first=self.k_first,
                    **options,
                )
            return landed_bytes(dests)

        return load

    def memcpy(self) -> Callable[[list], int]:
        """One single-threaded memcpy per destination, of as many bytes, out of a fresh
        mapping of the layer's shard: the speed of one core copying warm data."""
        files = sorted(set(shard_of_tensors(self.path).values()))

        def load(dests: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
            total = 0
            for file, pair in zip(files, dests, strict=True):
                with open(file, "rb") as f:
                    offset = 8 + int.from_bytes(f.read(8), "little")
                    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mapping:
                        source = torch.frombuffer(mapping, dtype=torch.uint8)
                        for t in pair:
                            n = t.numel() * t.element_size()
                            ctypes.memmove(t.data_ptr(), source.data_ptr() + offset, n)
                            offset, total = offset + n, total + n
                        del source
            return total

        return load

    def pageable_per_tensor(self) -> Callable[[list], int]:
        """One `copy_` of each whole fused tensor, from its (pageable) mapping."""

        def load(dests: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
            with fml.open(self.path) as ckpt:
                for layer, (w13, w2) in enumerate(dests):
                    prefix = self.shape.prefix(layer)
                    w13.copy_(ckpt.tensor(f"{prefix}.gate_up_proj"))
                    w2.copy_(ckpt.tensor(f"{prefix}.down_proj"))
            return landed_bytes(dests)

        return load

    def python_double_buffer(self, chunk: int = 256 << 20) -> Callable[[list], int]:
        """What a careful Python loader does: two pinned buffers, torch `copy_` into one
        while the other is transferred asynchronously."""
        buffers = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        events = [torch.cuda.Event() for _ in range(2)]
        stream = torch.cuda.Stream(self.device)

        def load(dests: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
            k = 0
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with fml.open(self.path) as ckpt:
                for layer, (w13, w2) in enumerate(dests):
                    prefix = self.shape.prefix(layer)
                    for name, dst in (("gate_up_proj", w13), ("down_proj", w2)):
                        src = ckpt.tensor(f"{prefix}.{name}").reshape(-1).view(torch.uint8)
                        out = dst.view(-1).view(torch.uint8)
                        for a in range(0, src.numel(), chunk):
                            b = min(a + chunk, src.numel())
                            buffer, event = buffers[k % 2], events[k % 2]
                            event.synchronize()
                            buffer[: b - a].copy_(src[a:b])
                            with torch.cuda.stream(stream):
                                out[a:b].copy_(buffer[: b - a], non_blocking=True)
                                event.record(stream)
                            k += 1
            torch.cuda.current_stream(self.device).wait_stream(stream)
            return landed_bytes(dests)

        return load

    def whole_files(self, loader: Callable[[list[str], torch.device], int]) -> Callable:
        """A loader that reads whole files onto the device (its own tensors)."""
        files = sorted(set(shard_of_tensors(self.path).values()))
        return lambda _dests: loader(files, self.device)

    def link_rate(self, pinned: bool, nbytes: int = 1 << 30) -> Row:
        """Host-to-device copy rate of one `nbytes` buffer."""
        host = torch.ones(nbytes, dtype=torch.uint8, pin_memory=pinned)
        device = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        row = Row(
            f"{'pinned' if pinned else 'pageable'} host->device copy, 1 GiB",
            "-",
            "-",
            nbytes=nbytes,
        )
        for run in range(1 + (self.repeats or DEFAULT_REPEATS)):
            self.sync()
            start = time.perf_counter()
            device.copy_(host, non_blocking=pinned)
            self.sync()
            if run:
                row.seconds.append(time.perf_counter() - start)
        self.add([row])
        return row


def landed_bytes(dests: list[tuple]) -> int:
    """Bytes of every layer's destinations, scales included."""
    return sum(
        t.nbytes
        for w13, w2, *scales in dests
        for t in (w13, w2, *(s for layer in scales for s in layer.values()))
    )


def safetensors_load_file(files: list[str], device: torch.device) -> int:
    from safetensors.torch import load_file

    total = 0
    for file in files:
        tensors = load_file(file, device=str(device))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    torch.cuda.synchronize(device)
    return total


# The rows the last column divides by (by the start of their label): its heading, and what
# it means in the legend.
REFERENCES = {
    "memcpy": ("x memcpy", "one thread's memcpy of as many bytes out of the mapped file"),
    "pinned host->device": (
        "x pinned",
        "the pinned host-to-device copy of 1 GiB: the link's limit",
    ),
    "disk read": (
        "x disk",
        "reading every shard in 64 MiB blocks with 16 threads: the disk's rate",
    ),
    "fastmoe_load": (
        "x fastmoe",
        "fastmoe_load's own load of the same rank, same destination: below 1.00, slower than "
        "fastmoe_load",
    ),
    "fastmoe_load bf16": (
        "x bf16",
        "fastmoe_load's on the bf16 fused checkpoint, same case: the cost of the scales, "
        "per landed byte",
    ),
}


def table_header(reference: str) -> str:
    head = (
        f"{'path':<46} {'case':<12} {'destination':<12} {'GB/s':>7} {'x seed':>7} "
        f"{REFERENCES[reference][0]:>9}"
    )
    return f"{head}\n{'-' * len(head)}"


def table_line(row: Row, rows: list[Row], reference: str) -> str:
    """One row of the table, with its ratios to the seed path and to `reference` measured
    for the same case and destination (or once for all, as the link rates are)."""

    def rate_of(label: str, case: str, destination: str) -> float | None:
        found = [
            r
            for r in rows
            if r.path.startswith(label) and (r.case, r.destination) == (case, destination)
        ]
        return found[0].gb_per_s if found else None

    seed = rate_of("seed", row.case, row.destination) if row.case != "-" else None
    ref = rate_of(reference, row.case, row.destination) or rate_of(reference, "-", "-")
    vs_seed = f"{row.gb_per_s / seed:7.2f}" if seed else f"{'':>7}"
    vs_ref = f"{row.gb_per_s / ref:9.2f}" if ref else f"{'':>9}"
    rate = ("~" if row.rough else "") + f"{row.gb_per_s:.2f}"
    return f"{row.path:<46} {row.case:<12} {row.destination:<12} {rate:>7} {vs_seed} {vs_ref}"


ROUGH = (
    f"~ marks a rough figure, noise more than measurement: fewer than {MIN_RUNS} timed runs, "
    f"or runs more than {ROUGH_SPREAD:.0%} of their median apart (max - min); ratios to it "
    "are as rough. More --repeats, on a quieter machine, firm it up"
)


def _runs(bench: Bench) -> str:
    """How many timed runs the rows had: `5 runs`, `1 run` or `5 to 12 runs` (on a CPU without
    --repeats, enough for the fastest row of each group to be timed for a while)."""
    counts = sorted({len(row.seconds) for row in bench.rows}) or [bench.repeats or 0]
    low, high = counts[0], counts[-1]
    runs = plural(low, "run") if low == high else f"{low} to {high} runs"
    if bench.repeats is None and bench.device.type != "cuda":
        runs += (
            f" (as many as time the fastest row of a group for {MIN_ROW_SECONDS:.0f} s, "
            f"{DEFAULT_REPEATS} to {MAX_REPEATS}; --repeats sets them)"
        )
    return runs


def rough_note(bench: Bench) -> str | None:
    """A line to print before the table when every figure will be rough."""
    if bench.repeats is not None and bench.repeats < MIN_RUNS:
        return (
            f"--repeats {bench.repeats}: {plural(bench.repeats, 'timed run')} a row, so every "
            f"figure below is rough (~); {MIN_RUNS} or more make them mean something"
        )
    return None


def legend(bench: Bench, cold: bool = False, more: Sequence[Bench] = ()) -> str:
    """What the columns of the tables mean, for the rows this run printed: `bench`'s, and
    those of the tables that followed it (`more`)."""
    last_columns = [bench.reference, *(t.reference for t in more)]
    bench = replace(bench, rows=[*bench.rows, *(row for t in more for row in t.rows)])
    cases = {row.case for row in bench.rows}
    destinations = {row.destination for row in bench.rows}
    case = ["TP=2 rank 1 = its half of the intermediate size"]
    if "TP=8 rank 1" in cases:
        case.append("TP=8 rank 1 = its eighth (gate and up rows, down columns)")
    if any(c.startswith("EP=") for c in cases):
        case.append("EP=n rank 1 = the experts placed on rank 1 of n")
    if any(c.endswith((" ref", " pad")) for c in cases):
        case.append(
            "TP=8 r1 ref / pad = rank 1 of 8 where I/8 cuts the 128-blocks, as vLLM serves it: "
            "on a refined scale grid, or padded to whole blocks"
        )
    if "TP=4 rank 3" in cases:
        case.append("TP=4 rank 3 = the last rank of vLLM's gpt-oss split, in whole 32-value blocks")
    kinds = {
        "fresh": "fresh: tensors allocated for each run, whose first write pays the page "
        "faults (as at start-up)",
        "pre-touched": "pre-touched: one set, written once before the timed runs",
        "own tensors": "own tensors: the loader allocates its own",
    }
    cache = "emptied before every run (--cold)" if cold else "warm (the files were just read)"
    path = (
        "what fills the destinations. seed: vLLM's pure-Python loading, the path "
        "fastmoe_load replaces (safetensors get_tensor of each stored tensor, then one "
        "narrow and copy_ per expert and shard)"
    )
    if "fastmoe_load" in last_columns[1:]:
        path += (
            ". In the Ranks table, a peer (InstantTensor, fastsafetensors, Run:ai): its reader "
            "bringing whole files to the device, each tensor handed to vLLM's FusedMoE "
            "weight_loader (the seed's narrow and copy_ per expert and shard, on the device) "
            "and dropped, as vLLM uses the peer's iterator; every rank reads every byte. Each "
            "such row was checked once, outside the timing: its tensors equal fastmoe_load's "
            "bit for bit"
        )
    terms = [
        ("path", path),
        ("case", f"the part of every layer one rank loads: {'; '.join(case)}"),
        ("destination", "; ".join(text for kind, text in kinds.items() if kind in destinations)),
        (
            "GB/s",
            f"bytes landed in the destinations per second, median of {_runs(bench)} after one "
            f"warm-up; page cache {cache}. {ROUGH}",
        ),
        ("x seed", "that rate over the seed path's, same case and destination"),
    ]
    for reference in dict.fromkeys(last_columns):
        column, meaning = REFERENCES[reference]
        terms.append((column, f"that rate over {meaning}"))
    return "\n".join(
        textwrap.fill(text, 96, initial_indent=f"{term:<13}", subsequent_indent=" " * 13)
        for term, text in terms
    )


def describe_machine(device: torch.device, path: str) -> str:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line),
        platform.processor(),
    )
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    line = f"machine: {os.cpu_count()} x {cpu}, {ram:.0f} GiB RAM, torch {torch.__version__}"
    if device.type == "cuda":
        line += f", {torch.cuda.get_device_name(device)}"
    return line + f"; checkpoint on {_filesystem(path)}"


def _filesystem(path: str) -> str:
    """The type of the file system holding `path` (tmpfs, ext4, ...), from /proc/mounts."""
    best, kind = "", "?"
    real = os.path.realpath(path)
    with open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if real.startswith(fields[1]) and len(fields[1]) > len(best):
                best, kind = fields[1], fields[2]
    return kind


def drop_page_cache() -> None:
    """Empties the page cache (root only), so that the next load reads the disk."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
