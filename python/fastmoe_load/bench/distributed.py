"""Several GPUs (or CPU processes) of one host, one process each, launched with torchrun:

    torchrun --nproc-per-node 4 -m fastmoe_load.bench.distributed [--check] [--cold]
    torchrun --nproc-per-node 2 -m fastmoe_load.bench.distributed --device cpu --check
    torchrun --nproc-per-node 2 -m fastmoe_load.bench.distributed --model --check

Rank 0 generates the checkpoint and says where (under $TMPDIR, else /tmp, unless `--dir`);
it is kept for later runs, which reuse it while the shape matches, and `--clean` removes it
afterwards. On CPUs the default number of layers is sized for the machine's memory, as for
`python -m fastmoe_load bench`. A run holds its directory locked: a second bench on the same
directory refuses at once.

Every rank opens the same generated checkpoint and fills its own `w13`/`w2` for each layer:
as a TP rank (`--parallel tp`), as an EP rank with linear or round-robin placement
(`--parallel ep`, `--placement`), or as a data-parallel replica holding every expert
(`--parallel dp`), either reading everything itself or, with `--share`, reading a slice and
exchanging slices with the other replicas (NCCL on GPUs, gloo on CPUs).

With `--model`, rank 0 saves a small random Qwen3-MoE with transformers instead, and every
rank builds that model on the meta device, shaped for its rank, and fills all of it with
`load_model`. The rank's shapes follow vLLM's tensor parallelism, each weight cut evenly along
one dimension (see `_tp_dim`): q/k/v projections, the embedding and the LM head column-parallel
(dim 0), o_proj row-parallel (dim 1), norms and the router replicated; the experts hold rows
`[r*I/tp, (r+1)*I/tp)` of gate and of up and those columns of down. `--parallel tp` cuts dense
weights and experts over all ranks; `--parallel ep` keeps the dense weights whole on every rank
(data-parallel attention) and places the experts; `--parallel tp-ep` (vLLM's expert
parallelism) cuts the dense weights and places whole experts; `--parallel dp` loads the whole
model.

Rank 0 prints the pinned host-to-device rate measured on every GPU at once, each rank's load
rate, the aggregate rate (all bytes landed / slowest rank), the bytes landed in each rank's
parameters and, on a cold run, what `/proc/self/io` says each rank read from disk.
`--check` compares every rank's parameters, bit for bit, with a reference that does not go
through fastmoe_load: the rank's slice, cut in torch, of the checkpoint read by `safetensors`
(or, with `--model`, of the model read by transformers' `from_pretrained`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict

import torch
import torch.distributed as dist
from safetensors import safe_open

import fastmoe_load as fml
from fastmoe_load import FastMoeLoadError

from .._command_line import OneLineParser, check_device, positive_int
from .._text import plural
from .generate import Shape, announce, check_dir, claim, default_dir, generate, generated, remove
from .harness import drop_page_cache
from .model_run import _description, save_random_model
from .run import default_layers

# Layers of the whole model of `--model` unless `--layers` says otherwise: a small one.
MODEL_LAYERS = 8


def _read_bytes() -> int:
    """Bytes this process caused to be read from storage (not from the page cache)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pinned_rate(device: torch.device, nbytes: int = 1 << 30) -> float | None:
    """The pinned host-to-device rate in GB/s, every rank at once; None on CPUs."""
    if device.type != "cuda":
        return None
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


def _bits_equal(ours: torch.Tensor, reference: torch.Tensor) -> bool:
    """Exact comparison that also holds for NaN (bf16 compared as int16)."""
    if ours.shape != reference.shape or ours.dtype != reference.dtype:
        return False
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[ours.element_size()]
    return torch.equal(
        ours.detach().cpu().contiguous().view(as_int), reference.contiguous().view(as_int)
    )


def _rank_experts(
    gate_up: torch.Tensor, down: torch.Tensor, experts: list[int], tp_rank: int, tp_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A rank's `w13 [n, 2I/tp, H]` and `w2 [n, H, I/tp]` cut from the checkpoint's fused
    `gate_up [E, 2I, H]` (gate first) and `down [E, H, I]`."""
    gate, up = gate_up[experts].chunk(2, dim=1)
    shard = gate.shape[1] // tp_size
    rows = slice(tp_rank * shard, (tp_rank + 1) * shard)
    return torch.cat([gate[:, rows], up[:, rows]], dim=1), down[experts][:, :, rows]


# ---- routed experts only, from a generated checkpoint ----------------------------------------


def _request(shape: Shape, parallel: str, placement: str, rank: int, size: int):
    """(tp_rank, tp_size, experts the rank keeps) of `rank` among `size` ranks. Data-parallel
    replicas keep every expert."""
    if parallel == "tp":
        return rank, size, list(range(shape.experts))
    if parallel == "dp":
        return 0, 1, list(range(shape.experts))
    return 0, 1, fml.expert_placement(shape.experts, size, rank, placement)  # type: ignore[arg-type]


def _gather(t: torch.Tensor, part: slice, size: int) -> None:
    """Every rank's `t[part]` into the whole `t` (equal parts, in rank order)."""
    if t.device.type == "cuda":
        dist.all_gather_into_tensor(t, t[part])
    else:  # gloo has no all_gather_into_tensor
        dist.all_gather(list(t.chunk(size)), t[part])


def _load(
    path: str, shape: Shape, device: torch.device, request, share: bool
) -> tuple[list, float, int]:
    """Loads every layer for `request`; returns the destinations, the seconds and the bytes
    landed. With `share`, each rank reads only its slice of the experts and the slices are
    exchanged over the process group (replicas that read the checkpoint once between them)."""
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
    _sync(device)
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
                    _gather(t, part, size)
    _sync(device)
    landed = sum(t.nbytes for pair in dests for t in pair)
    return dests, time.perf_counter() - start, landed if share else total


def _check(path: str, shape: Shape, dests: list, request) -> bool:
    """This rank's parameters against its slice of the checkpoint read by safetensors."""
    tp_rank, tp_size, experts = request
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    for layer, (w13, w2) in enumerate(dests):
        gate_up, down = (f"{shape.prefix(layer)}.{n}" for n in ("gate_up_proj", "down_proj"))
        with safe_open(os.path.join(path, weight_map[gate_up]), "pt") as f:
            reference = _rank_experts(
                f.get_tensor(gate_up), f.get_tensor(down), experts, tp_rank, tp_size
            )
        if not all(_bits_equal(o, r) for o, r in zip((w13, w2), reference, strict=True)):
            return False
    return True


# ---- a whole transformers model ---------------------------------------------------------------


def _model_config(layers: int, experts: int, hidden: int, intermediate: int):
    """A Qwen3-MoE config with small dimensions; heads and vocabulary split over 1, 2, 4 or 8
    ranks."""
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "qwen3_moe",
        hidden_size=hidden,
        intermediate_size=2 * intermediate,
        moe_intermediate_size=intermediate,
        num_experts=experts,
        num_experts_per_tok=min(2, experts),
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        head_dim=max(8, hidden // 8),
        vocab_size=256,
    )


def _tp_dim(name: str) -> int | None:
    """The dimension a dense weight is cut along over TP ranks; None for replicated ones."""
    if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
        return 0  # column-parallel: the rank's heads
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return 0  # vocabulary-parallel
    if name.endswith("o_proj.weight"):
        return 1  # row-parallel
    return None  # norms, the router


def _rank_slice(name: str, full: dict[str, torch.Tensor], request) -> torch.Tensor:
    """The rank's part of weight `name` of the whole model `full`, for `request` =
    ((dense tp_rank, tp_size), (expert tp_rank, tp_size), experts kept)."""
    (tp_rank, tp_size), expert_tp, experts = request
    if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
        module = name.rpartition(".")[0]
        gate_up, down = full[f"{module}.gate_up_proj"], full[f"{module}.down_proj"]
        w13, w2 = _rank_experts(gate_up, down, experts, *expert_tp)
        return w13 if name.endswith("gate_up_proj") else w2
    dim = _tp_dim(name)
    if dim is None or tp_size == 1:
        return full[name]
    return full[name].chunk(tp_size, dim=dim)[tp_rank]


def _model_request(parallel: str, placement: str, rank: int, size: int, experts: int):
    """((dense TP), (expert TP), (EP)) as (rank, size) pairs, and the experts the rank
    keeps. `tp-ep` is vLLM's expert parallelism: attention sliced, experts whole and placed."""
    dense_tp, expert_tp, ep = {
        "tp": ((rank, size), (rank, size), (0, 1)),
        "ep": ((0, 1), (0, 1), (rank, size)),
        "tp-ep": ((rank, size), (0, 1), (rank, size)),
        "dp": ((0, 1), (0, 1), (0, 1)),
    }[parallel]
    local = fml.expert_placement(experts, ep[1], ep[0], placement)  # type: ignore[arg-type]
    return (dense_tp, expert_tp, ep), local


def _rank_model(config, request) -> torch.nn.Module:
    """The model on the meta device with every weight shaped for the rank."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        full = model.state_dict()
        for name, weight in full.items():
            shape = _rank_slice(name, full, request).shape
            if shape != weight.shape:
                module, _, leaf = name.rpartition(".")
                setattr(
                    model.get_submodule(module),
                    leaf,
                    torch.nn.Parameter(torch.empty(shape, dtype=weight.dtype), False),
                )
    return model


def _load_model(
    path: str, config, device: torch.device, ranks, placement: str
) -> tuple[torch.nn.Module, float, int]:
    (dense_tp, expert_tp, (ep_rank, ep_size)), local = ranks
    model = _rank_model(config, (dense_tp, expert_tp, local))
    _sync(device)
    dist.barrier()
    start = time.perf_counter()
    report = fml.load_model(
        model,
        path,
        device=device,
        tp_rank=dense_tp[0],
        tp_size=dense_tp[1],
        ep_rank=ep_rank,
        ep_size=ep_size,
        placement=placement,  # type: ignore[arg-type]
        expert_tp_rank=expert_tp[0],
        expert_tp_size=expert_tp[1],
        strict=True,
        progress=False,
    )
    _sync(device)
    return model, time.perf_counter() - start, report.bytes


def _check_model(path: str, model: torch.nn.Module, ranks) -> bool:
    """Every weight of the rank's model against its slice of `from_pretrained`'s model."""
    from transformers import AutoModelForCausalLM

    (dense_tp, expert_tp, _), local = ranks
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).state_dict()
    ours = model.state_dict()
    if ours.keys() != reference.keys():
        return False
    return all(
        _bits_equal(t, _rank_slice(n, reference, (dense_tp, expert_tp, local)))
        for n, t in ours.items()
    )


# ---- the run ----------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="torchrun ... -m fastmoe_load.bench.distributed",
        description="Every rank (one process per GPU, or per CPU rank with --device cpu) fills "
        "its own experts of a generated checkpoint, or with --model a whole model, and rank 0 "
        "prints each rank's rate. Start it with torchrun --nproc-per-node N.",
    )
    parser.add_argument(
        "--parallel",
        choices=["tp", "ep", "tp-ep", "dp"],
        default="ep",
        help="how ranks split the experts: tp (each rank its share of every expert's "
        "intermediate size), ep (whole experts placed over the ranks; default), tp-ep (with "
        "--model: attention TP-sliced, experts placed), dp (every rank all of it)",
    )
    parser.add_argument(
        "--share", action="store_true", help="dp: read each expert once, exchange the slices"
    )
    parser.add_argument(
        "--placement",
        choices=["linear", "round_robin"],
        default="linear",
        help="how experts are spread over EP ranks (default: linear)",
    )
    parser.add_argument(
        "--model", action="store_true", help="a whole Qwen3-MoE model through load_model"
    )
    parser.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda: NCCL, one GPU per rank; cpu: gloo, CPU destinations (default: cuda where "
        "there is a GPU)",
    )
    parser.add_argument(
        "--layers",
        type=positive_int,
        help="layers to generate (default: 8 on GPUs; on CPUs as many as an eighth of the "
        f"memory holds with every rank's copy, at most 8; {MODEL_LAYERS} small ones with "
        "--model)",
    )
    for name, meaning, default, model in (
        ("experts", "routed experts E", 128, 5),
        ("hidden", "hidden size H", 2048, 64),
        ("intermediate", "intermediate size I of each expert", 768, 40),
    ):
        parser.add_argument(
            f"--{name}",
            type=positive_int,
            help=f"{meaning} (default: {default}, or {model} with --model)",
        )
    parser.add_argument(
        "--dir",
        help="where the checkpoint is generated: a new or empty directory, or one a bench "
        "generated (reused if it matches; default: under $TMPDIR, else /tmp)",
    )
    parser.add_argument(
        "--clean", action="store_true", help="remove the generated checkpoint after the run"
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=3,
        help="timed loads after one warm-up; each rank reports the median (default 3)",
    )
    parser.add_argument("--check", action="store_true", help="compare with an independent read")
    parser.add_argument("--cold", action="store_true", help="empty the page cache first")
    return parser


def _layers(args: argparse.Namespace, size: int) -> int:
    """Layers to generate: `--layers`, else MODEL_LAYERS with `--model`, else sized for the
    device as `python -m fastmoe_load bench` does, counting every rank's copy on CPUs (dp
    replicas each hold everything; TP and EP ranks share one copy between them)."""
    if args.layers:
        return args.layers
    if args.model:
        return MODEL_LAYERS
    one = Shape(
        layers=1,
        experts=args.experts or Shape.experts,
        hidden=args.hidden or Shape.hidden,
        intermediate=args.intermediate or Shape.intermediate,
    )
    copies = size if args.parallel == "dp" else 1
    return default_layers(torch.device(args.device), one.layer_bytes * copies)


def main() -> None:
    parser = _parser()
    args = parser.parse_args()
    if args.share and (args.parallel != "dp" or args.model):
        parser.error("--share goes with --parallel dp, without --model")
    if not {"RANK", "WORLD_SIZE", "MASTER_ADDR"} <= os.environ.keys():
        parser.error(
            "start it with torchrun, which runs one process per GPU (or CPU rank): "
            "torchrun --nproc-per-node 2 -m fastmoe_load.bench.distributed [OPTIONS]"
        )
    default = "fastmoe_model_bench_distributed" if args.model else "fastmoe_bench_distributed"
    path = args.dir or default_dir(default)
    first = int(os.environ["RANK"]) == 0
    with contextlib.ExitStack() as held:
        try:  # on every rank, before any waits for another
            check_device(args.device)
            check_dir(path)
            if first:  # rank 0 writes the checkpoint: it holds the directory for the run
                held.enter_context(claim(path))
        except FastMoeLoadError as error:
            parser.exit(1, f"error: {error}\n")
        backend = _run(parser, args, path)
        if first and args.clean:  # every rank is done with it (the last all_gather)
            remove(path)
    if backend == "gloo":
        # A gloo worker thread may still hold the last collective's tensors and take the GIL
        # to free them while the interpreter shuts down, which aborts the process now and
        # then on a busy machine; everything is written, so leave without that shutdown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, path: str) -> str:
    """The run itself, on every rank; returns the process group's backend."""
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank, size = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    load: Callable[[], tuple[object, float, int]]
    check: Callable[[object], bool]
    if args.model:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        experts = args.experts or 5
        layers = _layers(args, size)
        hidden, intermediate = args.hidden or 64, args.intermediate or 40
        config = _model_config(layers, experts, hidden, intermediate)
        if rank == 0:
            announce(
                path,
                f"Qwen3-MoE model, {plural(layers, 'layer')} of {experts} experts, H={hidden}, "
                f"I={intermediate}",
                generated(path, "model", _description(config)),
                args.clean,
            )
            save_random_model(path, config)
        dist.barrier()
        parallel = _model_request(args.parallel, args.placement, rank, size, experts)
        ckpt_bytes = sum(
            os.path.getsize(os.path.join(path, f))
            for f in os.listdir(path)
            if f.endswith(".safetensors")
        )

        def load():
            return _load_model(path, config, device, parallel, args.placement)

        def check(model):
            return _check_model(path, model, parallel)

        what = f"Qwen3-MoE model ({plural(layers, 'layer')}, {experts} experts), "
    else:
        shape = Shape(
            layers=_layers(args, size),
            experts=args.experts or Shape.experts,
            hidden=args.hidden or Shape.hidden,
            intermediate=args.intermediate or Shape.intermediate,
        )
        if args.share and shape.experts % size:
            parser.error(f"--share needs the {shape.experts} experts to split evenly")
        if rank == 0:
            announce(
                path,
                f"{plural(shape.layers, 'layer')} of E={shape.experts}, H={shape.hidden}, "
                f"I={shape.intermediate}, bf16, fused v5, {shape.total_bytes / 1e9:.3g} GB",
                generated(path, "experts", asdict(shape)),
                args.clean,
            )
            generate(path, shape)
        dist.barrier()
        request = _request(shape, args.parallel, args.placement, rank, size)
        ckpt_bytes = shape.total_bytes

        def load():
            return _load(path, shape, device, request, args.share)

        def check(dests):
            return _check(path, shape, dests, request)

        what = ""

    pinned = _pinned_rate(device)
    rows = []
    for run in range(args.repeats + 1):
        if args.cold:
            if rank == 0:
                drop_page_cache()
            dist.barrier()
        before = _read_bytes()
        result, seconds, nbytes = load()
        disk = _read_bytes() - before
        if run:
            rows.append((seconds, nbytes, disk))
    ok = check(result) if args.check else None
    seconds = statistics.median(r[0] for r in rows)
    mine = (pinned, seconds, rows[0][1], statistics.median(r[2] for r in rows), ok)
    gathered: list = [None] * size
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        mode = f"{args.parallel}={size}" + (f" {args.placement}" if "ep" in args.parallel else "")
        if args.share:
            mode += (
                f" (each expert read once, shared over {'NCCL' if backend == 'nccl' else backend})"
            )
        cache = "cold" if args.cold else "warm"
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (gloo)"
        print(
            f"{name} x {size}, {what}{mode}, {cache} page cache, "
            f"{ckpt_bytes / 1e9:.2f} GB checkpoint"
        )
        print(
            f"{'rank':>4} {'pinned GB/s':>11} {'load GB/s':>9} {'plan bytes':>12} "
            f"{'disk bytes':>12} {'check':>6}"
        )
        for r, (p, s, n, d, good) in enumerate(gathered):
            check_mark = "-" if good is None else "ok" if good else "FAIL"
            rate = "-" if p is None else f"{p:.2f}"
            print(f"{r:>4} {rate:>11} {n / s / 1e9:9.2f} {n:12d} {int(d):12d} {check_mark:>6}")
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
    return backend


if __name__ == "__main__":
    main()
