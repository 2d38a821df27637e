"""Whole transformers models with fp8 experts: `load_model` into transformers' FP8 modules
(`FP8Experts`, `FP8Linear`) equals `from_pretrained`, bit for bit, for a DeepSeek-V3
checkpoint as released (per-expert fp8 with float32 128x128 block scales, a bfloat16 router
that the model keeps in float32, shared experts quantized too) and for transformers' own
fused v5 save of it; and `convert` output loads in transformers.

Without a GPU, transformers dequantizes fp8 checkpoints to bfloat16 when loading them; here
its environment check is skipped on the CPU so that it keeps its FP8 modules, which is all
that differs (loading pre-quantized weights runs no fp8 kernel). On a GPU it runs as is."""

from __future__ import annotations

import json
from pathlib import Path

import fastmoe_load as fml
import pytest
import torch
from conftest import assert_bitwise_equal, build_model
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")
from transformers.quantizers import AutoHfQuantizer  # noqa: E402
from transformers.quantizers.quantizer_finegrained_fp8 import (  # noqa: E402
    FineGrainedFP8HfQuantizer,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def fp8_modules_on_the_cpu(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setattr(FineGrainedFP8HfQuantizer, "validate_environment", lambda *a, **k: None)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's scheme: float8_e4m3fn and a float32 `weight_scale_inv` per 128 x 128
    block (the sizes here divide into whole blocks)."""
    rows, cols = weight.shape
    blocks = weight.float().reshape(rows // 128, 128, cols // 128, 128)
    scale = blocks.abs().amax(dim=(1, 3), keepdim=True).clamp(min=1e-12) / 448.0
    return (blocks / scale).to(torch.float8_e4m3fn).reshape(rows, cols), scale[:, 0, :, 0]


@pytest.fixture(scope="module")
def deepseek_fp8(tmp_path_factory) -> Path:
    """A DeepSeek-V3 release in miniature: routed and shared experts in fp8 with block
    scales, attention and the dense first layer in bfloat16 (modules_to_not_convert)."""
    model = build_model(
        "deepseek_v3", hidden_size=128, moe_intermediate_size=128, intermediate_size=256
    )
    path = tmp_path_factory.mktemp("deepseek_fp8")
    model.save_pretrained(path, save_original_format=True)
    with fml.open(path) as ckpt:
        tensors = {name: ckpt.tensor(name).clone() for name in ckpt.keys()}
        routed = {name for group in ckpt.moe_layers() for name in group.tensor_names}
    for file in path.glob("*.safetensors*"):
        file.unlink()
    experts = routed | {n for n in tensors if ".shared_experts." in n and n.endswith(".weight")}
    for name in sorted(experts):
        tensors[name], tensors[f"{name}_scale_inv"] = quantize(tensors[name])
    # The release stores the router in bfloat16; the model keeps it in float32.
    router = "model.layers.1.mlp.gate.weight"
    tensors[router] = tensors[router].to(torch.bfloat16)
    save_file(tensors, path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "weight_block_size": [128, 128],
        "modules_to_not_convert": [
            "model.layers.0.mlp",
            "model.layers.0.self_attn",
            "model.layers.1.self_attn",
            "lm_head",
        ],
    }
    (path / "config.json").write_text(json.dumps(config))
    return path


def from_pretrained(path: Path) -> torch.nn.Module:
    on_gpu = {"device_map": DEVICE} if DEVICE == "cuda" else {}
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **on_gpu)


def fp8_meta_model(path: Path) -> torch.nn.Module:
    """The model as transformers builds it before loading: on the meta device, its linear
    and expert modules replaced by the FP8 ones the checkpoint's config asks for."""
    config = transformers.AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    quantizer = AutoHfQuantizer.from_config(config.quantization_config, pre_quantized=True)
    quantizer.preprocess_model(model, dtype=torch.bfloat16)
    return model


def assert_same_state(actual: torch.nn.Module, expected: torch.nn.Module) -> None:
    mine, theirs = actual.state_dict(), expected.state_dict()
    assert mine.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert_bitwise_equal(mine[name], tensor, name)


def test_load_model_fills_fp8_modules_like_from_pretrained(deepseek_fp8):
    reference = from_pretrained(deepseek_fp8)
    kinds = {type(m).__name__ for m in reference.modules()}
    assert {"FP8Experts", "FP8Linear"} <= kinds
    experts = reference.model.layers[1].mlp.experts
    assert experts.gate_up_proj.dtype == torch.float8_e4m3fn
    assert experts.gate_up_proj_scale_inv.shape == (5, 2, 1)

    model = fp8_meta_model(deepseek_fp8)
    report = fml.load_model(model, deepseek_fp8, device=DEVICE, strict=True)
    assert_same_state(model, reference)
    assert not report.missing and not report.mismatched
    assert "model.layers.1.mlp.experts.gate_up_proj_scale_inv" in report.loaded
    # The router: bfloat16 in the release, float32 in the model, widened as transformers does.
    assert report.cast["model.layers.1.mlp.gate.weight"] == "torch.bfloat16 -> torch.float32"


def test_transformers_fused_fp8_save_loads_the_same(deepseek_fp8, tmp_path):
    """transformers' own v5 save of the fp8 model (`gate_up_proj` with `gate_up_proj_scale_inv`)
    is a fused fp8 group for fastmoe_load, and loads to the same model."""
    reference = from_pretrained(deepseek_fp8)
    reference.save_pretrained(tmp_path / "v5", save_original_format=False)
    with fml.open(tmp_path / "v5") as ckpt:
        (group,) = ckpt.moe_layers()
        assert group.format == "fused" and group.quantization.scheme == "block"
    model = fp8_meta_model(tmp_path / "v5")
    fml.load_model(model, tmp_path / "v5", device=DEVICE, strict=True)
    assert_same_state(model, reference)


def test_convert_output_loads_in_transformers(deepseek_fp8, tmp_path):
    from fastmoe_load.cli.convert import convert

    convert(deepseek_fp8, tmp_path / "fused", to="fused", progress=False)
    assert_same_state(from_pretrained(tmp_path / "fused"), from_pretrained(deepseek_fp8))


def test_a_bfloat16_model_is_told_to_use_the_quantization(deepseek_fp8):
    config = transformers.AutoConfig.from_pretrained(deepseek_fp8)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with pytest.raises(fml.RequestError, match=r"quantization_config \(transformers' FP8"):
        fml.load_model(model, deepseek_fp8, strict=True)
