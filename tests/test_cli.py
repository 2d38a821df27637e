"""The command line: `inspect` (bytes per rank equal what `load_fused_moe` moves), `convert`
(transformers loads every result bit for bit; a round trip restores the original files),
user mistakes (one `error:` line, no traceback).

A few commands run in a child process, exactly as a user runs them (`python -m fastmoe_load`);
the others call `cli.main` in this process with stdout and stderr captured, which runs the
same code without paying seconds for each child's torch import.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Sequence
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import fastmoe_load as fml
import pytest
import torch
from conftest import assert_bitwise_equal, build_model, reference_experts
from fastmoe_load.cli import main
from fastmoe_load.cli.inspect import describe_experts
from safetensors import safe_open

transformers = pytest.importorskip("transformers")

ROUND_TRIP_FAMILIES = ["qwen3_moe", "mixtral", "olmoe"]
MAX_SHARD = 60_000  # bytes: several shards from these tiny models

Command = Sequence[str | os.PathLike[str] | int]


def run_child(*commands: Command) -> list[subprocess.CompletedProcess]:
    """Runs `python -m fastmoe_load COMMAND...` in a child process for each command, all
    at once."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "fastmoe_load", *map(str, command)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for command in commands
    ]
    done = []
    for child, command in zip(children, commands, strict=True):
        stdout, stderr = child.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(command, child.returncode, stdout, stderr))
    return done


def run_main(*command: str | os.PathLike[str] | int) -> subprocess.CompletedProcess:
    """`cli.main(COMMAND)` in this process, its output and exit status captured."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        try:
            status = main(list(map(str, command)))
        except SystemExit as exit:  # argparse's way out
            status = exit.code
    return subprocess.CompletedProcess(command, status, stdout.getvalue(), stderr.getvalue())


def succeeded(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"{result.args}:\n{result.stderr}"
    return result


def build_olmoe() -> torch.nn.Module:
    """OLMoE is not among conftest's families; built the same way."""
    config = transformers.AutoConfig.for_model(
        "olmoe",
        hidden_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        intermediate_size=40,
        num_experts=5,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        eos_token_id=None,
        pad_token_id=None,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator).to(param.dtype))
    return model.eval()


@dataclass
class Source:
    model: torch.nn.Module
    per_expert: Path  # save_original_format=True: one tensor per expert (gpt-oss: fused)
    v5: Path  # save_original_format=False: fused


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Source]:
    found = {}
    for family in [*ROUND_TRIP_FAMILIES, "gpt_oss"]:
        model = build_olmoe() if family == "olmoe" else build_model(family)
        paths = []
        for original in (True, False):
            path = tmp_path_factory.mktemp(f"{family}-{'orig' if original else 'v5'}")
            model.save_pretrained(path, max_shard_size="40KB", save_original_format=original)
            paths.append(path)
        found[family] = Source(model, *paths)
    return found


def safetensors_of(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            tensors |= {name: f.get_tensor(name) for name in f.keys()}
    return tensors


def from_pretrained(path: Path) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16, output_loading_info=True
        )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    return model


def assert_same_parameters(actual: torch.nn.Module, expected: torch.nn.Module) -> None:
    got, want = actual.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert_bitwise_equal(got[name], tensor, name)


# ---------------------------------------------------------------------------------------------
# inspect


@pytest.fixture(scope="module")
def inspected(sources: dict[str, Source]) -> dict[str, subprocess.CompletedProcess]:
    mixtral, gpt_oss = sources["mixtral"].per_expert, sources["gpt_oss"].per_expert
    (table,) = run_child(["inspect", mixtral, "--tp", "2", "--ep", "2"])
    return {
        "table": table,
        "mixtral": run_main("inspect", mixtral, "--json", "--tp", "2", "--ep", "2"),
        "gpt_oss": run_main(
            "inspect", gpt_oss, "--json", "--tp", "2", "--ep", "3", "--placement", "round_robin"
        ),
    }


def test_inspect_table(inspected: dict, sources: dict[str, Source]) -> None:
    out = succeeded(inspected["table"]).stdout
    assert f"checkpoint  {sources['mixtral'].per_expert}" in out
    assert "model_type  mixtral" in out
    assert "tp=2 x ep=2 (linear placement): 4 ranks" in out
    for layer in (0, 1):
        row = next(line for line in out.splitlines() if f"layers.{layer}.block_sparse" in line)
        assert row.split()[1:7] == ["per_expert", "5", "48", "40", "bfloat16", "-"]
    ranks = [line.split()[:3] for line in out.splitlines() if line.startswith("ep")]
    expected = [["ep0", "tp0", "0-2"], ["ep0", "tp1", "0-2"]]
    expected += [["ep1", "tp0", "3-4"], ["ep1", "tp1", "3-4"]]
    assert ranks == expected


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_inspect_json_bytes_are_what_loads_move(
    inspected: dict, sources: dict[str, Source], family: str
) -> None:
    report = json.loads(succeeded(inspected[family]).stdout)
    path = sources[family].per_expert
    stored = safetensors_of(path)
    assert report["num_tensors"] == len(stored)
    assert report["file_bytes"] == sum(f.stat().st_size for f in path.glob("*.safetensors"))
    with fml.open(path) as ckpt:
        layers = ckpt.moe_layers()
        assert [entry["prefix"] for entry in report["layers"]] == [la.prefix for la in layers]
        for entry, layer in zip(report["layers"], layers, strict=True):
            assert entry["format"] == layer.format
            assert entry["bytes"] == sum(stored[n].nbytes for n in layer.tensor_names)
            assert len(entry["ranks"]) == report["tp_size"] * report["ep_size"]
            for rank in entry["ranks"]:
                assert rank["experts"] == fml.expert_placement(
                    layer.num_experts, report["ep_size"], rank["ep_rank"], report["placement"]
                )
                assert rank["bytes"] == load(ckpt, layer, rank, report["tp_size"]).bytes
        for k, total in enumerate(report["ranks"]):
            assert total["bytes"] == sum(entry["ranks"][k]["bytes"] for entry in report["layers"])


def load(ckpt: fml.Checkpoint, layer: fml.MoeLayer, rank: dict, tp_size: int) -> fml.LoadStats:
    n, shard, h = len(rank["experts"]), layer.intermediate_size // tp_size, layer.hidden_size
    biases = {}
    if layer.has_bias:
        biases = {
            "w13_bias": torch.empty(n, 2 * shard, dtype=layer.bias_dtype),
            "w2_bias": torch.empty(n, h, dtype=layer.bias_dtype),
        }
    return fml.load_fused_moe(
        ckpt,
        layer.prefix,
        torch.empty(n, 2 * shard, h, dtype=layer.dtype),
        torch.empty(n, h, shard, dtype=layer.dtype),
        tp_rank=rank["tp_rank"],
        tp_size=tp_size,
        local_experts=rank["experts"],
        **biases,
    )


# ---------------------------------------------------------------------------------------------
# convert


@pytest.fixture(scope="module")
def converted(
    sources: dict[str, Source], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Every conversion: per-expert -> fused -> per-expert for the round-trip families,
    transformers' own v5 save -> per-expert, gpt-oss -> fused -> per-expert, and a single
    `.safetensors` file -> fused."""
    out = tmp_path_factory.mktemp("converted")
    single = tmp_path_factory.mktemp("single")
    sources["qwen3_moe"].model.save_pretrained(single, save_original_format=True)
    first = {
        **{f"{f}-fused": [sources[f].per_expert, "--to", "fused"] for f in ROUND_TRIP_FAMILIES},
        **{f"{f}-v5-per_expert": [sources[f].v5, "--to", "per_expert"] for f in ["mixtral"]},
        "gpt_oss-fused": [sources["gpt_oss"].per_expert],
        "single-fused": [single / "model.safetensors"],
    }
    second = {
        **{f"{f}-back": [out / f"{f}-fused", "--to", "per_expert"] for f in ROUND_TRIP_FAMILIES},
        "gpt_oss-back": [out / "gpt_oss-fused", "--to", "per_expert"],
    }
    logs = {}
    for batch in (first, second):
        for name, (src, *options) in batch.items():
            command = ["convert", src, out / name, "--max-shard-size", MAX_SHARD, *options, "-v"]
            # One conversion as a user runs it; the others in this process.
            (result,) = run_child(command) if name == "qwen3_moe-fused" else [run_main(*command)]
            logs[name] = succeeded(result).stderr
            assert result.stdout.startswith(f"wrote {out / name}: "), result.stdout
    (out / "logs.json").write_text(json.dumps(logs))
    return {name: out / name for name in [*first, *second]} | {"logs": out / "logs.json"}


@pytest.mark.parametrize("family", ROUND_TRIP_FAMILIES)
def test_convert_to_fused_loads_in_transformers(
    converted: dict[str, Path], sources: dict[str, Source], family: str
) -> None:
    fused = converted[f"{family}-fused"]
    assert_same_parameters(from_pretrained(fused), sources[family].model)
    tensors = safetensors_of(fused)
    source = safetensors_of(sources[family].per_expert)
    with fml.open(sources[family].per_expert) as ckpt:
        layers = ckpt.moe_layers()
        expert_names = {name for layer in layers for name in layer.tensor_names}
        for layer in layers:
            e, h, i = layer.num_experts, layer.hidden_size, layer.intermediate_size
            assert tensors[f"{layer.prefix}.gate_up_proj"].shape == (e, 2 * i, h)
            assert tensors[f"{layer.prefix}.down_proj"].shape == (e, h, i)
    for name, tensor in source.items():  # every other tensor, unchanged
        if name not in expert_names:
            assert_bitwise_equal(tensors[name], tensor, name)
    assert len(tensors) == len(source) - len(expert_names) + 2 * len(layers)


@pytest.mark.parametrize("family", ROUND_TRIP_FAMILIES)
def test_convert_round_trip_restores_the_checkpoint(
    converted: dict[str, Path], sources: dict[str, Source], family: str
) -> None:
    back = converted[f"{family}-back"]
    assert_same_parameters(from_pretrained(back), sources[family].model)
    original, restored = safetensors_of(sources[family].per_expert), safetensors_of(back)
    assert restored.keys() == original.keys()  # Mixtral's w1/w3/w2 names come back too
    for name, tensor in original.items():
        assert_bitwise_equal(restored[name], tensor, name)


def test_convert_writes_bounded_shards_an_index_and_the_small_files(
    converted: dict[str, Path], sources: dict[str, Source]
) -> None:
    fused = converted["mixtral-fused"]
    shards = sorted(fused.glob("*.safetensors"))
    assert len(shards) > 1
    index = json.loads((fused / "model.safetensors.index.json").read_text())
    tensors = safetensors_of(fused)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    for shard in shards:
        with safe_open(shard, "pt") as f:
            names = list(f.keys())
        assert all(index["weight_map"][n] == shard.name for n in names)
        in_shard = sum(tensors[n].nbytes for n in names)
        assert in_shard <= MAX_SHARD or len(names) == 1
    for name in ("config.json", "generation_config.json"):
        assert (fused / name).read_bytes() == (sources["mixtral"].per_expert / name).read_bytes()
    assert not list(fused.parent.glob(".*partial*"))
    # From a single file: its config.json comes along, transformers loads the result.
    assert_same_parameters(from_pretrained(converted["single-fused"]), sources["qwen3_moe"].model)


def test_convert_v5_checkpoint_to_per_expert(
    converted: dict[str, Path], sources: dict[str, Source]
) -> None:
    """transformers' own fused save, split per expert with Mixtral's w1/w3/w2 names."""
    per_expert = converted["mixtral-v5-per_expert"]
    assert "model.layers.0.mlp.experts.4.w3.weight" in safetensors_of(per_expert)
    assert_same_parameters(from_pretrained(per_expert), sources["mixtral"].model)


def test_convert_gpt_oss_to_the_v5_layout_and_back(
    converted: dict[str, Path], sources: dict[str, Source]
) -> None:
    """gpt-oss stores gate_up transposed and interleaved; `--to fused` writes the v5
    orientation, gate rows then up rows, under the same names."""
    logs = json.loads(converted["logs"].read_text())
    assert "warning: rewrote fused_transposed_interleaved experts" in logs["gpt_oss-fused"]
    reference = reference_experts(sources["gpt_oss"].model, "gpt_oss")
    fused = safetensors_of(converted["gpt_oss-fused"])
    # config.json still says gpt-oss; what the shards record wins, with no option needed.
    with fml.open(converted["gpt_oss-fused"]) as ckpt:
        for layer in ckpt.moe_layers():
            ref = reference[int(layer.prefix.split(".")[2])]
            assert layer.format == "fused"
            for e in range(ref.gate.shape[0]):  # the views read gate and up right
                assert_bitwise_equal(layer.w1(e), ref.gate[e], layer.prefix)
                assert_bitwise_equal(layer.w3(e), ref.up[e], layer.prefix)
                assert_bitwise_equal(layer.b3(e), ref.up_bias[e], layer.prefix)
            expected = torch.cat([ref.gate, ref.up], dim=1)
            assert_bitwise_equal(fused[f"{layer.prefix}.gate_up_proj"], expected, layer.prefix)
            assert_bitwise_equal(fused[f"{layer.prefix}.down_proj"], ref.down, layer.prefix)
            bias = torch.cat([ref.gate_bias, ref.up_bias], dim=1)
            assert_bitwise_equal(fused[f"{layer.prefix}.gate_up_proj_bias"], bias)
            assert_bitwise_equal(fused[f"{layer.prefix}.down_proj_bias"], ref.down_bias)
    inspected = succeeded(run_main("inspect", converted["gpt_oss-fused"], "--json"))
    assert {layer["format"] for layer in json.loads(inspected.stdout)["layers"]} == {"fused"}
    assert inspected.stderr == ""
    # An override that contradicts the record is refused, by the API and the command line.
    with pytest.raises(fml.CheckpointError, match="interleaved=True contradicts the file"):
        fml.open(converted["gpt_oss-fused"], interleaved=True).moe_layers()
    refused = run_main("inspect", converted["gpt_oss-fused"], "--interleaved")
    assert refused.returncode != 0 and "records its fused gate/up tensors as concatenated" in (
        refused.stderr
    )
    # Converting back needs no such hint: the shards record the concatenated layout.
    back = safetensors_of(converted["gpt_oss-back"])
    for index, ref in reference.items():
        prefix = f"model.layers.{index}.mlp.experts"
        for e in range(ref.gate.shape[0]):
            for module, weight, bias in (
                ("gate_proj", ref.gate, ref.gate_bias),
                ("up_proj", ref.up, ref.up_bias),
                ("down_proj", ref.down, ref.down_bias),
            ):
                assert_bitwise_equal(back[f"{prefix}.{e}.{module}.weight"], weight[e])
                assert_bitwise_equal(back[f"{prefix}.{e}.{module}.bias"], bias[e])


# ---------------------------------------------------------------------------------------------
# user mistakes


def test_user_mistakes_end_with_one_error_line(sources: dict[str, Source], tmp_path: Path) -> None:
    ckpt = sources["qwen3_moe"].per_expert
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\xff" * 8 + b"{}")
    not_empty = tmp_path / "not-empty"
    not_empty.mkdir()
    (not_empty / "keep.txt").write_text("mine")
    cases = {
        "missing": ["inspect", tmp_path / "missing"],
        "corrupt": ["inspect", corrupt],
        "dst not empty": ["convert", ckpt, not_empty],
        "dst is a file": ["convert", ckpt, not_empty / "keep.txt"],
        "unknown option": ["inspect", ckpt, "--bogus"],
        "tp does not divide I": ["inspect", ckpt, "--tp", "3"],
        "bad shard size": ["convert", ckpt, tmp_path / "out", "--max-shard-size", "lots"],
        "no command": [],
    }
    # The two ways out as a user meets them, then every case through `main`.
    children = run_child(cases["corrupt"], cases["unknown option"])
    results = [*children, *(run_main(*command) for command in cases.values())]
    for case, result in zip(["corrupt", "unknown option", *cases], results, strict=True):
        assert result.returncode not in (0, None), case
        assert result.stderr.startswith("error: "), (case, result.stderr)
        assert result.stderr.count("\n") == 1, (case, result.stderr)
        assert "Traceback" not in result.stderr, case
        assert result.stdout == "", case
    assert [p.name for p in not_empty.iterdir()] == ["keep.txt"]
    assert (not_empty / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.safetensors", "not-empty"]


def test_describe_experts() -> None:
    cases = {(0, 1, 2, 3): "0-3", (1, 5, 9): "1-9 step 4", (0, 3): "0, 3", (3, 0, 3): "3, 0, 3"}
    for experts, text in cases.items():
        assert describe_experts(list(experts)) == text
    assert describe_experts([]) == "none"
