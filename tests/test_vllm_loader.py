"""The vLLM model loader (`load_format="fastmoe"`) against vLLM's own `DefaultModelLoader`:
whole vLLM models (vLLM >= 0.33, built on the CPU) from tiny transformers checkpoints, fused
v5 and per-expert, loaded both ways and compared bit for bit. Skipped where vLLM is not
installed (it is not a test dependency: it pins its own torch)."""

from __future__ import annotations

import functools
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
vllm = pytest.importorskip("vllm")

import fastmoe_load as fml  # noqa: E402
from conftest import FAMILIES, bits, build_model  # noqa: E402
from fastmoe_load.engines import vllm_loader  # noqa: E402

# vLLM's CPU MoE kernels want hidden and intermediate sizes that are multiples of 32, and do
# not pad gpt-oss's intermediate size, so these models are wider than conftest's.
WIDER = {"hidden_size": 64}
WIDER_FAMILY = {"gpt_oss": {"intermediate_size": 64}}
# (family, saved in its original per-expert format, model dtype). Mixtral's fused v5 save is
# left out: v5 renames `block_sparse_moe` to `mlp`, which vLLM 0.33's Mixtral does not read.
# float32 models take bf16 experts converted as vLLM's loader converts them.
CASES = [
    ("qwen3_moe", False, "bfloat16"),
    ("qwen3_moe", True, "bfloat16"),
    ("mixtral", True, "bfloat16"),
    ("gpt_oss", False, "bfloat16"),
    ("gpt_oss", True, "bfloat16"),
    ("qwen3_moe", False, "float32"),
]


@pytest.fixture(scope="module")
def distributed(vllm_process_groups):
    vllm_loader.register()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(family, original format) -> a sharded transformers checkpoint of random weights."""
    saved = {}
    for family in dict.fromkeys(family for family, _, _ in CASES):
        model = build_model(family, **WIDER, **WIDER_FAMILY.get(family, {}))
        for original in (True, False):
            path = tmp_path_factory.mktemp(f"{family}-{'orig' if original else 'v5'}")
            model.save_pretrained(path, max_shard_size="40KB", save_original_format=original)
            saved[family, original] = path
    return saved


def vllm_config(path, load_format: str, dtype: str = "bfloat16", quantization=None):
    """A fresh config per model: vLLM registers each model's attention layers in it."""
    from vllm.config import DeviceConfig, LoadConfig, ModelConfig, VllmConfig

    model_config = ModelConfig(
        model=str(path),
        dtype=dtype,
        skip_tokenizer_init=True,
        enforce_eager=True,
        quantization=quantization,
    )
    # Every model fastmoe_load loads here proves that each parameter was written exactly
    # once, by fastmoe_load or by the model's own load_weights, quantized ones included.
    extra = {"enable_weights_track": True} if load_format == "fastmoe" else {}
    return VllmConfig(
        model_config=model_config,
        load_config=LoadConfig(load_format=load_format, model_loader_extra_config=extra),
        device_config=DeviceConfig(device="cpu"),
    )


def load(
    path, load_format: str, dtype: str = "bfloat16", rename=lambda name: name, quantization=None
) -> tuple[torch.nn.Module, list[str]]:
    """A vLLM model built with NaN parameters and loaded by the `load_format` loader; with
    the checkpoint names that reached the model's own `load_weights` (given it `rename`d)."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.utils.torch_utils import set_default_torch_dtype

    config = vllm_config(path, load_format, dtype, quantization)
    with set_current_vllm_config(config):
        with set_default_torch_dtype(config.model_config.dtype), torch.device("cpu"):
            model = initialize_model(vllm_config=config, model_config=config.model_config)
        with torch.no_grad():
            for param in model.parameters():
                if param.is_floating_point():
                    param.fill_(float("nan"))
                else:  # packed integer weights: a byte pattern no test writes
                    param.view(torch.uint8).fill_(0xA5)
        received: list[str] = []
        model_load_weights = model.load_weights

        def recording_load_weights(weights):
            return model_load_weights(
                (received.append(name) or (rename(name), t) for name, t in weights)
            )

        model.load_weights = recording_load_weights
        loader = get_model_loader(config.load_config)
        loader.load_weights(model, config.model_config)
    return model, received


def assert_same_state(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    expected = theirs.state_dict()
    actual = ours.state_dict()
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert actual[name].shape == tensor.shape, name
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(bits(actual[name].reshape(-1)), bits(tensor.reshape(-1))), name


@pytest.mark.parametrize(("family", "original", "dtype"), CASES)
def test_loader_matches_default_loader(distributed, checkpoints, family, original, dtype):
    path = checkpoints[family, original]
    theirs, _ = load(path, "safetensors", dtype)
    ours, received = load(path, "fastmoe", dtype)
    assert_same_state(ours, theirs)
    for name, param in ours.named_parameters():
        assert not param.isnan().any(), f"{name} was not loaded"

    with fml.open(path) as ckpt:
        groups = ckpt.moe_layers()
        expert_names = {name for group in groups for name in group.tensor_names}
        everything = set(ckpt.keys())
    assert len(groups) == FAMILIES[family]["num_hidden_layers"]
    # Of any dtype (a float32 model converts as vLLM's loader does), experts never reach the
    # model's own load_weights.
    assert set(received) == everything - expert_names


def quantize_fp8_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's scheme: float8_e4m3fn values and float32 `weight_scale_inv` per 128 x 128
    block of the last two dimensions (which divide into whole blocks here)."""
    *lead, rows, cols = weight.shape
    blocks = weight.float().reshape(*lead, rows // 128, 128, cols // 128, 128)
    scale = blocks.abs().amax(dim=(-3, -1), keepdim=True).clamp(min=1e-12) / 448.0
    values = (blocks / scale).to(torch.float8_e4m3fn).reshape(weight.shape)
    return values, scale.squeeze(-1).squeeze(-2)


@pytest.fixture(scope="module")
def fp8_checkpoints(tmp_path_factory):
    """Qwen3-MoE with fp8 block-scaled experts (router and attention left in bfloat16 through
    `modules_to_not_convert`), per-expert and fused v5 saves, sizes on vLLM's 128-entry
    blocks."""
    import json

    sizes = {"hidden_size": 128, "moe_intermediate_size": 128, "head_dim": 32}
    model = build_model("qwen3_moe", **sizes)
    layers = model.config.num_hidden_layers
    saved = {}
    for original in (True, False):
        path = tmp_path_factory.mktemp(f"fp8-{'orig' if original else 'v5'}")
        model.save_pretrained(path, save_original_format=original)
        with fml.open(path) as ckpt:
            tensors = {name: ckpt.tensor(name).clone() for name in ckpt.keys()}
            experts = {n for group in ckpt.moe_layers() for n in group.tensor_names}
        for file in path.glob("*.safetensors*"):
            file.unlink()
        for name in sorted(experts):
            stem = name.removesuffix(".weight")
            (
                tensors[name],
                tensors[f"{stem}_scale_inv" if stem == name else f"{stem}.weight_scale_inv"],
            ) = quantize_fp8_blocks(tensors[name])
        save_file(tensors, path / "model.safetensors")
        config = json.loads((path / "config.json").read_text())
        config["quantization_config"] = {
            "quant_method": "fp8",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
            # As Qwen3-FP8 releases list them: the router stays unquantized.
            "modules_to_not_convert": [
                f"model.layers.{i}.{m}"
                for i in range(layers)
                for m in (
                    "mlp.gate",
                    "self_attn.q_proj",
                    "self_attn.k_proj",
                    "self_attn.v_proj",
                    "self_attn.o_proj",
                )
            ],
        }
        (path / "config.json").write_text(json.dumps(config))
        saved[original] = path
    return saved


@pytest.mark.parametrize("original", [True, False])
def test_fp8_model_matches_default_loader(distributed, fp8_checkpoints, original):
    """A whole fp8 model (`Fp8MoEMethod` experts with block scales): every parameter equal to
    vLLM's own loading, and neither expert weights nor scales through the model's loader."""
    path = fp8_checkpoints[original]
    theirs, _ = load(path, "safetensors")
    ours, received = load(path, "fastmoe")
    assert_same_state(ours, theirs)
    scales = [n for n, _ in ours.named_parameters() if n.endswith("w13_weight_scale_inv")]
    assert len(scales) == FAMILIES["qwen3_moe"]["num_hidden_layers"]
    with fml.open(path) as ckpt:
        groups = ckpt.moe_layers()
        assert all(g.quantization.scheme == "block" for g in groups)
        expert_names = {name for group in groups for name in group.tensor_names}
        assert set(received) == set(ckpt.keys()) - expert_names


def test_load_model_selects_the_loader_by_load_format(distributed, checkpoints, monkeypatch):
    """The whole `load_model` of vLLM's base loader, up to the kernels' weight repacking,
    which needs vLLM's compiled CPU ops (`vllm._C`)."""
    import vllm.model_executor.model_loader.base_loader as base_loader
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader import get_model_loader

    monkeypatch.setattr(base_loader, "process_weights_after_loading", lambda *args: None)
    path = checkpoints["qwen3_moe", False]
    models = {}
    for load_format in ("safetensors", "fastmoe"):
        config = vllm_config(path, load_format)
        loader = get_model_loader(config.load_config)
        with set_current_vllm_config(config):
            models[load_format] = loader.load_model(
                vllm_config=config, model_config=config.model_config
            )
    assert isinstance(loader, vllm_loader.FastMoeModelLoader)
    assert_same_state(models["fastmoe"], models["safetensors"])


def test_missing_weight_is_named(distributed, checkpoints, tmp_path):
    source = checkpoints["qwen3_moe", False]
    with fml.open(source) as ckpt:
        tensors = {name: ckpt.tensor(name).clone() for name in ckpt.keys()}
    del tensors["model.norm.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(source / "config.json", tmp_path / "config.json")

    with pytest.raises(ValueError, match=r"model\.norm\.weight"):  # vLLM's loader refuses it too
        load(tmp_path, "safetensors")
    with pytest.raises(fml.TensorNotFoundError, match=r"1 parameter\(s\).*: model\.norm\.weight$"):
        load(tmp_path, "fastmoe")


def test_a_parameter_written_twice_is_named(distributed, checkpoints, monkeypatch):
    """Expert tensors that reach the model's own load_weights after fastmoe_load filled their
    layer (a consumed-names bug) are caught by the accounting, which names the parameters."""
    original = vllm_loader.fill_expert_layers

    def fills_but_consumes_nothing(model, ckpt):
        filled, _ = original(model, ckpt)
        return filled, set()

    monkeypatch.setattr(vllm_loader, "fill_expert_layers", fills_but_consumes_nothing)
    with pytest.raises(fml.LayoutError, match=r"written both by fastmoe_load and by .*w13_weight"):
        load(checkpoints["qwen3_moe", False], "fastmoe")


def test_unknown_extra_config_is_refused(distributed):
    from vllm.config import LoadConfig

    config = {"num_threads": 1, "io": "pread", "prefetch": False}
    loader = vllm_loader.FastMoeModelLoader(
        LoadConfig(load_format="fastmoe", model_loader_extra_config=config)
    )
    assert loader.open_options == config
    with pytest.raises(fml.RequestError, match="enable_multithread_load"):
        vllm_loader.FastMoeModelLoader(
            LoadConfig(
                load_format="fastmoe",
                model_loader_extra_config={"enable_multithread_load": True},
            )
        )


def quantized_experts_checkpoint(path, quantize, quantization_config: dict, seed: int = 0):
    """A Qwen3-MoE model saved per expert, its experts' weights replaced by what
    `quantize(stem, rows, cols, gen)` returns (tensors by name), the rest in bf16; another
    `seed`, other values throughout."""
    import json

    model = build_model(
        "qwen3_moe", seed=seed, hidden_size=128, moe_intermediate_size=64, head_dim=32
    )
    model.save_pretrained(path, save_original_format=True)
    with fml.open(path) as ckpt:
        tensors = {name: ckpt.tensor(name).clone() for name in ckpt.keys()}
        experts = {n for group in ckpt.moe_layers() for n in group.tensor_names}
    for file in path.glob("*.safetensors*"):
        file.unlink()
    gen = torch.Generator().manual_seed(5 + seed)
    for name in sorted(experts):
        rows, cols = tensors.pop(name).shape
        tensors |= quantize(name.removesuffix(".weight"), rows, cols, gen)
    save_file(tensors, path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(config))
    return path


def nvfp4_expert(stem: str, rows: int, cols: int, gen: torch.Generator) -> dict:
    from test_quant import fp8

    return {
        f"{stem}.weight": torch.randint(
            0, 256, (rows, cols // 2), dtype=torch.uint8, generator=gen
        ),
        f"{stem}.weight_scale": fp8(rows, cols // 16, gen=gen),
        f"{stem}.weight_scale_2": torch.rand((), generator=gen) + 0.5,
        f"{stem}.input_scale": torch.rand((), generator=gen) + 0.5,
    }


def int4_expert(
    stem: str, rows: int, cols: int, gen: torch.Generator, zero_points: bool = False
) -> dict:
    from test_int4 import int32

    tensors = {
        f"{stem}.weight_packed": int32(rows, cols // 8, gen=gen),
        f"{stem}.weight_scale": torch.rand(rows, cols // 32, generator=gen).bfloat16(),
        f"{stem}.weight_shape": torch.tensor([rows, cols], dtype=torch.int32),
    }
    if zero_points:  # eight 4-bit zero points of consecutive rows an int32
        tensors[f"{stem}.weight_zero_point"] = int32(rows // 8, cols // 32, gen=gen)
    return tensors


@pytest.fixture(scope="module")
def nvfp4_checkpoint(tmp_path_factory):
    return nvfp4_checkpoint_at(tmp_path_factory.mktemp("nvfp4"))


def nvfp4_checkpoint_at(path, seed: int = 0):
    """Experts in ModelOpt NVFP4, the rest listed in `exclude_modules` as ModelOpt lists it."""
    config = {
        "quant_method": "modelopt",
        "quant_algo": "NVFP4",
        "group_size": 16,
        "kv_cache_quant_algo": None,
        "exclude_modules": ["lm_head", "self_attn", "mlp.gate"],
    }
    return quantized_experts_checkpoint(path, nvfp4_expert, config, seed)


@pytest.fixture(scope="module", params=["symmetric", "asymmetric"])
def int4_checkpoint(tmp_path_factory, request):
    path = tmp_path_factory.mktemp(f"int4-{request.param}")
    return int4_checkpoint_at(path, request.param == "symmetric")


def int4_checkpoint_at(path, symmetric: bool, seed: int = 0):
    """Experts in compressed-tensors int4 `pack-quantized` (W4A16, group 32; asymmetric ones
    with `weight_zero_point`, as llm-compressor's `W4A16_ASYM` writes them), the rest in
    `ignore` as llm-compressor lists it."""
    weights = {
        "num_bits": 4,
        "type": "int",
        "symmetric": symmetric,
        "strategy": "group",
        "group_size": 32,
        "dynamic": False,
    }
    config = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
        "ignore": ["lm_head", "re:.*self_attn.*", "re:.*mlp[.]gate$"],
    }
    quantize = functools.partial(int4_expert, zero_points=not symmetric)
    return quantized_experts_checkpoint(path, quantize, config, seed)


def nvfp4_on_this_cpu(monkeypatch) -> None:
    """vLLM has no NVFP4 MoE kernel on the CPU: `ModelOptNvFp4FusedMoE` is given the emulation
    backend and its experts class (the kernel is built, never run), which decide nothing of
    the loading."""
    from vllm.model_executor.layers.fused_moe.oracle import nvfp4
    from vllm.model_executor.layers.quantization import modelopt

    emulation = nvfp4.NvFp4MoeBackend.EMULATION
    chosen = (emulation, nvfp4.backend_to_kernel_cls(emulation)[0])
    monkeypatch.setattr(modelopt, "select_nvfp4_moe_backend", lambda **_: chosen)


def test_nvfp4_model_matches_default_loader(distributed, nvfp4_checkpoint, monkeypatch):
    """A whole NVFP4 model (`ModelOptNvFp4FusedMoE` experts): every parameter equal to vLLM's
    own loading, and neither expert weights nor scales through the model's loader. vLLM has
    no NVFP4 MoE kernel on the CPU: the method is given the emulation backend, which decides
    nothing of the loading."""
    nvfp4_on_this_cpu(monkeypatch)
    theirs, _ = load(nvfp4_checkpoint, "safetensors")
    ours, received = load(nvfp4_checkpoint, "fastmoe")
    assert_same_state(ours, theirs)
    packed = [n for n, p in ours.named_parameters() if n.endswith("w13_weight")]
    assert packed and all(ours.get_parameter(n).dtype == torch.uint8 for n in packed)
    with fml.open(nvfp4_checkpoint) as ckpt:
        groups = ckpt.moe_layers()
        assert all(g.pack == 2 for g in groups)
        expert_names = {name for group in groups for name in group.tensor_names}
        assert set(received) == set(ckpt.keys()) - expert_names


def triton_wna16() -> tuple:
    """vLLM's Triton WNA16 MoE backend and its experts class, which leave the loaded layout
    as it is (the kernel is built, never run)."""
    from vllm.model_executor.layers.fused_moe.oracle import int_wna16

    triton = int_wna16.WNA16MoEBackend.TRITON
    return triton, int_wna16.backend_to_kernel_cls(triton)[0]


def int4_on_this_cpu(monkeypatch) -> None:
    """vLLM has no WNA16 MoE kernel on the CPU: `CompressedTensorsWNA16MoEMethod` is given
    the Triton backend (`triton_wna16`), which decides nothing of the loading."""
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe import (
        compressed_tensors_moe_wna16 as wna16,
    )

    chosen = triton_wna16()
    monkeypatch.setattr(wna16, "select_wna16_moe_backend", lambda **_: chosen)


def test_int4_model_matches_default_loader(distributed, int4_checkpoint, monkeypatch):
    """A whole int4 model (`CompressedTensorsWNA16MoEMethod` experts): every parameter equal
    to vLLM's own loading, and no expert tensor through the model's loader. vLLM has no WNA16
    MoE kernel on the CPU: the method is given a GPU backend, which decides nothing of the
    loading."""
    int4_on_this_cpu(monkeypatch)
    theirs, _ = load(int4_checkpoint, "safetensors")
    ours, received = load(int4_checkpoint, "fastmoe")
    assert_same_state(ours, theirs)
    layers = FAMILIES["qwen3_moe"]["num_hidden_layers"]
    packed = [n for n, _ in ours.named_parameters() if n.endswith("w13_weight_packed")]
    assert len(packed) == layers
    zero_points = [n for n, _ in ours.named_parameters() if n.endswith("w2_weight_zero_point")]
    with fml.open(int4_checkpoint) as ckpt:
        asymmetric = any(n.endswith(".weight_zero_point") for n in ckpt.keys())
    assert len(zero_points) == (layers if asymmetric else 0)
    assert all(ours.get_parameter(n).any() for n in zero_points)  # random, not left at zero
    with fml.open(int4_checkpoint) as ckpt:
        groups = ckpt.moe_layers()
        assert all(g.pack == 8 for g in groups)
        expert_names = {name for group in groups for name in group.tensor_names}
        assert set(received) == set(ckpt.keys()) - expert_names


def test_dbrx_model_matches_default_loader(distributed, tmp_path):
    """DBRX (`transformer.blocks.N.ffn.experts.mlp.w1 / v1 / w2`, experts stacked `[E·I, H]`,
    saved by transformers' `DbrxForCausalLM`): every parameter equal to vLLM's own loading
    (its `DbrxExperts.weight_loader`), and no expert tensor through the model's loader.

    vLLM 0.33's own DBRX loading fails: `DbrxModel.load_weights` looks the experts up as
    `ffn.experts.w13_weight`, where `FusedMoEFactory` has put them under
    `ffn.experts.routed_experts` (a KeyError). The reference feeds it the names where its
    lookup finds them; its `DbrxExperts.weight_loader` then does the loading."""
    from test_dbrx import BLOCKS, dbrx_model

    dbrx_model().save_pretrained(tmp_path, max_shard_size="40KB")
    with pytest.raises(KeyError, match=r"ffn\.experts\.w13_weight"):
        load(tmp_path, "safetensors")

    def routed(name: str) -> str:
        return name.replace(".ffn.experts.mlp.", ".ffn.experts.routed_experts.mlp.")

    theirs, _ = load(tmp_path, "safetensors", rename=routed)
    ours, received = load(tmp_path, "fastmoe")
    assert_same_state(ours, theirs)
    for name, param in ours.named_parameters():
        assert not param.isnan().any(), f"{name} was not loaded"
    with fml.open(tmp_path) as ckpt:
        groups = ckpt.moe_layers()
        assert [g.format for g in groups] == ["stacked"] * BLOCKS
        expert_names = {name for group in groups for name in group.tensor_names}
        assert set(received) == set(ckpt.keys()) - expert_names


@pytest.fixture(scope="module")
def mxfp4_checkpoint(tmp_path_factory):
    from test_mxfp4 import gpt_oss_release

    return gpt_oss_release(tmp_path_factory.mktemp("mxfp4"), **WIDER, **WIDER_FAMILY["gpt_oss"])


@pytest.mark.parametrize("backend", ["EMULATION", "MARLIN"])
def test_mxfp4_model_matches_default_loader(distributed, mxfp4_checkpoint, monkeypatch, backend):
    """A whole gpt-oss mxfp4 model (`GptOssMxfp4MoEMethod` experts, loaded by vLLM through
    the gpt-oss model's own mxfp4 branch): every parameter equal to vLLM's own loading, gate
    and up interleaved, and no expert tensor through the model's loader. vLLM has no mxfp4
    MoE kernel on this CPU: the method is given a backend by name. Marlin's rounds the sizes
    up (I to 128, H to 256), so its parameters are padded and take the values in their
    corner, as vLLM's gpt-oss loading leaves them."""
    from vllm.model_executor.layers.fused_moe.oracle.mxfp4 import Mxfp4MoeBackend
    from vllm.model_executor.layers.quantization import mxfp4

    chosen = (Mxfp4MoeBackend[backend], None)
    monkeypatch.setattr(mxfp4, "select_mxfp4_moe_backend", lambda *_, **__: chosen)
    theirs, _ = load(mxfp4_checkpoint, "safetensors")
    ours, received = load(mxfp4_checkpoint, "fastmoe")
    # Both start poisoned: padding neither loader writes stays poison in both.
    assert_same_state(ours, theirs)
    with fml.open(mxfp4_checkpoint) as ckpt:
        groups = ckpt.moe_layers()
        assert all(g.quantization.weights == "mxfp4" for g in groups)
        group = groups[0]
        expert_names = {name for group in groups for name in group.tensor_names}
        assert set(received) == set(ckpt.keys()) - expert_names
    w13 = ours.get_parameter(f"{group.prefix}.routed_experts.w13_weight")
    padded = backend == "MARLIN"
    assert w13.dtype == torch.uint8
    assert (w13.shape[1] > 2 * group.intermediate_size) == padded


def gptq_awq_expert(stem: str, rows: int, cols: int, gen: torch.Generator, awq: bool) -> dict:
    """One expert matrix `[rows, cols]` as GPTQ (`qweight [cols/8, rows]`, `qzeros`, float16
    `scales`, `g_idx`) or AWQ (`qweight [cols, rows/8]`) store it, in 32-value groups."""
    from test_gptq import int32

    tensors = {
        f"{stem}.qweight": int32(cols, rows // 8, gen=gen)
        if awq
        else int32(cols // 8, rows, gen=gen),
        f"{stem}.qzeros": int32(cols // 32, rows // 8, gen=gen),
        f"{stem}.scales": torch.rand(cols // 32, rows, generator=gen).half(),
    }
    if not awq:
        tensors[f"{stem}.g_idx"] = torch.arange(cols, dtype=torch.int32) // 32
    return tensors


# GPTQ (symmetric) and AWQ `quantization_config`s of 4-bit experts in 32-value groups, the
# attention and router left unquantized as each format says it.
GPTQ_AWQ_CONFIGS = {
    "gptq": {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": 32,
        "desc_act": False,
        "sym": True,
        "modules_in_block_to_quantize": [["mlp.experts"]],
    },
    "awq": {
        "quant_method": "awq",
        "bits": 4,
        "group_size": 32,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": ["self_attn", "mlp.gate"],
    },
}


def gptq_awq_checkpoint(path, scheme: str, seed: int = 0):
    """A Qwen3-MoE model with GPTQ or AWQ (`scheme`) experts (`GPTQ_AWQ_CONFIGS`)."""
    quantize = functools.partial(gptq_awq_expert, awq=scheme == "awq")
    return quantized_experts_checkpoint(path, quantize, GPTQ_AWQ_CONFIGS[scheme], seed)


def moe_wna16_on_this_cpu(monkeypatch) -> None:
    """vLLM has no WNA16 MoE kernel on the CPU: `MoeWNA16Method` is given the Triton backend
    (`triton_wna16`), and AWQ's GPU capability check answered as an Ampere GPU answers it;
    neither decides anything of the loading."""
    from vllm.model_executor.layers.quantization import moe_wna16
    from vllm.platforms.interface import DeviceCapability

    chosen = triton_wna16()
    monkeypatch.setattr(moe_wna16, "select_wna16_moe_backend", lambda *_, **__: chosen)
    capability = DeviceCapability(8, 0)
    monkeypatch.setattr(moe_wna16.current_platform, "get_device_capability", lambda *_: capability)


@pytest.mark.parametrize("scheme", ["gptq", "awq"])
def test_moe_wna16_model_matches_default_loader(distributed, tmp_path, monkeypatch, scheme):
    """A whole Qwen3-MoE model with GPTQ (symmetric) or AWQ experts served by vLLM's
    `MoeWNA16Method` (`quantization="moe_wna16"`; attention and router unquantized, as
    `modules_in_block_to_quantize` and `modules_to_not_convert` say): every parameter equal
    to vLLM's own loading, and no expert tensor (`g_idx` and symmetric zero points included)
    through the model's loader (`moe_wna16_on_this_cpu`)."""
    moe_wna16_on_this_cpu(monkeypatch)
    path = gptq_awq_checkpoint(tmp_path / scheme, scheme)
    theirs, _ = load(path, "safetensors", quantization="moe_wna16")
    ours, received = load(path, "fastmoe", quantization="moe_wna16")
    assert_same_state(ours, theirs)
    qweights = [n for n, p in ours.named_parameters() if n.endswith("w13_qweight")]
    assert len(qweights) == FAMILIES["qwen3_moe"]["num_hidden_layers"]
    for name in qweights:
        experts = ours.get_submodule(name.rsplit(".", 1)[0])
        assert type(experts.quant_method).__name__ == "MoeWNA16Method"
        assert ours.get_parameter(name).dtype == torch.uint8
    with fml.open(path) as ckpt:
        groups = ckpt.moe_layers()
        assert all(g.quantization.method == scheme for g in groups)
        expert_names = {name for group in groups for name in group.tensor_names}
        assert set(received) == set(ckpt.keys()) - expert_names
