"""Two ranks under torchrun: every rank's parameters equal, bit for bit, its slice of a
single-process read that does not go through fastmoe_load (safetensors, or transformers'
`from_pretrained` for a whole model), for EP (linear and round-robin), TP, replicas sharing
reads, and whole models. On CPUs over gloo always; on two GPUs over NCCL where there are two.
Rank 0 says where the checkpoint goes and `--clean` removes it; every option says what it
does; the default size fits the machine; a second bench on one directory refuses."""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from fastmoe_load.bench import distributed, generate
from test_bench_cli import assert_one_error_line

EXPERT_MODES = {
    "ep-linear": ["--parallel", "ep"],
    "ep-round-robin": ["--parallel", "ep", "--placement", "round_robin"],
    "tp": ["--parallel", "tp"],
    "dp-shared": ["--parallel", "dp", "--share"],
}
# A Qwen3-MoE with 5 experts: EP ranks hold 3 and 2 of them.
MODEL_MODES = {
    "model-tp": ["--model", "--parallel", "tp"],
    "model-ep-linear": ["--model", "--parallel", "ep"],
    "model-ep-round-robin": ["--model", "--parallel", "ep", "--placement", "round_robin"],
    "model-tp-attention-ep-experts": ["--model", "--parallel", "tp-ep"],
}
MODES = {**EXPERT_MODES, **MODEL_MODES}
# Small enough for a 2-core machine; H != 2I, and I splits over two ranks.
CPU_SHAPE = ["--experts", "8", "--hidden", "64", "--intermediate", "40"]


def run_two_ranks(tmp_path, device: str, mode: list[str]) -> None:
    if "--model" in mode and importlib.util.find_spec("transformers") is None:
        pytest.skip("the whole-model mode needs transformers")
    shape = CPU_SHAPE if device == "cpu" and "--model" not in mode else []
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port: test runs side by side do not collide
        "--nproc-per-node",
        "2",
        "-m",
        "fastmoe_load.bench.distributed",
        "--device",
        device,
        "--layers",
        "1",
        "--repeats",
        "1",
        "--dir",
        str(tmp_path / "bench"),
        "--clean",
        "--check",
        *shape,
        *mode,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    announced = f"checkpoint: {tmp_path / 'bench'} ("
    assert result.stdout.count(announced) == 1, result.stdout  # rank 0 only
    assert "; written now, removed after this run)" in result.stdout
    assert not (tmp_path / "bench").exists()
    rows = [
        line.split() for line in result.stdout.splitlines() if line.split()[:1] in (["0"], ["1"])
    ]
    assert len(rows) == 2, result.stdout
    assert all(row[-1] == "ok" for row in rows), result.stdout


@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
def test_every_cpu_rank_matches_a_single_process_read(tmp_path, mode):
    run_two_ranks(tmp_path, "cpu", mode)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
def test_every_gpu_rank_matches_a_single_process_read(tmp_path, mode):
    run_two_ranks(tmp_path, "cuda", mode)


def test_every_option_says_what_it_does():
    parser = distributed._parser()
    options = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    assert {"--clean", "--layers", "--repeats", "--parallel", "--placement"} <= {
        o for a in options for o in a.option_strings
    }
    assert [a.option_strings for a in options if not a.help] == []


def test_default_layers_fit_the_machine(monkeypatch):
    """24 GB, as the machine that got 8 layers (9.7 GB) before: now what an eighth of it holds,
    counting every dp replica's copy; 8 on GPUs; `--layers` wins."""
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 24 * 10**9 // 4096}
    monkeypatch.setattr(os, "sysconf", lambda name: pages[name])

    def layers(*argv: str, size: int = 2) -> int:
        return distributed._layers(distributed._parser().parse_args(argv), size)

    assert layers("--device", "cpu", "--parallel", "ep") == 2  # 1.2 GB a layer
    assert layers("--device", "cpu", "--parallel", "tp") == 2
    assert layers("--device", "cpu", "--parallel", "dp", size=4) == 1
    assert layers("--device", "cpu", "--experts", "8", "--hidden", "64") == 8
    assert layers("--device", "cuda") == 8
    assert layers("--device", "cpu", "--model") == distributed.MODEL_LAYERS
    assert layers("--device", "cpu", "--layers", "5") == 5


def test_a_second_bench_on_the_same_directory_refuses(tmp_path):
    """Rank 0 of a second run refuses, before its process group starts, while the directory
    is held; nothing is written."""
    directory = tmp_path / "bench"
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    env["MASTER_PORT"] = "1"  # never reached
    with generate.claim(str(directory)):
        command = ["fastmoe_load.bench.distributed", "--device", "cpu", "--dir", str(directory)]
        result = subprocess.run(
            [sys.executable, "-m", *command],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert_one_error_line(result, "another bench is using this directory")
        assert [p.name for p in directory.iterdir()] == [generate.LOCK]
