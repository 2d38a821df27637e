"""Two ranks under torchrun: every rank's parameters equal, bit for bit, its slice of a
single-process read that does not go through fastmoe_load (safetensors, or transformers'
`from_pretrained` for a whole model), for EP (linear and round-robin), TP, replicas sharing
reads, and whole models. On CPUs over gloo always; on two GPUs over NCCL where there are two."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

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
        str(tmp_path),
        "--check",
        *shape,
        *mode,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
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
