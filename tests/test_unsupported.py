"""Nothing unrecognised goes unnamed: groups that look like routed experts but cannot be loaded
are listed by `Checkpoint.unsupported_groups()` and by `inspect` with the reason, and a
`quantization_config` the loader does not load is said at `open`, once, by name. Checkpoints
with the names, dtypes and shapes of GPTQ int4 releases with activation order (`desc_act`,
which vLLM 0.33 and later refuse; without it GPTQ loads: test_gptq.py) and compressed-tensors
int4 with activation order by group (`weight_g_idx`, refused by vLLM too), and of one with an
unknown modelopt algorithm."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import fastmoe_load as fml
import pytest
import torch
from fastmoe_load.cli import main
from safetensors.torch import load_file, save_file
from test_quant import save

E, H, INTER = 4, 128, 64
LAYERS = 2


def u8(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)


def gptq_qwen3(path: Path, config: bool = True) -> Path:
    """Qwen3-MoE GPTQ int4 with activation order (as AutoGPTQ/GPTQModel write it with
    `desc_act: true`): per expert and module `qweight` int32 `[in/8, out]`, `qzeros` int32
    `[in/group, out/8]`, `scales` float16 `[in/group, out]`, `g_idx` int32 `[in]` (here the
    groups in order; activation order permutes them); the router beside."""
    gen = torch.Generator().manual_seed(0)
    group = 32
    tensors = {}
    for layer in range(LAYERS):
        p = f"model.layers.{layer}.mlp"
        for e in range(E):
            for module, (out, inp) in (
                ("gate_proj", (INTER, H)),
                ("up_proj", (INTER, H)),
                ("down_proj", (H, INTER)),
            ):
                name = f"{p}.experts.{e}.{module}"
                tensors |= {
                    f"{name}.qweight": u8(inp // 8, out * 4, gen=gen).view(torch.int32),
                    f"{name}.qzeros": u8(inp // group, out // 2, gen=gen).view(torch.int32),
                    f"{name}.scales": torch.rand(inp // group, out, generator=gen).half(),
                    f"{name}.g_idx": torch.arange(inp, dtype=torch.int32) // group,
                }
        tensors[f"{p}.gate.weight"] = torch.randn(E, H).bfloat16()
    quant = {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": True}
    return save(path, tensors, "qwen3_moe", quant if config else None)


def int4_act_order(path: Path) -> Path:
    """compressed-tensors int4 `pack-quantized` with activation order by group (`actorder:
    group`): `weight_g_idx` int32 `[in]` beside each packed weight, each input's group in the
    order the quantizer visited them. vLLM 0.33 and later refuse it."""
    import json

    from test_int4 import int4_pack_quantized

    path = int4_pack_quantized(path)
    tensors = load_file(path / "model.safetensors")
    gen = torch.Generator().manual_seed(5)
    for name in [n for n in tensors if n.endswith(".weight_packed")]:
        inputs = tensors[name].shape[1] * 8
        order = torch.randperm(inputs, generator=gen).to(torch.int32)
        tensors[name.removesuffix("weight_packed") + "weight_g_idx"] = order // 32
    save_file(tensors, path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] = "group"
    (path / "config.json").write_text(json.dumps(config))
    return path


def open_quietly(path: Path) -> fml.Checkpoint:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fml.UnsupportedWarning)
        return fml.open(path)


@pytest.mark.parametrize(
    ("make", "scheme"),
    [
        (gptq_qwen3, "gptq int4 with activation order (desc_act)"),
        (
            int4_act_order,
            "compressed-tensors pack-quantized with activation order (actorder: group)",
        ),
    ],
)
def test_unsupported_quantization_named_at_open_once_and_per_group(tmp_path, make, scheme):
    path = make(tmp_path / "ckpt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = fml.open(path)
    opened = [w for w in caught if issubclass(w.category, fml.UnsupportedWarning)]
    assert len(opened) == 1, [str(w.message) for w in caught]
    assert f"declares {scheme} quantization" in str(opened[0].message)
    with ckpt, pytest.warns(fml.UnsupportedWarning, match="cannot be loaded"):
        assert ckpt.moe_layers() == []
    with open_quietly(path) as ckpt:
        with pytest.warns(fml.UnsupportedWarning):
            ckpt.moe_layers()
        groups = ckpt.unsupported_groups()
        assert [g.prefix for g in groups] == [
            f"model.layers.{n}.mlp.experts" for n in range(LAYERS)
        ]
        for group in groups:
            assert group.reason.startswith("unknown quantization:"), group.reason
            assert scheme in group.reason
            # Every tensor of the experts, and nothing of the router beside them.
            expected = sorted(n for n in ckpt.keys() if n.startswith(group.prefix + "."))
            assert sorted(group.tensor_names) == expected
        with pytest.raises(
            fml.LayoutError, match=f"cannot be loaded: unknown quantization.*{re.escape(scheme)}"
        ):
            ckpt.experts(groups[0].prefix)


def test_unknown_modelopt_algorithm_is_named(tmp_path):
    """NVFP4 files under a config that names another ModelOpt algorithm: said at open."""
    from test_nvfp4 import nvfp4_modelopt

    path = nvfp4_modelopt(tmp_path / "ckpt", quant_algo="W4A8_AWQ")
    with pytest.warns(fml.UnsupportedWarning, match="declares modelopt W4A8_AWQ quantization"):
        fml.open(path).close()


def test_without_config_the_tensor_names_give_the_reason(tmp_path):
    path = gptq_qwen3(tmp_path / "ckpt", config=False)
    (path / "config.json").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error", fml.UnsupportedWarning)
        ckpt = fml.open(path)  # nothing declared: nothing to say at open
    with ckpt:
        groups = ckpt.unsupported_groups()
    assert len(groups) == LAYERS
    reason = groups[0].reason
    # The first foreign tensor in file order (safetensors sorts names).
    assert reason.startswith("unknown quantization: `model.layers.0.mlp.experts.0.down_proj.g_idx")
    assert "(I32 [64]) belongs to no quantization scheme" in reason


def test_unknown_naming_beside_a_loadable_group(tmp_path):
    """A loadable bf16 layer and a layer whose experts have no gate (a non-gated MLP, as in
    Nemotron-H): the first loads, the second is named, with the naming the loader knows."""
    gen = torch.Generator().manual_seed(3)
    tensors = {
        "model.layers.0.mlp.experts.gate_up_proj": torch.randn(E, 2 * INTER, H, generator=gen),
        "model.layers.0.mlp.experts.down_proj": torch.randn(E, H, INTER, generator=gen),
        "model.layers.0.mlp.gate.weight": torch.randn(E, H, generator=gen),
        "model.layers.0.mlp.shared_experts.up_proj.weight": torch.randn(INTER, H, generator=gen),
    }
    for e in range(E):
        tensors[f"model.layers.1.mixer.experts.{e}.up_proj.weight"] = torch.randn(INTER, H)
        tensors[f"model.layers.1.mixer.experts.{e}.down_proj.weight"] = torch.randn(H, INTER)
    path = save(tmp_path / "ckpt", tensors, "mixed", None)
    with fml.open(path) as ckpt:
        with pytest.warns(fml.UnsupportedWarning, match="model.layers.1.mixer.experts"):
            layers = ckpt.moe_layers()
        assert [layer.prefix for layer in layers] == ["model.layers.0.mlp.experts"]
        (group,) = ckpt.unsupported_groups()
    assert group.prefix == "model.layers.1.mixer.experts"
    assert group.reason.startswith("unknown naming: `model.layers.1.mixer.experts.0.down_proj")
    assert "gate_proj/up_proj/down_proj" in group.reason
    assert len(group.tensor_names) == 2 * E


def test_unread_tensor_beside_a_loaded_group(tmp_path):
    tensors = {
        "model.layers.0.mlp.experts.gate_up_proj": torch.randn(E, 2 * INTER, H),
        "model.layers.0.mlp.experts.down_proj": torch.randn(E, H, INTER),
        "model.layers.0.mlp.experts.gate_up_proj_lora_A": torch.randn(E, 8, H),
    }
    path = save(tmp_path / "ckpt", tensors, "qwen3_moe", None)
    with fml.open(path) as ckpt, pytest.warns(fml.UnsupportedWarning):
        assert len(ckpt.moe_layers()) == 1
        (group,) = ckpt.unsupported_groups()
    assert group.reason.startswith(
        "unread tensors: `model.layers.0.mlp.experts.gate_up_proj_lora_A"
    )


def test_loadable_checkpoints_name_nothing(tmp_path):
    """Routers, correction biases and shared experts are not routed experts: a DeepSeek-V3
    fp8 checkpoint has nothing unsupported, and neither open nor moe_layers warns."""
    import test_quant

    path = test_quant.per_expert_block(tmp_path / "ds", torch.float32, "deepseek_v3")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with fml.open(path) as ckpt:
            assert len(ckpt.moe_layers()) == 1
            assert ckpt.unsupported_groups() == []


def test_inspect_lists_unsupported_groups(tmp_path, capsys):
    path = gptq_qwen3(tmp_path / "ckpt")
    main(["inspect", str(path)])
    out, err = capsys.readouterr()
    assert err == ""  # the report says it all
    scheme = "gptq int4 with activation order (desc_act)"
    assert f"quantized   {scheme}: not loaded by fastmoe_load" in out
    assert "2 groups of expert tensors cannot be loaded:" in out
    assert f"model.layers.1.mlp.experts ({E * 3 * 4} tensors): unknown quantization:" in out
    assert out.rstrip().endswith("no routed-expert groups found")
    main(["inspect", "--json", str(path)])
    report = json.loads(capsys.readouterr().out)
    assert report["quantization_config"] == scheme
    assert [g["prefix"] for g in report["unsupported"]] == [
        f"model.layers.{n}.mlp.experts" for n in range(LAYERS)
    ]
    assert all(g["reason"].startswith("unknown quantization") for g in report["unsupported"])
