"""Several GPUs under torchrun: every rank's parameters equal a single-process load of the
same request, for EP (linear and round-robin), TP, and replicas sharing reads over NCCL.
Skipped without two CUDA devices."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]


@pytest.mark.parametrize(
    "mode",
    [
        ["--parallel", "ep"],
        ["--parallel", "ep", "--placement", "round_robin"],
        ["--parallel", "tp"],
        ["--parallel", "dp", "--share"],
    ],
    ids=["ep-linear", "ep-round-robin", "tp", "dp-shared"],
)
def test_every_rank_matches_a_single_process_load(tmp_path, mode):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "-m",
        "fastmoe_load.bench.distributed",
        "--layers",
        "1",
        "--repeats",
        "1",
        "--dir",
        str(tmp_path),
        "--check",
        *mode,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [
        line.split() for line in result.stdout.splitlines() if line.split()[:1] in (["0"], ["1"])
    ]
    assert len(rows) == 2, result.stdout
    assert all(row[-1] == "ok" for row in rows), result.stdout
