"""`python -m fastmoe_load bench --model`: a whole transformers model, filled by `load_model`
beside `AutoModelForCausalLM.from_pretrained` of the same checkpoint, in one run."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

import fastmoe_load as fml

from .._text import plural
from .generate import (
    announce,
    check_dir,
    claim,
    default_dir,
    finish,
    generated,
    prepare,
    remove,
)


def qwen3_moe_config(
    layers: int,
    experts: int | None = None,
    hidden: int | None = None,
    intermediate: int | None = None,
):
    """Qwen3-30B-A3B's shapes with fewer layers and a smaller vocabulary; `experts`,
    `hidden` and `intermediate` (each expert's) replace its 128, 2048 and 768."""
    from transformers import AutoConfig

    experts = experts or 128
    return AutoConfig.for_model(
        "qwen3_moe",
        hidden_size=hidden or 2048,
        intermediate_size=6144,
        moe_intermediate_size=intermediate or 768,
        num_experts=experts,
        num_experts_per_tok=min(8, experts),
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        vocab_size=32000,
    )


def _description(config) -> dict:
    return json.loads(config.to_json_string())


def save_random_model(path: str, config) -> bool:
    """A model of `config` with random weights (every one, norms too, so that a wrong slice
    shows), saved by transformers in its default format (one tensor per expert), unless the
    same one is in `path` already (see `generate.prepare`: only a new, empty or bench
    directory is written to). Returns whether it was there."""
    from transformers import AutoModelForCausalLM

    # Taken before the model is built: building it adds to `config` (its dtype and
    # architectures), and the marker must say what `generated` is asked of later runs.
    description = _description(config)
    if prepare(path, "model", description):
        return True
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02, generator=generator)
    model.save_pretrained(path)
    finish(path, "model", description)
    return False


@contextlib.contextmanager
def model_checkpoint(
    path: str,
    config,
    what: str,
    clean: bool,
    save: Callable[[str, Any], bool] = save_random_model,
) -> Iterator[None]:
    """Holds directory `path` for the block (`claim`: no other bench writes or removes it
    meanwhile) with the model checkpoint of `config` in it, written by `save` unless it is
    there already (said, with `what`), and removed afterwards with `clean`. Raises
    `RequestError` for a path `check_dir` refuses."""
    check_dir(path)
    with claim(path):
        reused = generated(path, "model", _description(config))
        announce(path, what, reused, clean)
        try:
            save(path, config)
            yield
        finally:
            if clean:
                remove(path)


def main(
    device: str, layers: int, directory: str | None, repeats: int, clean: bool = False
) -> None:
    """Generates the model's checkpoint in `directory` (default: `default_dir`, reused while
    the shape matches; removed afterwards with `clean`) and prints the comparison."""
    config = qwen3_moe_config(layers)
    path = directory or default_dir("fastmoe_model_bench")
    with model_checkpoint(path, config, f"Qwen3-MoE shapes, {plural(layers, 'layer')}", clean):
        _compare(path, torch.device(device), repeats)
        _compare_dense(path, torch.device(device), repeats)


def _compare(path: str, target: torch.device, repeats: int) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    size = sum(
        os.path.getsize(os.path.join(path, f))
        for f in os.listdir(path)
        if f.endswith(".safetensors")
    )
    print(f"{size / 1e9:.2f} GB of safetensors, loaded {repeats} times each (median)")

    def with_from_pretrained() -> torch.nn.Module:
        # transformers loads to the CPU by default; other devices go through `device_map`.
        placement = {} if target.type == "cpu" else {"device_map": str(target)}
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **placement)

    fills: list[float] = []  # load_model's own figure: the pipeline alone, no allocation

    def with_load_model() -> torch.nn.Module:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(path), dtype=torch.bfloat16
            )
        report = fml.load_model(model, path, device=target, strict=True)
        fills.append(report.seconds)
        return model

    loaders = {"from_pretrained": with_from_pretrained, "load_model": with_load_model}
    times = _round_robin(loaders, repeats, target)
    base = statistics.median(times["from_pretrained"])
    print(f"{'path':<36} {'seconds':>8} {'GB/s':>7} {'x from_pretrained':>18}")
    times["load_model, fill alone"] = fills[1:]  # the warm-up's is left out, as above
    for name, seconds in times.items():
        median = statistics.median(seconds)
        print(f"{name:<36} {median:8.3f} {size / median / 1e9:7.2f} {base / median:18.2f}")
    print(
        "fill alone: every tensor, dense and experts, through one pipeline into memory "
        "allocated beforehand (the model built on the meta device, then placed)"
    )


def _compare_dense(path: str, target: torch.device, repeats: int) -> None:
    """A TP rank's share of the model's dense tensors (everything but the routed experts:
    see `_rank_share`), copied from the checkpoint's views into parameters allocated and
    written once beforehand: one `copy_` at a time, as an engine's weight loaders copy under
    its default loader, and inside `DirectCopies`, as under fastmoe_load's loaders."""
    with fml.open(path) as ckpt:
        experts = {name for layer in ckpt.moe_layers() for name in layer.tensor_names}
        names = [name for name in ckpt.keys() if name not in experts]
    print(f"\n{'dense tensors of a rank':<36} {'seconds':>8} {'GB/s':>7} {'x copy_':>8}")
    for tp, rank in ((1, 0), (8, 1)):
        nbytes, times = _time_dense(path, names, target, tp, rank, repeats)
        base = statistics.median(times["copy_, one at a time"])
        for name, seconds in times.items():
            median = statistics.median(seconds)
            label = f"TP={tp} r{rank}: {name}" if tp > 1 else f"TP=1: {name}"
            print(f"{label:<36} {median:8.3f} {nbytes / median / 1e9:7.2f} {base / median:8.2f}")
    print(
        "dense tensors of a rank: rows of each matrix as a column-parallel weight loader "
        "narrows them, the rest whole, into parameters written before; copy_ is what an "
        "engine's weight loaders do with checkpoint views under its default loader"
    )


def _rank_share(view: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """Rows `rank` of `tp` of a matrix, as a column-parallel weight loader narrows it;
    anything else whole."""
    if view.dim() == 2 and view.shape[0] % tp == 0:
        rows = view.shape[0] // tp
        return view.narrow(0, rank * rows, rows)
    return view


def _time_dense(
    path: str, names: list[str], target: torch.device, tp: int, rank: int, repeats: int
) -> tuple[int, dict[str, list[float]]]:
    """The bytes of the rank's share of tensors `names`, and the seconds of each timed run
    of each way of copying it, round-robin after one warm-up run each; the bytes landed are
    checked against the file's."""
    from ..direct_copies import DirectCopies

    with fml.open(path) as ckpt:
        params = [
            torch.zeros_like(_rank_share(ckpt.tensor(n), tp, rank), device=target) for n in names
        ]

    def one_at_a_time() -> None:
        with fml.open(path) as ckpt:
            for param, name in zip(params, names, strict=True):
                param.copy_(_rank_share(ckpt.tensor(name), tp, rank))

    def direct() -> None:
        with fml.open(path) as ckpt, DirectCopies(ckpt, target) as copies:
            for param, (_, view) in zip(params, copies.views(names), strict=True):
                param.copy_(_rank_share(view, tp, rank))

    times = _round_robin(
        {"copy_, one at a time": one_at_a_time, "DirectCopies": direct}, repeats, target
    )
    for param in params:  # once more into poisoned parameters, checked against the file
        param.view(torch.uint8).fill_(0xA5)
    direct()
    with fml.open(path) as ckpt:
        for param, name in zip(params, names, strict=True):
            share = _rank_share(ckpt.tensor(name), tp, rank)
            if not torch.equal(param.cpu().view(torch.uint8), share.view(torch.uint8)):
                raise AssertionError(f"{path}: DirectCopies landed other bytes for `{name}`")
    return sum(p.nbytes for p in params), times


def _round_robin(
    loads: dict[str, Callable[[], object]], repeats: int, target: torch.device
) -> dict[str, list[float]]:
    """The seconds of each of `repeats` timed runs of each load, round-robin after one
    warm-up run each, the device synchronized around each; what a load returns is let go
    outside its timing."""

    def sync() -> None:
        if target.type == "cuda":
            torch.cuda.synchronize(target)

    times: dict[str, list[float]] = {name: [] for name in loads}
    for run in range(repeats + 1):
        for name, load in loads.items():
            sync()
            start = time.perf_counter()
            result = load()
            sync()
            if run:
                times[name].append(time.perf_counter() - start)
            del result
    return times
