"""The `python -m fastmoe_load` command line: `inspect`, `convert` and `bench`.

A user mistake (a bad path, a corrupt file, a bad option) ends with one `error: ...` line on
stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator

from .. import __version__
from .._command_line import OneLineParser, check_device, device_choice, positive_int
from .._fastmoe_load import FastMoeLoadError, RequestError

PROG = "python -m fastmoe_load"


def _size(text: str) -> int:
    from .convert import parse_size

    try:
        return parse_size(text)
    except FastMoeLoadError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _common() -> argparse.ArgumentParser:
    """Options of the commands that read a checkpoint."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--interleaved",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="whether fused gate/up tensors interleave gate and up rows "
        "(default: what the shards record, else config.json's model_type, e.g. gpt-oss)",
    )
    common.add_argument(
        "-v", "--verbose", action="store_true", help="log what was matched, converted, copied"
    )
    return common


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description="Load Mixture-of-Experts checkpoints, fast.")
    parser.add_argument(
        "--version", action="version", version=f"fastmoe_load {__version__}", help="and exit"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common()

    inspect = commands.add_parser(
        "inspect",
        parents=[common],
        help="list the routed-expert groups and the bytes each TP/EP rank reads",
        description="List a checkpoint's routed-expert groups (layout, E/H/I, dtype) and the "
        "bytes each TP/EP rank would read, from the copy plans of a real load.",
    )
    inspect.add_argument("checkpoint", metavar="CKPT", help="a .safetensors file or a directory")
    inspect.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel size")
    inspect.add_argument("--ep", type=positive_int, default=1, help="expert-parallel size")
    inspect.add_argument(
        "--placement",
        choices=["linear", "round_robin"],
        default="linear",
        help="how experts are spread over EP ranks (default: linear)",
    )
    inspect.add_argument("--json", action="store_true", help="machine-readable output")

    convert = commands.add_parser(
        "convert",
        parents=[common],
        help="rewrite experts between one tensor per expert and the fused v5 layout",
        description="Rewrite a checkpoint's routed experts into the fused transformers-v5 "
        "layout (gate_up_proj [E, 2I, H], down_proj [E, H, I]) or into one tensor per expert; "
        "every other tensor is copied unchanged.",
    )
    convert.add_argument("src", metavar="SRC", help="a .safetensors file or a directory")
    convert.add_argument("dst", metavar="DST", help="a new (or empty) directory")
    convert.add_argument(
        "--to", choices=["fused", "per_expert"], default="fused", help="layout (default: fused)"
    )
    convert.add_argument(
        "--max-shard-size",
        type=_size,
        default="5GB",
        help="largest shard, e.g. 5GB (default), 500MB or bytes",
    )
    convert.add_argument(
        "--expert-names",
        choices=["gate_proj", "w1", "linear"],
        help="per-expert module names for --to per_expert: gate_proj/up_proj/down_proj, "
        "w1/w3/w2 or linear/linear_v/linear_1 (default: as recorded by an earlier "
        "conversion, else from model_type)",
    )
    convert.add_argument(
        "--no-progress", action="store_true", help="no progress line (also FASTMOE_LOAD_PROGRESS=0)"
    )

    bench = commands.add_parser(
        "bench",
        help="compare fastmoe_load with pure-Python loading on a generated checkpoint",
        description="Generate a checkpoint shaped like Qwen3-30B-A3B's experts (or, with "
        "--model, a whole Qwen3-MoE model) and time fastmoe_load beside vLLM's pure-Python "
        "loading and the machine's limits; the printed table explains its columns. On a GPU, "
        "the peer loaders that are installed (InstantTensor, fastsafetensors, Run:ai Model "
        "Streamer) load whole files, and then TP=1, TP=2, TP=8 and EP=8 ranks as vLLM uses "
        "them, beside fastmoe_load's load of the same ranks, in a second table. The "
        "checkpoint is kept under $TMPDIR (else /tmp) for later runs, which reuse it while "
        "the shape matches; --clean removes it after the run.",
    )
    bench.add_argument(
        "--device", default="cpu", type=device_choice, help="cpu (default) or cuda[:N]"
    )
    bench.add_argument(
        "--layers",
        type=positive_int,
        help="layers of 1.2 GB (default: sized for the machine, 8 on a GPU; 2 with --model)",
    )
    bench.add_argument(
        "--dir",
        help="where to generate the checkpoint: a new or empty directory, or one the bench "
        "generated before (default: fastmoe_bench under $TMPDIR, else /tmp)",
    )
    bench.add_argument(
        "--clean", action="store_true", help="remove the generated checkpoint after the run"
    )
    bench.add_argument(
        "--repeats",
        type=positive_int,
        help="timed runs per row, after one warm-up (the median is shown; default: 5 on a GPU "
        "and with --model; on a CPU, as many as time the fastest row of each group for 2 s, "
        "5 to 25); fewer than 3 give rough figures, marked ~",
    )
    bench.add_argument(
        "--threads", type=positive_int, help="copy threads (default: CPUs, at most 16)"
    )
    bench.add_argument(
        "--explore",
        action="store_true",
        help="also time the parts of a CUDA load (fill alone, copy alone, other staging "
        "buffers); says so and adds nothing on a CPU",
    )
    bench.add_argument(
        "--cold",
        action="store_true",
        help="empty the page cache before every run (root only); the peers then read in their "
        "own O_DIRECT modes",
    )
    bench.add_argument(
        "--transposed",
        action="store_true",
        help="generate the checkpoint in the transposed fused layout (Llama 4, gpt-oss)",
    )
    for name, meaning, default, fp8 in (
        ("experts", "routed experts E", 128, "256 (fewer on a CPU)"),
        ("hidden", "hidden size H", 2048, 7168),
        ("intermediate", "intermediate size I of each expert", 768, 2048),
    ):
        bench.add_argument(
            f"--{name}",
            type=positive_int,
            help=f"{meaning} (default: {default}, or {fp8} with --quant)",
        )
    bench.add_argument(
        "--model",
        action="store_true",
        help="time load_model against transformers' from_pretrained on a generated "
        "Qwen3-MoE-shaped model (--layers of 1.3 GB, default 2; needs transformers)",
    )
    bench.add_argument(
        "--reload",
        action="store_true",
        help="time vLLM's in-place reload (reload_weights) of a served Qwen3-MoE-shaped model "
        "(--layers of 1.3 GB, default 2; with --quant fp8 a DeepSeek-V3-shaped one, fp8 "
        "block-scaled experts, --experts a layer, default 32, --layers of 1.4 GB, default 1) "
        "through load_format=fastmoe beside vLLM's own reload of the same files, and the "
        "first load of the experts (needs vLLM)",
    )
    bench.add_argument(
        "--engine",
        action="store_true",
        help="time the whole vLLM engine's model load (every parameter filled and processed) "
        "of a generated Qwen3-MoE-shaped model (--layers of 1.3 GB, default 2) through "
        "load_format=fastmoe beside vLLM's own loader and its other safetensors loaders "
        "that run here (needs vLLM; --repeats default 3)",
    )
    bench.add_argument(
        "--quant",
        choices=["fp8", "nvfp4", "int4", "mxfp4", "mxfp4-expert", "gptq"],
        help="quantized experts: a DeepSeek-V3-shaped checkpoint, fp8 with block scales "
        "(--layers of 11.3 GB, default 1), ModelOpt nvfp4 or compressed-tensors int4 (6 GB); "
        "or a gpt-oss-120b-shaped mxfp4 one (--layers of 1.7 GB, default 4); or a "
        "DeepSeek-V4-Pro-shaped mxfp4-expert one (per-expert e2m1 bytes with e8m0 scales, "
        "384 experts, --layers of 13.5 GB, default 1); or a Qwen3-235B-A22B-GPTQ-Int4-shaped "
        "one (--layers of 1.2 GB, default 4, loaded input-first as vLLM's GPTQ Marlin method "
        "keeps it); beside the pure-Python path and the bf16 rows",
    )
    return parser


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        return message


@contextlib.contextmanager
def _logging_to_stderr(verbose: bool) -> Iterator[None]:
    """The package's log lines on stderr while a command runs: warnings always, INFO with
    `-v`. Only the `fastmoe_load` logger, and put back as it was afterwards, so that other
    libraries' logging and callers of `main` in a longer-lived process are left alone."""
    logger = logging.getLogger("fastmoe_load")
    level, propagate = logger.level, logger.propagate
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)  # not `logger.level = `: setLevel also resets the level cache
        logger.propagate = propagate


def _inspect(args: argparse.Namespace) -> None:
    from ..checkpoint import UnsupportedWarning
    from ..checkpoint import open as open_checkpoint
    from .inspect import format_report, inspect_checkpoint

    with (
        # The report names what cannot be loaded.
        warnings.catch_warnings(action="ignore", category=UnsupportedWarning),
        open_checkpoint(args.checkpoint, interleaved=args.interleaved) as ckpt,
    ):
        report = inspect_checkpoint(ckpt, args.tp, args.ep, args.placement)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print(format_report(report))


def _convert(args: argparse.Namespace) -> None:
    from .convert import convert

    report = convert(
        args.src,
        args.dst,
        to=args.to,
        max_shard_size=args.max_shard_size,
        expert_names=args.expert_names,
        interleaved=args.interleaved,
        progress=False if args.no_progress else None,
    )
    print(report.summary())


def _bench(args: argparse.Namespace) -> None:
    check_device(args.device)
    if args.cold and not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        raise RequestError(
            "--cold empties the page cache before every run, which needs root (it writes "
            "/proc/sys/vm/drop_caches)"
        )
    if args.engine:
        names = ("explore", "cold", "transposed", "quant", "model", "reload", "threads")
        given = [f"--{name}" for name in names if getattr(args, name)]
        if given:
            raise RequestError(f"{', '.join(given)} do not apply to bench --engine")
        from ..bench.engine import main as bench_engine

        bench_engine(
            args.device,
            args.layers or 2,
            args.dir,
            args.repeats or 3,
            args.clean,
            args.experts,
            args.hidden,
            args.intermediate,
        )
        return
    if args.reload:
        names = ("explore", "cold", "transposed", "model", "threads", "hidden", "intermediate")
        given = [f"--{name}" for name in names if getattr(args, name)]
        if args.quant not in (None, "fp8"):
            given.append(f"--quant {args.quant}")
        if args.experts and args.quant is None:
            given.append("--experts without --quant fp8")
        if given:
            raise RequestError(f"{', '.join(given)} do not apply to bench --reload")
        from ..bench.reload import main as bench_reload

        layers = args.layers or (1 if args.quant else 2)
        bench_reload(
            args.device, layers, args.dir, args.repeats or 5, args.clean, args.quant, args.experts
        )
        return
    if args.model:
        names = (
            "explore",
            "cold",
            "transposed",
            "quant",
            "threads",
            "experts",
            "hidden",
            "intermediate",
        )
        given = [f"--{name}" for name in names if getattr(args, name)]
        if given:
            raise RequestError(f"{', '.join(given)} do not apply to bench --model")
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise RequestError(
                "bench --model needs transformers: pip install 'transformers>=5'"
            ) from None
        from ..bench.model_run import main as bench_model

        bench_model(args.device, args.layers or 2, args.dir, args.repeats or 5, args.clean)
        return
    if args.quant:
        given = [f"--{name}" for name in ("explore", "cold", "transposed") if getattr(args, name)]
        if given:
            raise RequestError(f"{', '.join(given)} do not apply to bench --quant")
        from ..bench.quant import main as bench_quant

        bench_quant(
            args.device,
            args.layers,
            args.dir,
            args.repeats,
            args.threads,
            args.clean,
            args.experts,
            args.hidden,
            args.intermediate,
            args.quant,
        )
        return
    from ..bench.run import main as bench

    bench(
        args.device,
        args.layers,
        args.dir,
        args.repeats,
        args.threads,
        args.explore,
        args.cold,
        args.transposed,
        args.clean,
        args.experts,
        args.hidden,
        args.intermediate,
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = {"inspect": _inspect, "convert": _convert, "bench": _bench}[args.command]
    try:
        with _logging_to_stderr(getattr(args, "verbose", False)):
            command(args)
    except BrokenPipeError:
        # The reader went away (`inspect | head`): nothing left to tell anyone.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (FastMoeLoadError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0
