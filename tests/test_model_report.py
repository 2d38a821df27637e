"""Nothing `load_model` leaves undone passes unnoticed: a load where nothing fits raises,
a partial one warns by default (also in a plain interpreter with no logging set up), strict
errors say what to do, and the report reads as a summary."""

from __future__ import annotations

import subprocess
import sys
import warnings

import fastmoe_load as fml
import pytest
import torch
from conftest import assert_bitwise_equal, build_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("mixtral")
    build_model("mixtral").save_pretrained(path, max_shard_size="40KB")
    return path


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("qwen3_moe")
    model = build_model("qwen3_moe")
    model.save_pretrained(path, max_shard_size="40KB")
    return path, model


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in model.state_dict().items()}


def assert_untouched(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    for name, tensor in model.state_dict().items():
        assert_bitwise_equal(tensor, before[name], name)


def test_nothing_fits_raises_and_says_which_dtype_to_build_in(qwen):
    """A float16 model over a bfloat16 checkpoint: not one weight can be loaded exactly."""
    path, _ = qwen
    model = build_model("qwen3_moe", seed=5).half()
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # raised, not merely warned
        with pytest.raises(fml.RequestError) as error:
            fml.load_model(model, path)
    message = str(error.value)
    assert "no tensor of the checkpoint fits Qwen3MoeForCausalLM" in message
    assert "build the model in torch.bfloat16" in message
    assert str(path) in message
    assert_untouched(model, before)


def test_nothing_fits_a_model_on_the_meta_device(qwen):
    path, _ = qwen
    config = transformers.AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    with pytest.raises(fml.RequestError, match="nothing was loaded"):
        fml.load_model(model, path)
    assert all(t.device.type == "meta" for t in model.state_dict().values())


def test_unrelated_checkpoint_raises(tmp_path, qwen):
    from safetensors.torch import save_file

    save_file({"encoder.block.0.weight": torch.zeros(4, 4)}, tmp_path / "model.safetensors")
    model = build_model("qwen3_moe", seed=5)
    with pytest.raises(fml.RequestError, match=r"1 checkpoint tensor without a place"):
        fml.load_model(model, tmp_path)


def test_partial_load_warns_by_default_and_lists_each_weight_once(mixtral, qwen):
    """A Qwen3-MoE model pointed at a Mixtral checkpoint: what fits is loaded, the rest is
    told in a warning, and the checkpoint's own model type is named."""
    model = build_model("qwen3_moe", seed=5)
    model.lm_head.weight.data = model.lm_head.weight.data[:, :24].clone()  # a shape mismatch
    with pytest.warns(fml.LoadWarning) as caught:
        report = fml.load_model(model, mixtral)
    (warning,) = caught
    text = str(warning.message)
    assert text.startswith(f"{mixtral} into Qwen3MoeForCausalLM: ")
    assert "the checkpoint is a 'mixtral' model and the model a 'qwen3_moe' one" in text
    assert f"{len(report.missing)} missing" in text
    assert f"{len(report.unexpected)} checkpoint tensors without a place" in text
    assert "lm_head.weight: (64, 24) in the model, (64, 48) in the checkpoint" in text
    assert warning.filename == __file__  # points at the caller's line
    assert report.loaded and report.missing and report.unexpected
    assert set(report.mismatched) == {"lm_head.weight"}
    assert set(report.missing).isdisjoint(report.mismatched)
    assert set(report.loaded).isdisjoint(report.missing)
    # What fits did load: the embedding, bit for bit.
    reference = transformers.AutoModelForCausalLM.from_pretrained(mixtral, dtype=torch.bfloat16)
    assert_bitwise_equal(model.model.embed_tokens.weight, reference.model.embed_tokens.weight)


def test_strict_error_is_actionable(mixtral):
    model = build_model("qwen3_moe", seed=5)
    model.lm_head.weight.data = model.lm_head.weight.data[:, :24].clone()
    before = snapshot(model)
    with pytest.raises(fml.RequestError) as error:
        fml.load_model(model, mixtral, strict=True)
    message = str(error.value)
    assert "strict=True; nothing was written" in message
    assert "is this the model's checkpoint?" in message
    # A mismatched weight is named once, with its reason, and not as missing too.
    assert message.count("lm_head.weight") == 1
    assert "rank" not in message
    assert_untouched(model, before)


def test_expert_mismatch_speaks_of_ranks_only_under_tp_or_ep(qwen):
    path, _ = qwen
    model = build_model("qwen3_moe", seed=5)
    for layer in model.model.layers:  # experts sized for another intermediate size
        experts = layer.mlp.experts
        experts.down_proj = torch.nn.Parameter(experts.down_proj.data[:, :, :20].clone())
    with pytest.raises(fml.RequestError) as error:
        fml.load_model(model, path, strict=True)
    message = str(error.value)
    assert (
        "(5, 48, 20) in the model, the checkpoint's experts are (5, 48, 40): "
        "model.layers.0.mlp.experts.down_proj, model.layers.1.mlp.experts.down_proj"
    ) in message
    # The group loads whole or not at all: gate_up_proj is not called missing.
    assert "missing" not in message
    assert "rank" not in message
    model = build_model("qwen3_moe", seed=5)  # whole experts, loaded as TP rank 1 of 2
    with pytest.raises(fml.RequestError) as error:
        fml.load_model(model, path, tp_rank=1, tp_size=2, ep_size=2, strict=True)
    assert (
        "(5, 80, 48) in the model, this rank's experts (TP rank 1 of 2, EP rank 0 of 2) are "
        "(3, 40, 48)"
    ) in str(error.value)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"tp_size": 0}, "tp_size must be at least 1, got 0"),
        ({"ep_size": 0}, "ep_size must be at least 1, got 0"),
        ({"expert_tp_size": 0}, "expert_tp_size must be at least 1, got 0"),
        ({"tp_rank": 2, "tp_size": 2}, r"tp_rank 2 is not in \[0, tp_size=2\)"),
        ({"ep_rank": -1, "ep_size": 2}, "ep_rank must be at least 0, got -1"),
        ({"tp_size": 2.0}, "tp_size must be an int, got 2.0"),
    ],
)
def test_ranks_and_sizes_are_checked_first(qwen, arguments, message):
    path, _ = qwen
    model = build_model("qwen3_moe", seed=5)
    before = snapshot(model)
    with pytest.raises(fml.RequestError, match=f"^{message}$"):
        fml.load_model(model, path, **arguments)
    assert_untouched(model, before)


def test_report_prints_a_summary_not_every_name(qwen):
    path, _ = qwen
    model = build_model("qwen3_moe", seed=5)
    model.extra = torch.nn.ModuleList(
        torch.nn.Linear(2, 2, dtype=torch.bfloat16) for _ in range(1000)
    )
    with pytest.warns(fml.LoadWarning, match="2000 missing from the checkpoint .* and 1995 more"):
        report = fml.load_model(model, path)
    assert len(report.missing) == 2000
    summary = str(report)
    assert "\n" not in summary and len(summary) < 200
    assert summary.startswith(f"loaded {len(report.loaded)} weights (2 expert groups)")
    assert "2000 missing, 0 unexpected, 0 mismatched" in summary
    assert repr(report) == f"ModelLoadReport({summary})"


def test_warning_is_visible_in_a_plain_interpreter(mixtral, qwen):
    """No logging or warnings set up, as a user's script starts: the warning reaches stderr."""
    path, _ = qwen
    script = (
        "import torch, transformers, fastmoe_load as fml\n"
        f"config = transformers.AutoConfig.from_pretrained({str(path)!r})\n"
        "with torch.device('meta'):\n"
        "    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)\n"
        f"report = fml.load_model(model, {str(mixtral)!r})\n"
        "print(len(report.loaded))\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert child.returncode == 0, child.stderr
    assert int(child.stdout) > 0
    assert "LoadWarning" in child.stderr
    assert "is this the model's checkpoint?" in child.stderr
