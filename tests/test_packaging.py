"""Every package the code imports is declared in pyproject.toml, or is one of the optional
integrations; the package and its command line tell their version (the Cargo workspace's);
`pytest -q` says why tests were skipped, as the README promises. (`.ci/run` also runs the
README's first command in a venv holding nothing but what `pip install .` brings, which
catches what imports cannot show: safetensors writes files through numpy without declaring
it.)"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import fastmoe_load

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "python" / "fastmoe_load"
# Imported only where they are used, and only by the parts that need them.
OPTIONAL = {
    "transformers": "load_model's checkpoint name rules, bench --model",
    "vllm": "fastmoe_load.engines.vllm_loader, the load_format='fastmoe' model loader",
    "sglang": "fastmoe_load.engines.sglang_loader, the SGLang model loader",
    **dict.fromkeys(
        ["instanttensor", "fastsafetensors", "runai_model_streamer"],
        "the peers bench compares on a GPU, where installed",
    ),
}


def imported_packages() -> dict[str, set[str]]:
    """Top-level package -> the modules of fastmoe_load that import it."""
    found: dict[str, set[str]] = {}
    for file in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.partition(".")[0], set()).add(file.name)
    return found


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0] for d in project["dependencies"]}


def test_every_imported_package_is_declared() -> None:
    third_party = {
        name: files
        for name, files in imported_packages().items()
        if name not in sys.stdlib_module_names and name != "fastmoe_load"
    }
    undeclared = {
        name: sorted(files)
        for name, files in third_party.items()
        if name not in declared() and name not in OPTIONAL
    }
    assert undeclared == {}
    assert {"torch", "safetensors", "tqdm"} <= third_party.keys()


def test_numpy_is_declared_for_safetensors_writes() -> None:
    assert "numpy" in declared()


def cargo_version() -> str:
    return tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["package"]["version"]


def test_the_version_is_the_cargo_workspaces() -> None:
    assert fastmoe_load.__version__ == cargo_version()
    assert "__version__" in fastmoe_load.__all__
    result = subprocess.run(
        [sys.executable, "-m", "fastmoe_load", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"fastmoe_load {cargo_version()}\n"


def test_pytest_q_says_why_tests_were_skipped(tmp_path) -> None:
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]
    assert "-rs" in options["ini_options"]["addopts"].split()
    test = tmp_path / "test_skips.py"
    test.write_text(
        "import pytest\n\n\n"
        "@pytest.mark.skip(reason='needs a CUDA device')\n"
        "def test_gpu():\n    pass\n"
    )
    config = ["-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path)]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *config, str(test)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SKIPPED [1] " in result.stdout, result.stdout
    assert "test_skips.py:4: needs a CUDA device" in result.stdout, result.stdout
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "Skipped tests say why (`-rs` in `pyproject.toml`'s pytest options" in readme
