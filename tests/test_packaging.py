"""Every package the code imports is declared in pyproject.toml, or is one of the optional
integrations. (`.ci/run` also runs the README's first command in a venv holding nothing but
what `pip install .` brings, which catches what imports cannot show: safetensors writes
files through numpy without declaring it.)"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

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
