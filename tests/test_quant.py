"""Quantized experts: fp8 weights with their scales, on checkpoints with the names, dtypes and
grids of real releases (DeepSeek-V3, Qwen3-FP8, transformers v5 fused fp8, compressed-tensors
per-channel and per-tensor), loaded into the parameters vLLM's fp8 MoE methods create and
compared bit for bit with the pure-Python vLLM path and with slices taken by hand."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import fastmoe_load as fml
import pytest
import torch
from conftest import assert_bitwise_equal, group_error, poisoned
from fastmoe_load.bench.seed import seed_load
from safetensors.torch import load_file, save_file

FP8 = torch.float8_e4m3fn
E, H, INTER = 4, 256, 256
PREFIX = "model.layers.1.mlp.experts"
MODULES = ("gate_proj", "up_proj", "down_proj")
BLOCK_CONFIG = {
    "quant_method": "fp8",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}


def fp8(*shape: int, gen: torch.Generator) -> torch.Tensor:
    """Random fp8 bytes (every bit pattern, NaNs included: compared as bytes)."""
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen).view(FP8)


def scale(*shape: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return (torch.rand(shape, generator=gen) * 4 + 0.01).to(dtype)


def dims(module: str, hidden: int, inter: int) -> tuple[int, int]:
    return (hidden, inter) if module == "down_proj" else (inter, hidden)


def save(path: Path, tensors: dict[str, torch.Tensor], model_type: str, quant: dict | None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors")
    config: dict = {"model_type": model_type}
    if quant is not None:
        config["quantization_config"] = quant
    (path / "config.json").write_text(json.dumps(config))
    return path


def per_expert_block(
    path: Path, scale_dtype: torch.dtype, model_type: str, inter: int = INTER
) -> Path:
    """DeepSeek-V3 / Qwen3-FP8: per-expert fp8 weights and `weight_scale_inv` block scales,
    with DeepSeek's bfloat16 router, float32 correction bias and fp8 shared expert beside."""
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for e in range(E):
        for module in MODULES:
            rows, cols = dims(module, H, inter)
            tensors[f"{PREFIX}.{e}.{module}.weight"] = fp8(rows, cols, gen=gen)
            tensors[f"{PREFIX}.{e}.{module}.weight_scale_inv"] = scale(
                math.ceil(rows / 128), math.ceil(cols / 128), dtype=scale_dtype, gen=gen
            )
    mlp = PREFIX.removesuffix(".experts")
    tensors[f"{mlp}.gate.weight"] = torch.randn(E, H, generator=gen).to(torch.bfloat16)
    tensors[f"{mlp}.gate.e_score_correction_bias"] = torch.randn(E, generator=gen)
    for module in MODULES:
        rows, cols = dims(module, H, 128)
        tensors[f"{mlp}.shared_experts.{module}.weight"] = fp8(rows, cols, gen=gen)
        tensors[f"{mlp}.shared_experts.{module}.weight_scale_inv"] = scale(
            math.ceil(rows / 128), math.ceil(cols / 128), dtype=scale_dtype, gen=gen
        )
    return save(path, tensors, model_type, BLOCK_CONFIG)


def fused_block(path: Path) -> Path:
    """transformers v5 `FP8Experts`: `gate_up_proj [E, 2I, H]` with `gate_up_proj_scale_inv
    [E, 2I/128, H/128]`, `down_proj [E, H, I]` with `down_proj_scale_inv [E, H/128, I/128]`."""
    gen = torch.Generator().manual_seed(2)
    tensors = {
        f"{PREFIX}.gate_up_proj": fp8(E, 2 * INTER, H, gen=gen),
        f"{PREFIX}.gate_up_proj_scale_inv": scale(
            E, 2 * INTER // 128, H // 128, dtype=torch.float32, gen=gen
        ),
        f"{PREFIX}.down_proj": fp8(E, H, INTER, gen=gen),
        f"{PREFIX}.down_proj_scale_inv": scale(
            E, H // 128, INTER // 128, dtype=torch.float32, gen=gen
        ),
    }
    return save(path, tensors, "qwen3_moe", BLOCK_CONFIG)


def compressed_tensors(
    path: Path, strategy: str, input_scales: tuple[float, float] | None = None
) -> Path:
    """compressed-tensors FP8 (`float-quantized`) as llm-compressor writes its two schemes
    that vLLM serves: FP8_DYNAMIC, `weight_scale [out, 1]` per channel with dynamic per-token
    activations; FP8 static, `weight_scale [1]` per tensor with `input_scale [1]`, gate's
    and up's the same unless `input_scales` gives every expert's (gate's, up's)."""
    gen = torch.Generator().manual_seed(3)
    tensors = {}
    for e in range(E):
        for module in MODULES:
            rows, cols = dims(module, H, INTER)
            name = f"{PREFIX}.{e}.{module}"
            tensors[f"{name}.weight"] = fp8(rows, cols, gen=gen)
            shape = (rows, 1) if strategy == "channel" else (1,)
            tensors[f"{name}.weight_scale"] = scale(*shape, dtype=torch.float32, gen=gen)
            if strategy == "tensor" and input_scales is not None and module != "down_proj":
                value = input_scales[module == "up_proj"]
                tensors[f"{name}.input_scale"] = torch.tensor([value], dtype=torch.float32)
            elif strategy == "tensor":  # gate and up read the same activations
                reuse = module == "up_proj"
                tensors[f"{name}.input_scale"] = (
                    tensors[f"{PREFIX}.{e}.gate_proj.input_scale"].clone()
                    if reuse
                    else scale(1, dtype=torch.float32, gen=gen)
                )
    scheme = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False}
    activations = (
        {**scheme, "strategy": "tensor"}
        if strategy == "tensor"
        else {**scheme, "strategy": "token", "dynamic": True}
    )
    quant = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {**scheme, "strategy": strategy},
                "input_activations": activations,
            }
        },
        "ignore": ["lm_head"],
    }
    return save(path, tensors, "qwen3_moe", quant)


CHECKPOINTS = {
    "deepseek_v3_f32_scales": lambda p: per_expert_block(p, torch.float32, "deepseek_v3"),
    "qwen3_fp8_bf16_scales": lambda p: per_expert_block(p, torch.bfloat16, "qwen3_moe"),
    "transformers_fused_fp8": fused_block,
    "compressed_tensors_channel": lambda p: compressed_tensors(p, "channel"),
    "compressed_tensors_tensor": lambda p: compressed_tensors(p, "tensor"),
}
# (tp_rank, tp_size, local experts): TP=1, TP rank 1 of 2, EP rank 1 of 2, EPLB replicas.
REQUESTS = [(0, 1, None), (1, 2, None), (0, 1, [2, 3]), (1, 2, [3, 0, 3])]


def destinations(layer: fml.MoeLayer, tp_size: int, n: int) -> tuple[torch.Tensor, ...]:
    """vLLM's fp8 parameters for one layer: weights in the file's fp8, scales in float32."""
    shard = layer.intermediate_size // tp_size
    w13 = poisoned((n, 2 * shard, layer.hidden_size), FP8)
    w2 = poisoned((n, layer.hidden_size, shard), FP8)
    scales = {}
    for c in layer.quantization.companions:
        for target in ("w13", "w2"):
            shape = c.destination_shape(target, n, layer.hidden_size, shard)
            scales[f"{target}_{c.kind}"] = poisoned(shape, torch.float32)
    return w13, w2, scales


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def checkpoint(request, tmp_path_factory) -> tuple[str, Path]:
    return request.param, CHECKPOINTS[request.param](tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("tp_rank, tp_size, experts", REQUESTS)
def test_weights_and_scales_equal_the_vllm_path(checkpoint, tp_rank, tp_size, experts):
    name, path = checkpoint
    with fml.open(path) as ckpt:
        layer = ckpt.experts(PREFIX)
        assert layer.dtype == FP8 and layer.quantization is not None
        n = layer.num_experts if experts is None else len(experts)
        w13, w2, scales = destinations(layer, tp_size, n)
        stats = fml.load_fused_moe(
            ckpt,
            PREFIX,
            w13,
            w2,
            tp_rank=tp_rank,
            tp_size=tp_size,
            local_experts=experts,
            scales=scales,
            allow_cast=True,
        )
        ref13, ref2, ref_scales = destinations(layer, tp_size, n)
        seed_load(
            str(path),
            layer,
            ref13,
            ref2,
            tp_rank=tp_rank,
            tp_size=tp_size,
            local_experts=experts,
            scales=ref_scales,
        )
    assert_bitwise_equal(w13, ref13, f"{name}: w13")
    assert_bitwise_equal(w2, ref2, f"{name}: w2")
    for param, tensor in scales.items():
        assert not tensor.isnan().any(), f"{name}: {param} not filled"
        assert_bitwise_equal(tensor, ref_scales[param], f"{name}: {param}")
    scale_bytes = sum(
        t.numel() * c.dtype.itemsize
        for c in layer.quantization.companions
        for target, t in scales.items()
        if target.endswith(c.kind)
    )
    assert stats.bytes == w13.nbytes + w2.nbytes + scale_bytes


def test_block_scales_by_hand(tmp_path):
    """The rank's rows of the gate and up scales, and columns of down's, straight from the
    file: an independent check of both the library and the seed reference."""
    path = per_expert_block(tmp_path / "ds", torch.float32, "deepseek_v3", inter=512)
    experts = [3, 1]
    with fml.open(path) as ckpt:
        layer = ckpt.experts(PREFIX)
        w13, w2, scales = destinations(layer, 2, len(experts))
        fml.load_fused_moe(
            ckpt, PREFIX, w13, w2, tp_rank=1, tp_size=2, local_experts=experts, scales=scales
        )
        for slot, e in enumerate(experts):
            gate = ckpt.tensor(f"{PREFIX}.{e}.gate_proj.weight_scale_inv")
            up = ckpt.tensor(f"{PREFIX}.{e}.up_proj.weight_scale_inv")
            down = ckpt.tensor(f"{PREFIX}.{e}.down_proj.weight_scale_inv")
            assert torch.equal(scales["w13_weight_scale_inv"][slot], torch.cat([gate[2:], up[2:]]))
            assert torch.equal(scales["w2_weight_scale_inv"][slot], down[:, 2:])
            assert torch.equal(layer.w1_scale(e), gate) and torch.equal(layer.w2_scale(e), down)
            w1 = ckpt.tensor(f"{PREFIX}.{e}.gate_proj.weight")
            assert_bitwise_equal(w13[slot, :256], w1[256:], "gate rows of TP rank 1")


def test_quantization_is_described(tmp_path):
    path = per_expert_block(tmp_path / "q", torch.bfloat16, "qwen3_moe")
    with fml.open(path) as ckpt:
        (layer,) = ckpt.moe_layers()  # the shared expert is a dense weight, not a group
        q = layer.quantization
        assert (q.method, q.scheme, q.block_size) == ("fp8", "block", (128, 128))
        assert q.weight_scale.dtype == torch.bfloat16
        assert [c.kind for c in q.companions] == ["weight_scale_inv"]
        assert f"{PREFIX}.2.down_proj.weight_scale_inv" in layer.tensor_names
        assert "fp8, 128x128 block scales in bfloat16" in repr(layer)
        assert layer.companion("weight_scale_inv", "w3", 1).shape == (2, 2)
    path = compressed_tensors(tmp_path / "ct", "channel")
    with fml.open(path) as ckpt:
        q = ckpt.experts(PREFIX).quantization
        assert (q.method, q.scheme, q.block_size) == ("compressed-tensors", "channel", None)
        assert [c.kind for c in q.companions] == ["weight_scale"]
        assert ckpt.experts(PREFIX).w2_scale(0).shape == (H, 1)
    path = compressed_tensors(tmp_path / "ct_tensor", "tensor")
    with fml.open(path) as ckpt:
        q = ckpt.experts(PREFIX).quantization
        assert q.scheme == "tensor"
        assert {c.kind: c.merged_w13 for c in q.companions} == {
            "weight_scale": False,
            "input_scale": True,
        }
        assert ckpt.experts(PREFIX).companion("input_scale", "w3", 2).shape == (1, 1)


def test_a_split_that_cuts_a_block_names_the_sizes_that_fit(tmp_path):
    # I = 384: tp=2 gives 192 rows per rank, half a 128-row block. vLLM refuses it too.
    path = per_expert_block(tmp_path / "odd", torch.float32, "deepseek_v3", inter=384)
    with fml.open(path) as ckpt:
        layer = ckpt.experts(PREFIX)
        w13, w2, scales = destinations(layer, 2, E)
        with pytest.raises(
            fml.RequestError, match=r"tp_size=2 gives each rank 192 .*tp_size that fit: 1, 3"
        ):
            fml.load_fused_moe(ckpt, PREFIX, w13, w2, tp_rank=1, tp_size=2, scales=scales)
        assert w13.float().isnan().all() and scales["w13_weight_scale_inv"].isnan().all()


def test_scale_dtypes_convert_only_when_asked(tmp_path):
    path = per_expert_block(tmp_path / "bf16", torch.bfloat16, "qwen3_moe")
    with fml.open(path) as ckpt:
        layer = ckpt.experts(PREFIX)
        w13, w2, scales = destinations(layer, 1, E)
        with pytest.raises(fml.RequestError, match="allow_cast=True"):
            fml.load_fused_moe(ckpt, PREFIX, w13, w2, scales=scales)
        assert scales["w2_weight_scale_inv"].isnan().all()
        fml.load_fused_moe(ckpt, PREFIX, w13, w2, scales=scales, allow_cast=True)
        for e in range(E):  # bfloat16 -> float32 is exact
            assert torch.equal(scales["w2_weight_scale_inv"][e], layer.w2_scale(e).float())
        # The file's own dtype needs no opt-in.
        # A scale filled elsewhere is named with None.
        native = {
            "w2_weight_scale_inv": torch.empty(E, 2, 2, dtype=torch.bfloat16),
            "w13_weight_scale_inv": None,
        }
        fml.load_fused_moe(ckpt, PREFIX, w13, w2, scales=native)
        assert torch.equal(native["w2_weight_scale_inv"][3], layer.w2_scale(3))


def test_wrong_scale_destinations_are_refused(tmp_path):
    path = per_expert_block(tmp_path / "ds", torch.float32, "deepseek_v3")
    with fml.open(path) as ckpt:
        layer = ckpt.experts(PREFIX)
        w13, w2, scales = destinations(layer, 1, E)
        with pytest.raises(
            fml.RequestError, match="no scales for w13_weight_scale: its scales fill"
        ):
            fml.load_fused_moe(
                ckpt, PREFIX, w13, w2, scales={"w13_weight_scale": scales["w13_weight_scale_inv"]}
            )
        wrong = {"w13_weight_scale_inv": torch.empty(E, 2, 2), "w2_weight_scale_inv": None}
        with pytest.raises(
            fml.RequestError,
            match=r"w13_weight_scale_inv has shape \(4, 2, 2\), expected \(4, 4, 2\)",
        ):
            fml.load_fused_moe(ckpt, PREFIX, w13, w2, scales=wrong)
        assert w13.float().isnan().all()


def test_quantized_weights_without_their_scales_are_refused(tmp_path):
    """fp8 weights loaded with no scales, or some missing, mean nothing: refused before a
    byte is written, naming what is missing and how to leave one out on purpose."""
    path = per_expert_block(tmp_path / "ds", torch.float32, "deepseek_v3")
    with fml.open(path) as ckpt:
        layer = ckpt.experts(PREFIX)
        w13, w2, scales = destinations(layer, 1, E)
        for given in (None, {"w13_weight_scale_inv": scales["w13_weight_scale_inv"]}):
            with pytest.raises(
                fml.RequestError,
                match=r"scales has no (w13_weight_scale_inv, )?w2_weight_scale_inv: pass",
            ):
                fml.load_fused_moe(ckpt, PREFIX, w13, w2, scales=given)
        assert w13.float().isnan().all()
        assert scales["w13_weight_scale_inv"].isnan().all()


def test_packed_and_encoded_values_are_never_cast(tmp_path):
    """allow_cast converts floating-point values only: packed fp4 bytes or e8m0 exponents
    stored as bytes are refused into a float destination, which stays untouched."""
    import test_mxfp4

    path = test_mxfp4.gpt_oss_mxfp4(tmp_path / "mxfp4")
    with fml.open(path) as ckpt:
        layer = ckpt.experts(test_mxfp4.prefix())
        shapes = fml.loader.destination_shapes(layer, layer.num_experts, 1)
        for cast in ("w13", "w13_weight_scale"):
            got = {
                k: torch.full(shape, float("nan")) if k == cast else torch.zeros(shape, dtype=d)
                for k, (shape, d) in shapes.items()
            }
            with pytest.raises(fml.RequestError, match=f"{cast} has dtype torch.float32 but"):
                fml.load_fused_moe(
                    ckpt,
                    layer.prefix,
                    got.pop("w13"),
                    got.pop("w2"),
                    w13_bias=got.pop("w13_bias"),
                    w2_bias=got.pop("w2_bias"),
                    scales=got,
                    allow_cast=True,
                )


@pytest.mark.parametrize(
    "damage, message",
    [
        ("drop_scale", r"`model.layers.1.mlp.experts.2.up_proj.weight_scale_inv` is missing"),
        ("no_scales", r"are F8_E4M3 but have no scales beside them"),
        ("bad_grid", r"has shape \[3, 2\], which is no scale grid of its \[256, 256\] weight"),
        ("contradicts_config", r"config.json declares compressed-tensors with channel scales"),
    ],
)
def test_inconsistent_quantized_checkpoints_raise_layout_errors(tmp_path, damage, message):
    path = per_expert_block(tmp_path / "ds", torch.float32, "deepseek_v3")
    file = path / "model.safetensors"
    tensors = load_file(file)
    if damage == "drop_scale":
        del tensors[f"{PREFIX}.2.up_proj.weight_scale_inv"]
    elif damage == "no_scales":
        tensors = {k: v for k, v in tensors.items() if not k.endswith("scale_inv")}
    elif damage == "bad_grid":
        tensors[f"{PREFIX}.0.gate_proj.weight_scale_inv"] = torch.ones(3, 2)
    else:
        quant = {
            "quant_method": "compressed-tensors",
            "config_groups": {"g": {"weights": {"type": "float", "strategy": "channel"}}},
        }
        (path / "config.json").write_text(json.dumps({"quantization_config": quant}))
    save_file(tensors, file)
    with fml.open(path) as ckpt:
        error = group_error(ckpt)
    assert re.search(message, error)
    assert str(path) in error and PREFIX in error


def test_inspect_names_the_scheme_and_counts_scale_bytes(tmp_path):
    import subprocess
    import sys

    path = per_expert_block(tmp_path / "ds", torch.float32, "deepseek_v3")
    out = subprocess.run(
        [sys.executable, "-m", "fastmoe_load", "inspect", str(path), "--tp", "2", "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    report = json.loads(out)
    (layer_report,) = report["layers"]
    assert layer_report["quantization"] == "fp8, 128x128 block scales in float32 (weight_scale_inv)"
    with fml.open(path) as ckpt:
        layer = ckpt.experts(PREFIX)
        for rank in layer_report["ranks"]:
            w13, w2, scales = destinations(layer, 2, E)
            stats = fml.load_fused_moe(
                ckpt, PREFIX, w13, w2, tp_rank=rank["tp_rank"], tp_size=2, scales=scales
            )
            assert rank["bytes"] == stats.bytes
            assert stats.bytes == w13.nbytes + w2.nbytes + sum(s.nbytes for s in scales.values())
    table = subprocess.run(
        [sys.executable, "-m", "fastmoe_load", "inspect", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "quantized   fp8, 128x128 block scales in float32 (weight_scale_inv)" in table


def test_convert_carries_block_scales_both_ways(tmp_path):
    from fastmoe_load.cli.convert import convert

    source = per_expert_block(tmp_path / "ds", torch.float32, "deepseek_v3")
    convert(source, tmp_path / "fused", to="fused", progress=False)
    convert(tmp_path / "fused", tmp_path / "back", to="per_expert", progress=False)
    original = load_file(source / "model.safetensors")
    fused = {}
    for file in (tmp_path / "fused").glob("*.safetensors"):
        fused |= load_file(file)
    # transformers' FP8Experts names and shapes.
    assert fused[f"{PREFIX}.gate_up_proj_scale_inv"].shape == (E, 2 * INTER // 128, H // 128)
    assert fused[f"{PREFIX}.down_proj_scale_inv"].shape == (E, H // 128, INTER // 128)
    for e in range(E):
        gate = original[f"{PREFIX}.{e}.gate_proj.weight_scale_inv"]
        up = original[f"{PREFIX}.{e}.up_proj.weight_scale_inv"]
        assert torch.equal(fused[f"{PREFIX}.gate_up_proj_scale_inv"][e], torch.cat([gate, up]))
    with fml.open(tmp_path / "fused") as ckpt:
        assert ckpt.experts(PREFIX).quantization.scheme == "block"
    back = {}
    for file in (tmp_path / "back").glob("*.safetensors"):
        back |= load_file(file)
    assert back.keys() == original.keys()
    for name, tensor in original.items():
        assert_bitwise_equal(back[name], tensor, name)


def test_convert_refuses_scales_without_a_fused_form(tmp_path):
    from fastmoe_load.cli.convert import convert

    source = compressed_tensors(tmp_path / "ct", "tensor")
    with pytest.raises(
        fml.RequestError, match=r"weight_scale beside their weights .* no fused transformers form"
    ):
        convert(source, tmp_path / "refused", to="fused", progress=False)
    assert not (tmp_path / "refused").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["qwen3_fp8_bf16_scales", "compressed_tensors_tensor"])
@pytest.mark.parametrize("tp_rank, tp_size, experts", REQUESTS)
def test_cuda_destinations_equal_cpu_ones(tmp_path, name, tp_rank, tp_size, experts):
    """Weights and scales through the pinned staging pipeline (tiny buffers: many windows,
    scales sharing them), bfloat16 scales converted on the GPU."""
    path = CHECKPOINTS[name](tmp_path / name)
    with fml.open(path, staging_bytes=1 << 20, staging_buffers=2) as ckpt:
        layer = ckpt.experts(PREFIX)
        n = layer.num_experts if experts is None else len(experts)
        loads = {}
        for device in ("cpu", "cuda"):
            w13, w2, scales = destinations(layer, tp_size, n)
            w13, w2 = w13.to(device), w2.to(device)
            scales = {k: v.to(device) for k, v in scales.items()}
            fml.load_fused_moe(
                ckpt,
                PREFIX,
                w13,
                w2,
                tp_rank=tp_rank,
                tp_size=tp_size,
                local_experts=experts,
                scales=scales,
                allow_cast=True,
            )
            loads[device] = {"w13": w13, "w2": w2, **scales}
    for key, expected in loads["cpu"].items():
        assert_bitwise_equal(loads["cuda"][key].cpu(), expected, key)


@pytest.mark.parametrize("layout", ["compressed_tensors_channel", "compressed_tensors_tensor"])
def test_interleaved_w13_from_files_that_keep_gate_and_up_apart(tmp_path, layout):
    """`w13_interleaved=True` from per-expert files: gate row r then up row r, per-row scales
    alike, per-tensor `[gate, up]` scales as they are; equal to the gate-then-up load with
    its rows interleaved by hand. Block scales span several rows: refused, naming that."""
    path = CHECKPOINTS[layout](tmp_path / layout)
    with fml.open(path) as ckpt:
        layer = ckpt.experts(PREFIX)
        shapes = fml.loader.destination_shapes(layer, 3, 2)

        def load(pairs: bool) -> dict[str, torch.Tensor]:
            got = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in shapes.items()}
            for tensor in got.values():
                tensor.view(torch.uint8).fill_(0xAB)
            fml.load_fused_moe(
                ckpt,
                PREFIX,
                got["w13"],
                got["w2"],
                tp_rank=1,
                tp_size=2,
                local_experts=[3, 0, 3],
                scales={k: v for k, v in got.items() if k not in ("w13", "w2")},
                w13_interleaved=pairs,
            )
            return got

        apart, pairs = load(False), load(True)
    for name, tensor in apart.items():
        if name == "w13" or (name.startswith("w13") and tensor.dim() == 3):
            tensor = tensor.unflatten(1, (2, -1)).transpose(1, 2).flatten(1, 2)
        assert_bitwise_equal(pairs[name], tensor, name)


def test_block_scales_cannot_be_interleaved(tmp_path):
    path = CHECKPOINTS["deepseek_v3_f32_scales"](tmp_path / "ds")
    with fml.open(path) as ckpt, pytest.raises(fml.RequestError, match="cannot be interleaved"):
        layer = ckpt.experts(PREFIX)
        shapes = fml.loader.destination_shapes(layer, E, 1)
        fml.load_fused_moe(
            ckpt,
            PREFIX,
            torch.empty(shapes["w13"][0], dtype=layer.dtype),
            torch.empty(shapes["w2"][0], dtype=layer.dtype),
            scales={
                k: torch.empty(shape, dtype=dtype)
                for k, (shape, dtype) in shapes.items()
                if "scale" in k
            },
            w13_interleaved=True,
        )


def test_quantized_weights_are_never_cast_without_their_scales(tmp_path):
    """allow_cast=True with bfloat16 destinations for fp8 experts would copy e4m3 values
    without their scales: refused, naming the dtypes, every destination untouched."""
    path = per_expert_block(tmp_path / "ds", torch.float32, "deepseek_v3")
    with fml.open(path) as ckpt:
        layer = ckpt.experts(PREFIX)
        _, _, scales = destinations(layer, 1, E)
        w13 = poisoned((E, 2 * INTER, H))
        w2 = poisoned((E, H, INTER))
        with pytest.raises(
            fml.RequestError,
            match=r"w13 has dtype torch.bfloat16 but the checkpoint stores quantized "
            r"torch.float8_e4m3fn weights.*a cast would drop the scales",
        ):
            fml.load_fused_moe(ckpt, PREFIX, w13, w2, scales=scales, allow_cast=True)
        assert w13.isnan().all() and w2.isnan().all()
        assert all(s.isnan().all() for s in scales.values())
