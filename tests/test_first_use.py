"""What a new user meets first, said plainly: a device fastmoe_load cannot load into is one
`RequestError` naming it and what to do, before anything is allocated; `destination_shapes`
refuses a TP split with the error `load_fused_moe` gives for it instead of returning shapes no
load fills; and counts read as English ("1 layer", "2 layers")."""

from __future__ import annotations

import json
from pathlib import Path

import fastmoe_load as fml
import pytest
import torch
from safetensors.torch import save_file
from test_bench_cli import assert_one_error_line
from test_cli import run_main

transformers = pytest.importorskip("transformers")

PREFIX = "model.layers.0.mlp.experts"


def fused(path: Path, experts: int = 4, hidden: int = 16, inter: int = 8, layers: int = 1) -> Path:
    """A fused v5 checkpoint: `layers` groups of `experts` experts, H = `hidden`, I = `inter`."""
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(layers):
        prefix = f"model.layers.{layer}.mlp.experts"
        tensors[f"{prefix}.gate_up_proj"] = torch.randn(
            experts, 2 * inter, hidden, generator=gen
        ).to(torch.bfloat16)
        tensors[f"{prefix}.down_proj"] = torch.randn(experts, hidden, inter, generator=gen).to(
            torch.bfloat16
        )
    save_file(tensors, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    return path


# ---- devices ----------------------------------------------------------------------------------


class Untouchable(torch.nn.Module):
    """A model on the meta device that fails the test if it is moved or materialised."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(2, 2, device="meta"))

    def to_empty(self, *args, **kwargs):  # type: ignore[override]
        raise AssertionError("allocated before the device was checked")

    to = to_empty  # type: ignore[assignment]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda", 0)])
def test_load_model_on_cuda_without_a_gpu(tmp_path, device):
    with pytest.raises(fml.RequestError) as raised:
        fml.load_model(Untouchable(), fused(tmp_path / "ckpt"), device=device)
    message = str(raised.value)
    assert message.startswith(f"load_model: device='{device}': no CUDA device here (")
    assert message.endswith("use device='cpu'")


@pytest.mark.parametrize("device", ["mps", "xpu", "meta"])
def test_load_model_into_a_device_it_does_not_load_into(tmp_path, device):
    with pytest.raises(fml.RequestError) as raised:
        fml.load_model(Untouchable(), fused(tmp_path / "ckpt"), device=device)
    assert str(raised.value) == (
        f"load_model: device='{device}': fastmoe_load loads into CPU memory and CUDA devices "
        f"only, not {device}: use device='cpu', then move the tensors or model (.to('{device}'))"
    )


def test_load_model_with_a_device_that_is_not_one(tmp_path):
    with pytest.raises(fml.RequestError, match=r"device='gpu': not a device name \(cpu, cuda"):
        fml.load_model(Untouchable(), fused(tmp_path / "ckpt"), device="gpu")


@pytest.mark.parametrize("device", ["mps", "cuda:99"])
def test_the_command_line_says_it_in_one_line(tmp_path, device):
    result = run_main("bench", "--model", "--device", device, "--dir", tmp_path / "new")
    assert_one_error_line(result, f"--device {device}" if device != "mps" else "'mps'")
    assert not (tmp_path / "new").exists()


# ---- destination_shapes -----------------------------------------------------------------------


def load_error(ckpt: fml.Checkpoint, layer: fml.MoeLayer, tp_size: int) -> str:
    """The error `load_fused_moe` raises for `tp_size`, with destinations of any shape."""
    shard = max(1, layer.intermediate_size // tp_size)
    w13 = torch.empty(layer.num_experts, 2 * shard, layer.hidden_size, dtype=layer.dtype)
    w2 = torch.empty(layer.num_experts, layer.hidden_size, shard, dtype=layer.dtype)
    with pytest.raises(fml.RequestError) as raised:
        fml.load_fused_moe(ckpt, layer.prefix, w13, w2, tp_rank=0, tp_size=tp_size)
    return str(raised.value)


def test_destination_shapes_refuse_a_split_of_the_intermediate_size(tmp_path):
    with fml.open(fused(tmp_path / "ckpt")) as ckpt:
        layer = ckpt.experts(PREFIX)
        with pytest.raises(fml.RequestError) as raised:
            fml.destination_shapes(layer, 8, 3)
        assert str(raised.value) == load_error(ckpt, layer, 3)
        assert "intermediate size 8 does not split into tp_size=3 equal shards" in str(raised.value)
        with pytest.raises(fml.RequestError, match="tp_size must be at least 1, got 0"):
            fml.destination_shapes(layer, 8, 0)
        # What fits is unchanged.
        assert fml.destination_shapes(layer, 8, 2) == {
            "w13": ((8, 8, 16), torch.bfloat16),
            "w2": ((8, 16, 4), torch.bfloat16),
        }


def test_destination_shapes_refuse_a_split_that_cuts_scale_blocks(tmp_path):
    from test_quant import PREFIX as FP8_PREFIX
    from test_quant import per_expert_block

    path = per_expert_block(tmp_path / "ds", torch.float32, "deepseek_v3")  # I = 256
    with fml.open(path) as ckpt:
        layer = ckpt.experts(FP8_PREFIX)
        with pytest.raises(fml.RequestError) as raised:
            fml.destination_shapes(layer, 4, 4)  # 64 rows a rank cut the 128-row blocks
        assert str(raised.value) == load_error(ckpt, layer, 4)
        assert "tp_size that fit: 1, 2" in str(raised.value)
        assert fml.destination_shapes(layer, 4, 2)["w13_weight_scale_inv"][0] == (4, 2, 2)


# ---- counts -----------------------------------------------------------------------------------


def test_plural():
    from fastmoe_load._text import plural

    assert plural(1, "layer") == "1 layer"
    assert plural(0, "layer") == "0 layers"
    assert plural(2, "expert group") == "2 expert groups"
    assert plural(3, "process", "processes") == "3 processes"


def test_counts_of_one_in_inspect_convert_load_model_and_bench(tmp_path):
    ckpt = fused(tmp_path / "one")
    inspected = run_main("inspect", ckpt)
    assert inspected.returncode == 0, inspected.stderr
    assert "files       1 shard, " in inspected.stdout
    assert "; 1 routed-expert group holds " in inspected.stdout
    assert "(linear placement): 1 rank" in inspected.stdout

    converted = run_main("convert", ckpt, tmp_path / "per-expert", "--to", "per_expert")
    assert converted.returncode == 0, converted.stderr
    assert " in 1 shard, " in converted.stdout
    assert ": 1 expert group converted to per_expert, " in converted.stdout

    config = transformers.AutoConfig.for_model(
        "qwen3_moe",
        hidden_size=16,
        intermediate_size=32,
        moe_intermediate_size=8,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=32,
    )
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with pytest.warns(fml.LoadWarning, match="12 missing"):
        report = fml.load_model(model, ckpt)  # its experts only: the rest is missing
    assert "(1 expert group)" in report.summary()

    bench_options = ["--experts", 4, "--hidden", 64, "--intermediate", 32]
    bench = run_main("bench", "--dir", tmp_path / "bench", "--layers", 1, *bench_options)
    assert bench.returncode == 0, bench.stderr
    assert f"checkpoint: {tmp_path / 'bench'} (1 layer of E=4, " in bench.stdout
