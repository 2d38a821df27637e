"""The vLLM adapter against vLLM itself: a `FusedMoE` layer (vLLM >= 0.33, built on the CPU)
filled by its own `load_weights` and by `fastmoe_load.engines.vllm.load_fused_moe_layer` from
the same checkpoint, bit for bit, for TP=1, TP rank 1 of 2 and EP rank 1 of 2, per-expert and fused
checkpoints. Skipped where vLLM is not installed (it is not a test dependency: it pins its
own torch)."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import save_file

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
vllm = pytest.importorskip("vllm")

import fastmoe_load as fml  # noqa: E402
from fastmoe_load.engines.vllm import load_fused_moe_layer  # noqa: E402

E, TOP_K, H, INTER = 8, 2, 64, 32
PREFIX = "model.layers.0.mlp.experts"


@contextmanager
def as_tp_rank(rank: int):
    """Builds layers as TP rank `rank` in this one process (loading never communicates)."""
    import vllm.model_executor.layers.fused_moe.config as config

    original = config.get_tensor_model_parallel_rank
    config.get_tensor_model_parallel_rank = lambda: rank
    try:
        yield
    finally:
        config.get_tensor_model_parallel_rank = original


def build(
    tp_size: int,
    rank: int,
    expert_parallel: bool,
    name: str,
    quant_config=None,
    sizes: tuple[int, int, int] = (E, H, INTER),
    moe_backend: str = "auto",
    **factory_options,
):
    """A vLLM `MoERunner` as TP rank `rank` of `tp_size`, every parameter poisoned (NaN, or
    0xA5 bytes where it holds integers); `factory_options` go to `FusedMoEFactory`,
    `moe_backend` to vLLM's kernel config."""
    from vllm.config import KernelConfig, ParallelConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.fused_moe import FusedMoEFactory

    config = VllmConfig(
        parallel_config=ParallelConfig(enable_expert_parallel=expert_parallel),
        kernel_config=KernelConfig(moe_backend=moe_backend),
    )
    num_experts, hidden, inter = sizes
    with as_tp_rank(rank), set_current_vllm_config(config):
        runner = FusedMoEFactory(
            num_experts=num_experts,
            top_k=TOP_K,
            hidden_size=hidden,
            intermediate_size=inter,
            params_dtype=torch.bfloat16,
            tp_size=tp_size,
            prefix=f"{name}.experts",
            renormalize=True,
            quant_config=quant_config,
            **factory_options,
        )
    for p in runner.routed_experts.parameters():
        if p.is_floating_point():
            p.data.fill_(float("nan"))
        else:  # packed integer weights: a byte pattern no test writes
            p.data.view(torch.uint8).fill_(0xA5)
    return runner


def gpt_oss_options() -> dict:
    """What vLLM's gpt-oss (`MLPBlock`) gives `FusedMoEFactory` besides the sizes."""
    from vllm.model_executor.models.gpt_oss import GptOssRoutedExperts

    return {"has_bias": True, "activation": "swigluoai", "routed_experts_cls": GptOssRoutedExperts}


def load_both(theirs, ours, path, prefix: str) -> dict[str, torch.Tensor]:
    """Loads the experts at `prefix` into `theirs` by vLLM's own `load_weights` and into
    `ours` by the adapter, which consumes exactly the group's tensors; returns vLLM's
    parameters by name."""
    with fml.open(path) as ckpt:
        names = [n for n in ckpt.keys() if n.startswith(prefix + ".")]
        weights = ((n[len(prefix) + 1 :], ckpt.tensor(n)) for n in names)
        assert set(theirs.load_weights(weights))
        consumed = load_fused_moe_layer(ours, ckpt, prefix)
    assert sorted(consumed) == sorted(names)
    return dict(theirs.routed_experts.named_parameters())


def assert_same_parameters(ours, theirs: dict[str, torch.Tensor]) -> None:
    """Every parameter of `ours` (a runner) equals vLLM's loading of the same one in
    `theirs`, bit for bit, and vLLM loaded each (none left all poison)."""
    for param, expected in theirs.items():
        actual = getattr(ours.routed_experts, param).data
        if expected.is_floating_point():
            assert not expected.float().isnan().all(), f"vLLM left {param} unloaded"
        else:
            assert not (expected.data.view(torch.uint8) == 0xA5).all(), f"{param} unloaded"
        assert actual.dtype == expected.dtype, param
        assert torch.equal(actual.view(torch.uint8), expected.data.view(torch.uint8)), param


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    gate = torch.randn(E, INTER, H, generator=g).bfloat16()
    up = torch.randn(E, INTER, H, generator=g).bfloat16()
    down = torch.randn(E, H, INTER, generator=g).bfloat16()
    fused = tmp_path_factory.mktemp("fused") / "model.safetensors"
    save_file(
        {f"{PREFIX}.gate_up_proj": torch.cat([gate, up], 1), f"{PREFIX}.down_proj": down}, fused
    )
    per_expert = tmp_path_factory.mktemp("per_expert") / "model.safetensors"
    tensors = {}
    for e in range(E):
        tensors[f"{PREFIX}.{e}.gate_proj.weight"] = gate[e].contiguous()
        tensors[f"{PREFIX}.{e}.up_proj.weight"] = up[e].contiguous()
        tensors[f"{PREFIX}.{e}.down_proj.weight"] = down[e].contiguous()
    save_file(tensors, per_expert)
    return {"fused": fused, "per_expert": per_expert}


@pytest.mark.parametrize("layout", ["fused", "per_expert"])
@pytest.mark.parametrize(("tp_size", "rank", "ep"), [(1, 0, False), (2, 1, False), (2, 1, True)])
def test_adapter_matches_vllm_load_weights(
    vllm_process_groups, checkpoints, layout, tp_size, rank, ep
):
    path = checkpoints[layout]
    theirs = build(tp_size, rank, ep, f"theirs{tp_size}{rank}{ep}{layout}")
    with fml.open(path) as ckpt:
        names = {n: ckpt.tensor(n) for n in ckpt.keys()}
        loaded = list(
            theirs.load_weights(iter((n[len(PREFIX) + 1 :], t) for n, t in names.items()))
        )
        assert loaded
        ours = build(tp_size, rank, ep, f"ours{tp_size}{rank}{ep}{layout}")
        consumed = load_fused_moe_layer(ours, ckpt, PREFIX)
    assert sorted(consumed) == sorted(names)
    for param in ("w13_weight", "w2_weight"):
        expected = getattr(theirs.routed_experts, param).data
        actual = getattr(ours.routed_experts, param).data
        assert not expected.isnan().any()
        assert torch.equal(actual.view(torch.int16), expected.view(torch.int16)), param


def quant_config_of(path):
    """vLLM's quantization config for a checkpoint, as its engine builds it from config.json."""
    import json

    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )
    from vllm.model_executor.layers.quantization.fp8 import Fp8Config

    config = json.loads((path / "config.json").read_text())["quantization_config"]
    if config["quant_method"] == "fp8":
        return Fp8Config.from_config(config)
    return CompressedTensorsConfig.from_config(config)


@pytest.fixture(scope="module")
def fp8_checkpoints(tmp_path_factory):
    import test_quant

    return {
        name: make(tmp_path_factory.mktemp(name)) for name, make in test_quant.CHECKPOINTS.items()
    }


@pytest.mark.parametrize("layout", sorted(__import__("test_quant").CHECKPOINTS))
@pytest.mark.parametrize(("tp_size", "rank", "ep"), [(1, 0, False), (2, 1, False), (2, 1, True)])
def test_fp8_layers_match_vllm_load_weights(
    vllm_process_groups, fp8_checkpoints, layout, tp_size, rank, ep
):
    """vLLM's fp8 MoE methods (`Fp8MoEMethod` block scales from DeepSeek-V3, Qwen3-FP8 and
    transformers' fused save; `CompressedTensorsW8A8Fp8MoEMethod` per channel and per tensor
    with input scales): every weight and scale parameter equal to vLLM's own loading."""
    import test_quant

    path = fp8_checkpoints[layout]
    prefix = test_quant.PREFIX
    sizes = (test_quant.E, test_quant.H, test_quant.INTER)
    # vLLM matches parameter kinds by substrings of the full name: keep the layer's own.
    name = prefix.removesuffix(".experts")
    theirs = build(tp_size, rank, ep, name, quant_config_of(path), sizes)
    ours = build(tp_size, rank, ep, name, quant_config_of(path), sizes)
    params = load_both(theirs, ours, path, prefix)
    assert any("scale" in p for p in params), params
    assert_same_parameters(ours, params)


# Block-fp8 where I/tp cuts the 128-blocks, as GLM-4.5-FP8, MiniMax-M2 and Qwen3-235B-FP8
# (I=1536) at TP=8 and Qwen3-30B-A3B-FP8 (I=768) at TP=4 are served: I=384 gives 192 rows a
# rank at TP=2 and 96 at TP=4. vLLM's default backend refines the block grid (64x64, 32x32:
# the scales upsampled); backends that need whole blocks pad each rank's share to 256 or 128
# rows (the last ranks short or, at TP=4 rank 3, empty).
FP8_CUT_SPLITS = [(2, 0), (2, 1), (4, 1), (4, 3)]


@pytest.mark.parametrize("moe_backend", ["auto", "deep_gemm"])
@pytest.mark.parametrize(("tp_size", "rank"), FP8_CUT_SPLITS)
def test_fp8_blocks_cut_by_tp_match_vllm(vllm_process_groups, tmp_path, tp_size, rank, moe_backend):
    """Every weight and scale parameter equal to vLLM's own loading, refined or padded. vLLM
    has no DeepGEMM kernel on this CPU: the backend is named (it decides the grid, not the
    loading)."""
    from unittest import mock

    import test_quant
    from vllm.model_executor.layers.fused_moe.oracle.fp8 import Fp8MoeBackend
    from vllm.model_executor.layers.quantization import fp8

    inter = 384
    path = test_quant.per_expert_block(tmp_path / "ds", torch.float32, "deepseek_v3", inter=inter)
    prefix = test_quant.PREFIX
    sizes = (test_quant.E, test_quant.H, inter)
    name = prefix.removesuffix(".experts")
    options = {"moe_backend": moe_backend}
    chosen = (Fp8MoeBackend.DEEPGEMM, None)
    select = fp8.select_fp8_moe_backend if moe_backend == "auto" else lambda **_: chosen
    with mock.patch.object(fp8, "select_fp8_moe_backend", select):
        theirs = build(tp_size, rank, False, name, quant_config_of(path), sizes, **options)
        ours = build(tp_size, rank, False, name, quant_config_of(path), sizes, **options)
    method = theirs.routed_experts.quant_method
    refined = getattr(method, "weight_scale_refine", None) is not None
    padded = bool(theirs.routed_experts.moe_config.tp_shard_with_padding)
    assert (refined, padded) == ((True, False) if moe_backend == "auto" else (False, True))
    params = load_both(theirs, ours, path, prefix)
    assert_same_parameters(ours, params)


def test_differing_gate_and_up_input_scales_are_refused_as_vllm_does(vllm_process_groups, tmp_path):
    """compressed-tensors static fp8 whose gate and up input scales differ: vLLM's own
    loading raises, and the adapter raises too, writing nothing."""
    import test_quant

    path = test_quant.compressed_tensors(tmp_path / "ct", "tensor", input_scales=(0.1833, 0.55))
    prefix = test_quant.PREFIX
    sizes = (test_quant.E, test_quant.H, test_quant.INTER)
    name = prefix.removesuffix(".experts")
    theirs = build(1, 0, False, name, quant_config_of(path), sizes)
    ours = build(1, 0, False, name, quant_config_of(path), sizes)
    with fml.open(path) as ckpt:
        names = [n for n in ckpt.keys() if n.startswith(prefix + ".")]
        weights = ((n[len(prefix) + 1 :], ckpt.tensor(n)) for n in names)
        with pytest.raises(ValueError, match="input_scales of w1 and w3 of a layer must be equal"):
            list(theirs.load_weights(weights))
        with pytest.raises(fml.RequestError, match=r"gate input_scale 0\.1833 and up"):
            load_fused_moe_layer(ours, ckpt, prefix)
    for param, tensor in ours.routed_experts.named_parameters():
        if tensor.is_floating_point():
            assert tensor.float().isnan().all(), f"{param} written before the error"


@pytest.mark.parametrize(("tp_size", "rank"), [(1, 0), (2, 1)])
def test_dbrx_matches_vllm_dbrx_loader(vllm_process_groups, tmp_path, tp_size, rank):
    """DBRX's stacked `ffn.experts.mlp.w1 / v1 / w2 [E·I, H]`, loaded by vLLM's own
    `DbrxExperts.weight_loader` (dbrx.py) and by the adapter. That loader fills every expert
    (DBRX in vLLM has no expert parallelism), so only TP ranks are compared here."""
    from types import SimpleNamespace
    from unittest import mock

    import test_dbrx
    from vllm.model_executor.models import dbrx

    path, tensors = test_dbrx.dbrx(tmp_path / "dbrx")
    prefix = test_dbrx.prefix(0)
    sizes = (test_dbrx.E, test_dbrx.H, test_dbrx.INTER)
    theirs = build(tp_size, rank, False, f"dbrx_theirs{tp_size}{rank}", sizes=sizes)
    ours = build(tp_size, rank, False, f"dbrx_ours{tp_size}{rank}", sizes=sizes)
    # The attributes `DbrxExperts.weight_loader` reads of its module.
    module = SimpleNamespace(
        intermediate_size=test_dbrx.INTER // tp_size, d_model=test_dbrx.H, tp_size=tp_size
    )
    params = dict(theirs.routed_experts.named_parameters())
    with mock.patch.object(dbrx, "get_tensor_model_parallel_rank", lambda: rank):
        for weight_name in ("w1", "v1", "w2"):
            param = "w13_weight" if weight_name != "w2" else "w2_weight"
            name = f"{prefix}.{param}"  # as `DbrxForCausalLM.load_weights` renames it
            loaded = tensors[f"{prefix}.mlp.{weight_name}"]
            dbrx.DbrxExperts.weight_loader(
                module, params[param], loaded, f"mlp.{weight_name}", name
            )
    with fml.open(path) as ckpt:
        consumed = load_fused_moe_layer(ours, ckpt, prefix)
    assert sorted(consumed) == sorted(f"{prefix}.mlp.{n}" for n in ("w1", "v1", "w2"))
    for param in ("w13_weight", "w2_weight"):
        expected = getattr(theirs.routed_experts, param).data
        actual = getattr(ours.routed_experts, param).data
        assert not expected.isnan().any(), param
        assert torch.equal(actual.view(torch.int16), expected.view(torch.int16)), param


@pytest.mark.parametrize("backend", ["EMULATION", "FLASHINFER_CUTLASS"])
@pytest.mark.parametrize(("tp_size", "rank", "ep"), [(1, 0, False), (2, 1, False), (2, 1, True)])
def test_nvfp4_layers_match_vllm_load_weights(
    vllm_process_groups, tmp_path, tp_size, rank, ep, backend
):
    """ModelOpt NVFP4 per-expert checkpoints into vLLM's `ModelOptNvFp4FusedMoE` parameters
    (uint8 weights two values a byte, float8 16-value group scales, per-tensor global and
    input scales for gate and up): every parameter equal to vLLM's own loading. vLLM has no
    NVFP4 MoE kernel on the CPU, so the backend the method would pick on a GPU is named
    here: the kernel decides nothing of the loading but whether input scales are kept for
    every global expert (FlashInfer's) or for the local ones."""
    import json
    from unittest import mock

    import test_nvfp4
    from vllm.model_executor.layers.fused_moe.oracle.nvfp4 import NvFp4MoeBackend
    from vllm.model_executor.layers.quantization import modelopt
    from vllm.model_executor.layers.quantization.modelopt import ModelOptNvFp4Config

    chosen = (NvFp4MoeBackend[backend], None)

    path = test_nvfp4.nvfp4_modelopt(tmp_path / "nvfp4")
    config = ModelOptNvFp4Config.from_config(
        json.loads((path / "config.json").read_text())["quantization_config"]
    )
    prefix = test_nvfp4.prefix()
    sizes = (test_nvfp4.E, test_nvfp4.H, test_nvfp4.INTER)
    name = prefix.removesuffix(".experts")
    with mock.patch.object(modelopt, "select_nvfp4_moe_backend", lambda **_: chosen):
        theirs = build(tp_size, rank, ep, name, config, sizes)
        ours = build(tp_size, rank, ep, name, config, sizes)
    params = load_both(theirs, ours, path, prefix)
    assert {"w13_weight_scale_2", "w13_input_scale", "w2_weight_scale"} <= set(params), params
    if backend == "FLASHINFER_CUTLASS":
        assert params["w13_input_scale"].shape[0] == test_nvfp4.E  # every global expert
    assert_same_parameters(ours, params)


def test_nvfp4_global_input_scales_under_eplb_match_vllm(vllm_process_groups, tmp_path):
    """FlashInfer's NVFP4 layers keep input scales for every physical expert: with 2 EPLB
    replicas over the checkpoint's experts the tables hold E + 2 rows, each from the logical
    expert vLLM's initial placement gives it (`physical % E`). Every parameter equals vLLM's
    own loading; and a table of a shape vLLM would not allocate is refused before any
    parameter of the layer is written."""
    import json
    from unittest import mock

    import test_nvfp4
    from vllm.model_executor.layers.fused_moe.oracle.nvfp4 import NvFp4MoeBackend
    from vllm.model_executor.layers.quantization import modelopt
    from vllm.model_executor.layers.quantization.modelopt import ModelOptNvFp4Config

    chosen = (NvFp4MoeBackend.FLASHINFER_CUTLASS, None)
    path = test_nvfp4.nvfp4_modelopt(tmp_path / "nvfp4")
    config = ModelOptNvFp4Config.from_config(
        json.loads((path / "config.json").read_text())["quantization_config"]
    )
    prefix = test_nvfp4.prefix()
    sizes = (test_nvfp4.E, test_nvfp4.H, test_nvfp4.INTER)
    name = prefix.removesuffix(".experts")
    eplb = {"enable_eplb": True, "num_redundant_experts": 2}
    with mock.patch.object(modelopt, "select_nvfp4_moe_backend", lambda **_: chosen):
        theirs = build(2, 1, True, name, config, sizes, **eplb)
        ours = build(2, 1, True, name, config, sizes, **eplb)
        short = build(2, 1, True, name, config, sizes, **eplb)

    params = load_both(theirs, ours, path, prefix)
    assert params["w13_input_scale"].shape == (test_nvfp4.E + 2, 2)
    assert_same_parameters(ours, params)

    experts = short.routed_experts
    experts.w13_input_scale = torch.nn.Parameter(
        torch.full((test_nvfp4.E, 2), float("nan")), requires_grad=False
    )
    with fml.open(path) as ckpt, pytest.raises(fml.RequestError, match="w13_input_scale"):
        load_fused_moe_layer(short, ckpt, prefix)
    for param, tensor in experts.named_parameters():
        if tensor.is_floating_point():
            assert tensor.isnan().all(), f"{param} written before the error"
        else:
            assert (tensor.view(torch.uint8) == 0xA5).all(), f"{param} written before the error"


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("backend", ["MARLIN", "TRITON"])
@pytest.mark.parametrize(("tp_size", "rank", "ep"), [(1, 0, False), (2, 1, False), (2, 1, True)])
def test_int4_layers_match_vllm_load_weights(
    vllm_process_groups, tmp_path, tp_size, rank, ep, backend, symmetric
):
    """compressed-tensors int4 `pack-quantized` (W4A16, group 32) into vLLM's
    `CompressedTensorsWNA16MoEMethod` parameters (`w13_weight_packed [E, 2I/tp, H/8]` int32,
    bfloat16 group scales, float32 `weight_shape`; asymmetric: `w13_weight_zero_point
    [E, 2I/tp/8, H/32]` int32, eight zero points of consecutive rows an int32): every
    parameter equal to vLLM's own loading. vLLM has no WNA16 MoE kernel on the CPU, so the
    backend the method would pick on a GPU is named here: every backend loads the
    checkpoint's N-first layout and transposes later, in `process_weights_after_loading`."""
    from unittest import mock

    import test_int4
    from vllm.model_executor.layers.fused_moe.oracle.int_wna16 import WNA16MoEBackend
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe import (
        compressed_tensors_moe_wna16 as wna16,
    )

    # Both dtypes writers give `weight_shape`: int32, and compressed-tensors' own int64.
    shape_dtype = torch.int32 if symmetric else torch.int64
    path = test_int4.int4_pack_quantized(
        tmp_path / "int4", symmetric=symmetric, shape_dtype=shape_dtype
    )
    prefix = test_int4.prefix()
    sizes = (test_int4.E, test_int4.H, test_int4.INTER)
    name = prefix.removesuffix(".experts")
    chosen = (WNA16MoEBackend[backend], None)
    with mock.patch.object(wna16, "select_wna16_moe_backend", lambda **_: chosen):
        theirs = build(tp_size, rank, ep, name, quant_config_of(path), sizes)
        ours = build(tp_size, rank, ep, name, quant_config_of(path), sizes)
    params = load_both(theirs, ours, path, prefix)
    expected_params = {"w13_weight_packed", "w13_weight_scale", "w2_weight_shape"}
    if not symmetric:
        expected_params |= {"w13_weight_zero_point", "w2_weight_zero_point"}
    assert expected_params <= set(params), params
    assert_same_parameters(ours, params)


# (intermediate size, tp_size, rank, EP): even splits, and the uneven ones vLLM's gpt-oss
# loading makes, `cdiv(I/32, tp)` whole blocks a rank and the last rank short, as
# gpt-oss-120b's I=2880 at TP=4 (736, 736, 736, 672) and TP=8 (seven of 384, one of 192).
MXFP4_SPLITS = [
    (None, 1, 0, False),
    (None, 2, 1, False),
    (None, 2, 1, True),
    (96, 2, 0, False),
    (96, 2, 1, False),
    (224, 4, 0, False),
    (224, 4, 3, False),
]


@pytest.mark.parametrize("backend", ["EMULATION", "MARLIN"])
@pytest.mark.parametrize(("inter", "tp_size", "rank", "ep"), MXFP4_SPLITS)
def test_mxfp4_layers_match_vllm_gpt_oss_loading(
    vllm_process_groups, tmp_path, inter, tp_size, rank, ep, backend
):
    """gpt-oss mxfp4 experts (`gate_up_proj_blocks`, `_scales`, `_bias`, gate and up
    interleaved) into the layer vLLM's gpt-oss builds (`GptOssRoutedExperts` with
    `GptOssMxfp4MoEMethod`), loaded by vLLM's own gpt-oss code (`GptOssModel.
    _load_weights_mxfp4`, the checkpoint names mapped as `GptOssForCausalLM` maps them) and by
    the adapter: every parameter bit for bit, for even and uneven splits. vLLM has no mxfp4
    MoE kernel on this CPU, so a backend is named: Marlin's pads the parameters (I/tp to
    128, H to 256), which take the values in their corner."""
    from types import SimpleNamespace
    from unittest import mock

    import test_mxfp4
    from vllm.model_executor.layers.fused_moe.oracle.mxfp4 import Mxfp4MoeBackend
    from vllm.model_executor.layers.quantization import mxfp4
    from vllm.model_executor.models import gpt_oss

    even = inter is None
    inter = test_mxfp4.INTER if even else inter
    path = test_mxfp4.gpt_oss_mxfp4(tmp_path / "mxfp4", inter=inter)
    prefix = test_mxfp4.prefix()
    e, hidden = test_mxfp4.E, test_mxfp4.H
    chosen = (Mxfp4MoeBackend[backend], None)

    def gpt_oss_layer(label: str):
        with mock.patch.object(mxfp4, "select_mxfp4_moe_backend", lambda *_, **__: chosen):
            config, sizes = mxfp4.GptOssMxfp4Config(), (e, hidden, inter)
            return build(tp_size, rank, ep, label, config, sizes, **gpt_oss_options())

    theirs, ours = gpt_oss_layer("theirs"), gpt_oss_layer("ours")
    params = dict(theirs.routed_experts.named_parameters())
    # What `GptOssModel._load_weights_mxfp4` reads of the model it loads.
    model = SimpleNamespace(
        named_parameters=lambda: {f"{prefix}.{n}": p for n, p in params.items()}.items(),
        parallel_config=SimpleNamespace(enable_expert_parallel=ep),
        config=SimpleNamespace(num_local_experts=e, intermediate_size=inter),
        _try_load_streamed_expert=lambda *_: False,
    )
    first = rank * e // tp_size if ep else 0
    last = (rank + 1) * e // tp_size if ep else e
    with fml.open(path) as ckpt:
        names = [n for n in ckpt.keys() if n.startswith(prefix + ".")]
        mapper = gpt_oss.GptOssForCausalLM.hf_to_vllm_mapper
        weights = [(mapper.map_name(n), ckpt.tensor(n).clone()) for n in names]
        with (
            as_tp_rank(rank),
            mock.patch.object(gpt_oss, "get_tensor_model_parallel_world_size", lambda: tp_size),
            mock.patch.object(gpt_oss, "is_pp_missing_parameter", lambda *_: False),
        ):
            loaded = gpt_oss.GptOssModel._load_weights_mxfp4(model, last, first, weights, [])
        assert len(loaded) == 6
        consumed = load_fused_moe_layer(ours, ckpt, prefix)
    assert sorted(consumed) == sorted(names)
    if even:
        padded = backend == "MARLIN"
        shard = inter if ep else inter // tp_size  # EP ranks keep whole experts
        assert (params["w13_weight"].shape[1] > 2 * shard) == padded
    assert_same_parameters(ours, params)


# Per-expert OCP MX (test_mx.py's releases): TP 1/2/4/8 and EP ranks.
MX_RANKS = [(1, 0, False), (2, 1, False), (4, 3, False), (8, 5, False), (2, 1, True), (4, 2, True)]


@contextmanager
def mx_backends():
    """vLLM has no MX MoE kernel on this CPU: the backends the methods would pick on a GPU
    are named here (emulation: parameters of the checkpoint's sizes; the kernel decides
    nothing of the loading)."""
    from unittest import mock

    from vllm.model_executor.layers.fused_moe.oracle.mxfp4 import Mxfp4MoeBackend
    from vllm.model_executor.layers.quantization import modelopt, mxfp4
    from vllm.model_executor.layers.quantization.quark import quark_moe

    chosen = (Mxfp4MoeBackend.EMULATION, None)
    with (
        mock.patch.object(mxfp4, "select_deepseek_v4_mxfp4_moe_backend", lambda *_, **__: chosen),
        mock.patch.object(quark_moe, "select_mxfp4_moe_backend", lambda *_, **__: chosen),
        mock.patch.object(modelopt, "select_mxfp8_moe_backend", lambda *_, **__: (None, None)),
    ):
        yield


def mounted(runner, path: str) -> torch.nn.Module:
    """A module tree holding `runner` at `path`, so that its parameters carry the names a
    model's `load_weights` looks them up by."""
    root = node = torch.nn.Module()
    *parents, last = path.split(".")
    for part in parents:
        child = torch.nn.Module()
        node.add_module(part, child)
        node = child
    node.add_module(last, runner)
    return root


def mx_names(path, prefix: str) -> list[str]:
    with fml.open(path) as ckpt:
        return [n for n in ckpt.keys() if n.startswith(prefix + ".")]


def assert_mx_layers_match(ours, params: dict, path, prefix: str) -> None:
    with fml.open(path) as ckpt:
        consumed = load_fused_moe_layer(ours, ckpt, prefix)
    assert sorted(consumed) == sorted(mx_names(path, prefix))
    assert {"w13_weight", "w13_weight_scale", "w2_weight_scale"} <= set(params), params
    assert_same_parameters(ours, params)


@pytest.mark.parametrize(("tp_size", "rank", "ep"), MX_RANKS)
def test_deepseek_v4_experts_match_vllm_deepseek_v4_loading(
    vllm_process_groups, tmp_path, tp_size, rank, ep
):
    """DeepSeek-V4-Flash's mxfp4 experts into the layer vLLM's DeepSeek-V4 builds
    (`DeepseekV4FP8Config` -> `Mxfp4MoEMethod`), loaded by vLLM's own DeepSeek-V4 code
    (`DeepseekV4Model.load_weights`, the checkpoint names mapped by its weights mapper, which
    renames an expert's `.scale` to `.weight_scale` and views e8m0 as uint8) and by the
    adapter: every parameter bit for bit."""
    from types import SimpleNamespace
    from unittest import mock

    import test_mx
    from vllm.models.deepseek_v4 import DeepseekV4FP8Config
    from vllm.models.deepseek_v4.cpu import model as v4

    path = test_mx.deepseek_v4(tmp_path / "v4")
    prefix = "layers.1.ffn.experts"
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    sizes = (test_mx.E, test_mx.H, test_mx.INTER)
    with mx_backends():
        theirs, ours = (
            build(
                tp_size,
                rank,
                ep,
                "model.layers.1.ffn",
                DeepseekV4FP8Config.from_config(config),
                sizes,
            )
            for _ in range(2)
        )
    assert type(theirs.routed_experts.quant_method).__name__ == "Mxfp4MoEMethod"
    params = dict(theirs.routed_experts.named_parameters())
    # What `DeepseekV4Model.load_weights` reads of the model it loads.
    model = mounted(theirs, f"model.{prefix}")
    model.config = SimpleNamespace(n_routed_experts=test_mx.E, n_shared_experts=1)
    model.is_fused_shared_expert_enabled = False
    model.get_expert_mapping = lambda: v4.DeepseekV4Model.get_expert_mapping(model)
    mapper = v4._make_deepseek_v4_weights_mapper("fp4")
    with fml.open(path) as ckpt:
        weights = [(mapper.map_name(n), ckpt.tensor(n)) for n in mx_names(path, prefix)]
    assert all(".weight_scale" in n or n.endswith(".weight") for n, _ in weights)
    with mock.patch.object(v4, "is_pp_missing_parameter", lambda *_: False):
        v4.DeepseekV4Model.load_weights(model, weights)
    assert_mx_layers_match(ours, params, path, prefix)


def load_as_kimi_k3(theirs, path, prefix: str) -> None:
    """Loads `theirs` as vLLM's Kimi-K3 `load_weights` loads routed experts (its model class
    is GPU-only): `.weight_packed` renamed `.weight`, vLLM's expert mapping for `w1/w2/w3`,
    each parameter's own `weight_loader`."""
    from vllm.model_executor.layers.fused_moe.layer import fused_moe_make_expert_params_mapping

    model = mounted(theirs, prefix)
    params = dict(model.named_parameters())
    mapping = fused_moe_make_expert_params_mapping(
        model,
        ckpt_gate_proj_name="w1",
        ckpt_down_proj_name="w2",
        ckpt_up_proj_name="w3",
        num_experts=theirs.routed_experts.moe_config.num_experts,
    )
    with fml.open(path) as ckpt:
        for name in mx_names(path, prefix):
            loaded = ckpt.tensor(name)
            name = name.replace(".weight_packed", ".weight")
            for param_name, weight_name, expert_id, shard_id in mapping:
                if weight_name in name:
                    name = name.replace(weight_name, param_name)
                    param = params[name]
                    param.weight_loader(param, loaded, name, expert_id=expert_id, shard_id=shard_id)
                    break
            else:
                raise AssertionError(name)


@pytest.mark.parametrize(("tp_size", "rank", "ep"), MX_RANKS)
def test_kimi_k3_experts_match_vllm_mxfp4_loading(vllm_process_groups, tmp_path, tp_size, rank, ep):
    """Kimi-K3's compressed-tensors `mxfp4-pack-quantized` experts, which vLLM rewrites to its
    `mxfp4` method (`Mxfp4Config` -> `Mxfp4MoEMethod`), loaded as its Kimi-K3 `load_weights`
    loads routed experts (see `load_as_kimi_k3`) and by the adapter."""
    import test_mx
    from vllm.model_executor.layers.quantization.mxfp4 import Mxfp4Config

    path = test_mx.kimi_k3(tmp_path / "k3")
    prefix = test_mx.RELEASES["kimi_k3"][1]
    sizes = (test_mx.E, test_mx.H, test_mx.INTER)
    with mx_backends():
        theirs, ours = (
            build(tp_size, rank, ep, prefix.removesuffix(".experts"), Mxfp4Config(), sizes)
            for _ in range(2)
        )
    load_as_kimi_k3(theirs, path, prefix)
    assert_mx_layers_match(ours, dict(theirs.routed_experts.named_parameters()), path, prefix)


@pytest.mark.parametrize("input_scales", [False, True])
@pytest.mark.parametrize(("tp_size", "rank", "ep"), MX_RANKS)
def test_quark_ocp_mx_experts_match_vllm_load_weights(
    vllm_process_groups, tmp_path, tp_size, rank, ep, input_scales
):
    """AMD Quark OCP MX (`w_mxfp4`, and `w_mxfp4_a_fp8` with static input scales) into
    `QuarkOCP_MX_MoEMethod`'s parameters, loaded by vLLM's `FusedMoE.load_weights` and by
    the adapter."""
    from types import SimpleNamespace
    from unittest import mock

    import test_mx
    from vllm.model_executor.layers.quantization.quark import quark_moe
    from vllm.model_executor.layers.quantization.quark.quark import QuarkConfig

    path = test_mx.quark_mxfp4(tmp_path / "quark", input_scales=input_scales)
    prefix = test_mx.RELEASES["quark"][1]
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    sizes = (test_mx.E, test_mx.H, test_mx.INTER)
    current = SimpleNamespace(
        model_config=SimpleNamespace(hf_config=SimpleNamespace(model_type="deepseek_v3"))
    )
    with mx_backends(), mock.patch.object(quark_moe, "get_current_vllm_config", lambda: current):
        theirs, ours = (
            build(
                tp_size,
                rank,
                ep,
                prefix.removesuffix(".experts"),
                QuarkConfig.from_config(config),
                sizes,
            )
            for _ in range(2)
        )
    assert type(theirs.routed_experts.quant_method).__name__ == "QuarkOCP_MX_MoEMethod"
    params = load_both(theirs, ours, path, prefix)
    assert ("w13_input_scale" in params) == input_scales
    assert_same_parameters(ours, params)


@pytest.mark.parametrize("flavor", ["modelopt", "compressed-tensors"])
@pytest.mark.parametrize(("tp_size", "rank", "ep"), MX_RANKS)
def test_mxfp8_experts_match_vllm_load_weights(
    vllm_process_groups, tmp_path, tp_size, rank, ep, flavor
):
    """MiniMax-M3-MXFP8's per-expert experts (`w1/w3/w2.weight` float8 e4m3, uint8
    `weight_scale` per 32 values) into `ModelOptMxFp8FusedMoE`'s parameters (ModelOpt MXFP8)
    or `CompressedTensorsW8A8Mxfp8MoEMethod`'s (compressed-tensors W8A8 MXFP8), loaded by
    vLLM's `FusedMoE.load_weights` (checkpoint names `w1/w2/w3`) and by the adapter."""
    from unittest import mock

    import test_mx
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe import (
        compressed_tensors_moe_w8a8_mxfp8 as ct_mxfp8,
    )
    from vllm.model_executor.layers.quantization.modelopt import ModelOptMxFp8Config

    path = test_mx.mxfp8(tmp_path / "mxfp8", flavor)
    prefix = test_mx.RELEASES["mxfp8"][1]
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    sizes = (test_mx.E, test_mx.H, test_mx.INTER)
    make = ModelOptMxFp8Config if flavor == "modelopt" else quant_config_of
    backend = mock.patch.object(ct_mxfp8, "select_mxfp8_moe_backend", lambda *_, **__: (None, None))
    with mx_backends(), backend:
        theirs, ours = (
            build(
                tp_size,
                rank,
                ep,
                prefix.removesuffix(".experts"),
                make.from_config(config) if flavor == "modelopt" else make(path),
                sizes,
                ckpt_names=("w1", "w2", "w3"),
            )
            for _ in range(2)
        )
    method = {"modelopt": "ModelOptMxFp8FusedMoE"}.get(
        flavor, "CompressedTensorsW8A8Mxfp8MoEMethod"
    )
    assert type(theirs.routed_experts.quant_method).__name__ == method
    params = load_both(theirs, ours, path, prefix)
    assert params["w13_weight"].dtype == torch.float8_e4m3fn
    assert_same_parameters(ours, params)


@pytest.mark.parametrize(("tp_size", "rank"), [(1, 0), (2, 1)])
def test_mx_layers_padded_by_marlin_match_vllm(vllm_process_groups, tmp_path, tp_size, rank):
    """A backend that pads the parameters (Marlin: I/tp to 128, H to 256): vLLM's
    `FusedMoE.weight_loader` puts gate and up each at the start of their half of `w13`'s rows
    and every value in the leading columns, and so does the adapter; the padding stays as
    allocated in both."""
    from unittest import mock

    import test_mx
    from vllm.model_executor.layers.fused_moe.oracle.mxfp4 import Mxfp4MoeBackend
    from vllm.model_executor.layers.quantization import mxfp4

    inter = 192  # I/tp of 192 or 96, which Marlin rounds up to 256 or 128
    path = test_mx.kimi_k3(tmp_path / "k3", inter=inter)
    prefix = test_mx.RELEASES["kimi_k3"][1]
    chosen = (Mxfp4MoeBackend.MARLIN, None)
    sizes = (test_mx.E, test_mx.H, inter)
    select = "select_deepseek_v4_mxfp4_moe_backend"
    with mock.patch.object(mxfp4, select, lambda *_, **__: chosen):
        theirs, ours = (
            build(tp_size, rank, False, prefix.removesuffix(".experts"), mxfp4.Mxfp4Config(), sizes)
            for _ in range(2)
        )
    assert theirs.routed_experts.w13_weight.shape[2] > test_mx.H // 2
    assert theirs.routed_experts.w13_weight.shape[1] > 2 * inter // tp_size
    load_as_kimi_k3(theirs, path, prefix)
    assert_mx_layers_match(ours, dict(theirs.routed_experts.named_parameters()), path, prefix)


@pytest.mark.parametrize(("tp_size", "rank"), [(1, 0), (2, 1)])
def test_deepseek_v4_fused_shared_expert_slot_is_left_to_the_model(
    vllm_process_groups, tmp_path, tp_size, rank
):
    """With the shared expert fused into the routed grouped GEMM (`fuse_shared_experts`, one
    slot after the routed ones), the adapter fills the routed slots exactly as vLLM's
    DeepSeek-V4 loading does and leaves the shared slot to the model's `load_weights`, which
    fills it from `shared_experts` (quantizing the fp8 shared expert for the mxfp4 slot)."""
    from types import SimpleNamespace
    from unittest import mock

    import test_mx
    from vllm.model_executor.layers.fused_moe import expert_map_manager
    from vllm.models.deepseek_v4 import DeepseekV4FP8Config
    from vllm.models.deepseek_v4.cpu import model as v4

    path = test_mx.deepseek_v4(tmp_path / "v4")
    prefix = "layers.1.ffn.experts"
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    sizes = (test_mx.E, test_mx.H, test_mx.INTER)
    # The AITER routing buffers it sets up live on a GPU; loading never reads them.
    no_buffers = mock.patch.object(
        expert_map_manager.ExpertMapManager,
        "_init_aiter_shared_experts_topK_buffer",
        lambda *_, **__: None,
    )
    with mx_backends(), no_buffers:
        theirs, ours = (
            build(
                tp_size,
                rank,
                False,
                "model.layers.1.ffn",
                DeepseekV4FP8Config.from_config(config),
                sizes,
                fuse_shared_experts=True,
                n_shared_experts=1,
            )
            for _ in range(2)
        )
    assert ours.routed_experts.w13_weight.shape[0] == test_mx.E + 1
    params = dict(theirs.routed_experts.named_parameters())
    model = mounted(theirs, f"model.{prefix}")
    model.config = SimpleNamespace(n_routed_experts=test_mx.E, n_shared_experts=1)
    model.is_fused_shared_expert_enabled = False  # the routed experts only, here
    model.get_expert_mapping = lambda: v4.DeepseekV4Model.get_expert_mapping(model)
    mapper = v4._make_deepseek_v4_weights_mapper("fp4")
    with fml.open(path) as ckpt:
        weights = [(mapper.map_name(n), ckpt.tensor(n)) for n in mx_names(path, prefix)]
        with mock.patch.object(v4, "is_pp_missing_parameter", lambda *_: False):
            v4.DeepseekV4Model.load_weights(model, weights)
        consumed = load_fused_moe_layer(ours, ckpt, prefix)
    assert sorted(consumed) == sorted(mx_names(path, prefix))
    for name, expected in params.items():
        actual = getattr(ours.routed_experts, name).data
        routed = slice(0, test_mx.E)
        assert torch.equal(actual[routed], expected.data[routed]), name
        assert (actual[test_mx.E].view(torch.uint8) == 0xA5).all(), f"{name}: shared slot"


def gptq_awq_config(path):
    """vLLM's `AutoGPTQConfig` or `AutoAWQConfig` for a checkpoint, from its config.json, as
    the engine builds it for `quant_method` `gptq` and `awq` on a GPU."""
    import json

    from vllm.model_executor.layers.quantization.auto_awq import AutoAWQConfig
    from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig

    config = json.loads((path / "config.json").read_text())["quantization_config"]
    if config["quant_method"] == "gptq":
        return AutoGPTQConfig.from_config(config)
    return AutoAWQConfig.from_config(config)


def load_both_mapped(theirs, ours, path, prefix: str, quant_config) -> dict[str, torch.Tensor]:
    """`load_both`, with the checkpoint's names first mapped by the quantization config's own
    checkpoint mapper (which drops GPTQ's `.g_idx`), as vLLM's model loading maps them; the
    adapter consumes every tensor of the group, `g_idx` included."""
    mapper = quant_config.get_checkpoint_weight_mapper()
    with fml.open(path) as ckpt:
        names = [n for n in ckpt.keys() if n.startswith(prefix + ".")]
        weights = (
            (mapped[len(prefix) + 1 :], ckpt.tensor(n))
            for n in names
            if (mapped := mapper.map_name(n)) is not None
        )
        assert set(theirs.load_weights(weights))
        consumed = load_fused_moe_layer(ours, ckpt, prefix)
    assert sorted(consumed) == sorted(names)
    # Zero biases the GPTQ method creates for checkpoints that have some (and drops after
    # loading when none came): nobody writes them here.
    return {n: p for n, p in theirs.routed_experts.named_parameters() if not n.endswith("_bias")}


GPTQ_AWQ_RANKS = [(1, 0, False), (2, 1, False), (4, 3, False), (8, 5, False), (2, 1, True)]


@pytest.mark.parametrize("scheme", ["gptq", "awq"])
@pytest.mark.parametrize(("tp_size", "rank", "ep"), GPTQ_AWQ_RANKS)
def test_gptq_awq_layers_match_vllm_load_weights(
    vllm_process_groups, tmp_path, scheme, tp_size, rank, ep
):
    """Qwen3-GPTQ-Int4 (`qweight [in/8, out]`, `qzeros`, `scales`, `g_idx`) into vLLM's
    `AutoGPTQMoEMethod`, and Mixtral-AWQ (`qweight [in, out/8]`) into `AutoAWQMoEMethod`:
    the Marlin methods vLLM picks where I/tp falls on whole groups, whose parameters keep each
    expert input-first (`is_transposed`: `w13_qweight [E, H/8, 2I/tp]` resp. `[E, H, 2I/tp/8]`,
    `w13_scales [E, H/128, 2I/tp]`, `w13_qzeros [E, H/128, 2I/tp/8]`): every parameter equal to
    vLLM's own loading, for TP ranks of 1, 2, 4 and 8 and an EP rank. vLLM has no WNA16 MoE
    kernel on the CPU, so a backend is named: none decides anything of the loading (every
    backend converts in `process_weights_after_loading`)."""
    from unittest import mock

    import test_gptq
    from vllm.model_executor.layers.fused_moe.oracle.int_wna16 import WNA16MoEBackend
    from vllm.model_executor.layers.quantization import auto_awq, auto_gptq

    if scheme == "gptq":
        path, prefix = test_gptq.qwen3_gptq(tmp_path / "gptq"), test_gptq.prefix()
        module, method = auto_gptq, "AutoGPTQMoEMethod"
    else:
        path = test_gptq.mixtral_awq(tmp_path / "awq")
        prefix, module, method = (
            test_gptq.prefix(1, "block_sparse_moe"),
            auto_awq,
            "AutoAWQMoEMethod",
        )
    config = gptq_awq_config(path)
    sizes = (test_gptq.E, test_gptq.H, test_gptq.INTER)
    name = prefix.removesuffix(".experts")
    chosen = (WNA16MoEBackend.MARLIN, None)
    # Mixtral's experts are named w1, w2, w3 (its `FusedMoEFactory(ckpt_names=...)`).
    options = {"ckpt_names": ("w1", "w2", "w3")} if scheme == "awq" else {}
    with mock.patch.object(module, "select_wna16_moe_backend", lambda *_, **__: chosen):
        theirs = build(tp_size, rank, ep, name, config, sizes, **options)
        ours = build(tp_size, rank, ep, name, config, sizes, **options)
    assert type(ours.routed_experts.quant_method).__name__ == method
    params = load_both_mapped(theirs, ours, path, prefix, config)
    assert set(params) == {f"w{w}_{k}" for w in (13, 2) for k in ("qweight", "scales", "qzeros")}
    assert_same_parameters(ours, params)


@contextmanager
def moe_wna16_on_cpu(attention_tp_rank: int):
    """vLLM's `MoeWNA16Method` built and loaded on this CPU: a Triton backend named (vLLM has
    no WNA16 MoE kernel here; the backend decides nothing of the loading), AWQ's GPU
    capability check answered as an Ampere GPU answers it, and the attention TP rank its
    zero-point loader asks for (`get_tensor_model_parallel_rank`) set."""
    from unittest import mock

    from vllm.model_executor.layers.fused_moe.oracle.int_wna16 import WNA16MoEBackend
    from vllm.model_executor.layers.quantization import moe_wna16
    from vllm.platforms.interface import DeviceCapability

    chosen = (WNA16MoEBackend.TRITON, None)
    platform = moe_wna16.current_platform
    with (
        mock.patch.object(moe_wna16, "select_wna16_moe_backend", lambda *_, **__: chosen),
        mock.patch.object(platform, "get_device_capability", lambda *_: DeviceCapability(8, 0)),
        mock.patch.object(moe_wna16, "get_tensor_model_parallel_rank", lambda: attention_tp_rank),
    ):
        yield


# (checkpoint, TP size, rank, EP, quantization="moe_wna16"). Without the last, vLLM's own GPTQ
# or AWQ config picks MoeWNA16Method because I/tp cuts a 128-value group: Qwen3-30B-A3B's
# I=768 at TP=4 (192 rows a rank, as Qwen3-235B-A22B's 1536 at TP=8: groups halved to 64)
# and TP=8 (96: halved to 32). EP ranks hold EPLB replicas. Asymmetric GPTQ loads only
# through `moe_wna16` (vLLM's GPTQ config refuses `sym: false`).
MOE_WNA16_CASES = [
    ("gptq", 4, 3, False, False),
    ("gptq", 8, 5, False, False),
    ("gptq", 1, 0, False, True),
    ("gptq", 2, 1, False, True),
    ("gptq", 2, 1, True, True),
    ("gptq-asym", 4, 1, False, True),
    ("gptq-asym", 2, 1, True, True),
    ("gptq-int8", 8, 2, False, False),
    ("gptq-int8", 1, 0, False, True),
    ("awq", 4, 3, False, False),
    ("awq", 8, 6, False, False),
    ("awq", 1, 0, False, True),
    ("awq", 2, 1, True, True),
]


def vllm_loads(runner, path, prefix: str, quant_config, keep=lambda name: True) -> dict:
    """vLLM's own `load_weights` of the group's tensors that `keep` keeps (names mapped by
    the quantization config's checkpoint mapper, which drops `.g_idx`); returns the
    runner's parameters by name, biases aside (nobody writes them here)."""
    mapper = quant_config.get_checkpoint_weight_mapper()
    with fml.open(path) as ckpt:
        names = [n for n in ckpt.keys() if n.startswith(prefix + ".") and keep(n)]
        loaded = runner.load_weights(
            (mapped[len(prefix) + 1 :], ckpt.tensor(n))
            for n in names
            if (mapped := mapper.map_name(n)) is not None
        )
        assert set(loaded)  # a generator: it loads as it is read
    return {n: p for n, p in runner.routed_experts.named_parameters() if not n.endswith("_bias")}


@pytest.mark.parametrize(("scheme", "tp_size", "rank", "ep", "forced"), MOE_WNA16_CASES)
def test_moe_wna16_layers_match_vllm_load_weights(
    vllm_process_groups, tmp_path, scheme, tp_size, rank, ep, forced
):
    """GPTQ (Qwen3-GPTQ-Int4's names; symmetric, asymmetric with zero points, int8) and AWQ
    (Mixtral-AWQ's) into vLLM's `MoeWNA16Method`, whose parameters are output-first bytes
    (`w13_qweight [E, 2I/tp, H/2]` uint8, `w13_scales [E, 2I/tp, H/g]` in the model's dtype,
    `w13_qzeros [E, I/tp, H/g]` uint8 with GPTQ's points plus one, AWQ's reordered; groups
    halved where I/tp cuts them, scales and points repeated): every parameter equal to
    vLLM's own loading, from parameters poisoned first, and every tensor of the group
    consumed (`g_idx` and symmetric GPTQ's zero points dropped, as vLLM drops them).

    vLLM's own loading of zero points into an EP rank fails (its MoeWNA16 loader writes them
    by global expert id, past the rank's slots): there each slot's zero points are compared
    with vLLM's loading of a whole (TP=1) layer, for the slot's logical expert."""
    import json

    import test_gptq
    from vllm.model_executor.layers.quantization.moe_wna16 import MoeWNA16Config

    if scheme == "awq":
        path = test_gptq.mixtral_awq(tmp_path / scheme, inter=768)
        prefix = test_gptq.prefix(1, "block_sparse_moe")
        options = {"ckpt_names": ("w1", "w2", "w3")}
    else:
        bits = 8 if scheme == "gptq-int8" else 4
        sym = scheme != "gptq-asym"
        path = test_gptq.qwen3_gptq(tmp_path / scheme, bits=bits, inter=768, sym=sym)
        prefix, options = test_gptq.prefix(), {}
    quantization = json.loads((path / "config.json").read_text())["quantization_config"]
    sizes = (test_gptq.E, test_gptq.H, 768)
    name = prefix.removesuffix(".experts")
    zero_points = scheme in ("gptq-asym", "awq")
    split_points = ep and zero_points  # what vLLM's EP loading cannot load

    def points(tensor_name: str) -> bool:
        return tensor_name.endswith(".qzeros")

    eplb = {"enable_eplb": True, "num_redundant_experts": 2} if ep else {}
    with moe_wna16_on_cpu(0 if ep else rank):
        config = MoeWNA16Config.from_config(quantization) if forced else gptq_awq_config(path)
        theirs, ours, failing = (
            build(tp_size, rank, ep, name, config, sizes, **options, **eplb) for _ in range(3)
        )
        experts = ours.routed_experts
        assert type(experts.quant_method).__name__ == "MoeWNA16Method"
        assert experts.group_size == {1: 128, 2: 128, 4: 64, 8: 32}[1 if ep else tp_size]
        params = vllm_loads(
            theirs, path, prefix, config, lambda n: not (split_points and points(n))
        )
        if ep:
            expert_map = theirs.routed_experts.expert_map.tolist()
            physical = {slot: p for p, slot in enumerate(expert_map) if slot >= 0}
            assert max(physical.values()) >= test_gptq.E  # an EPLB replica among the slots
        if split_points:
            with pytest.raises(IndexError):
                vllm_loads(failing, path, prefix, config)
            whole_layer = build(1, 0, False, name, config, sizes, **options)
            whole = vllm_loads(whole_layer, path, prefix, config)
            local = [physical[k] % test_gptq.E for k in range(len(physical))]
            for kind in ("w13_qzeros", "w2_qzeros"):
                params[kind] = whole[kind][local]
    with fml.open(path) as ckpt:
        consumed = load_fused_moe_layer(ours, ckpt, prefix)
        assert sorted(consumed) == sorted(n for n in ckpt.keys() if n.startswith(prefix + "."))
    kinds = ("qweight", "scales", "qzeros") if zero_points else ("qweight", "scales")
    assert {n for n, p in params.items() if p.numel()} == {
        f"w{w}_{k}" for w in (13, 2) for k in kinds
    }
    params = {n: p for n, p in params.items() if p.numel()}  # symmetric GPTQ's placeholders
    assert params["w13_qweight"].dtype == torch.uint8
    assert_same_parameters(ours, params)


def test_moe_wna16_layer_of_another_checkpoint_is_refused(vllm_process_groups, tmp_path):
    """A MoeWNA16 layer built for GPTQ int4 and an AWQ checkpoint of the same shapes (or
    GPTQ int8): refused before any parameter is written, naming both, and left to vLLM by
    `load_format="fastmoe"` with that reason."""
    import test_gptq
    from fastmoe_load.engines.vllm import describe

    gptq = test_gptq.qwen3_gptq(tmp_path / "gptq", inter=768)
    config = gptq_awq_config(gptq)
    others = {
        "awq": (test_gptq.mixtral_awq(tmp_path / "awq", inter=768), "block_sparse_moe"),
        "int8": (test_gptq.qwen3_gptq(tmp_path / "int8", bits=8, inter=768), "mlp"),
    }
    with moe_wna16_on_cpu(3):
        runner = build(4, 3, False, "model.layers.1.mlp", config, (test_gptq.E, test_gptq.H, 768))
    assert type(runner.routed_experts.quant_method).__name__ == "MoeWNA16Method"
    for other, (path, mlp) in others.items():
        prefix = test_gptq.prefix(1, mlp)
        with fml.open(path) as ckpt:
            reason = describe(runner, ckpt, prefix).unfillable()
            assert reason is not None and ("int4" in reason) and (other in reason), reason
            with pytest.raises(fml.RequestError, match="the layer"):
                load_fused_moe_layer(runner, ckpt, prefix)
    for param, tensor in runner.routed_experts.named_parameters():
        if tensor.is_floating_point():
            assert tensor.isnan().all(), f"{param} written before the error"
        else:
            assert (tensor.view(torch.uint8) == 0xA5).all(), f"{param} written before the error"


@pytest.mark.parametrize("scheme", ["int8", "nvfp4"])
@pytest.mark.parametrize(("tp_size", "rank", "ep"), [(1, 0, False), (2, 1, False), (2, 1, True)])
def test_compressed_tensors_int8_nvfp4_layers_match_vllm_load_weights(
    vllm_process_groups, tmp_path, scheme, tp_size, rank, ep
):
    """compressed-tensors int8 W8A8 (`int-quantized`, channel scales) into vLLM's
    `CompressedTensorsW8A8Int8MoEMethod` and NVFP4 (`nvfp4-pack-quantized`, with
    `weight_global_scale` and `input_global_scale`) into `CompressedTensorsW4A4Nvfp4MoEMethod`:
    every parameter equal to vLLM's own loading. Where vLLM has no kernel on this CPU the
    backend is named (it decides nothing of the loading here)."""
    from unittest import mock

    import test_compressed_tensors as ct
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe import (
        compressed_tensors_moe_w4a4_nvfp4 as w4a4,
    )
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe import (
        compressed_tensors_moe_w8a8_int8 as w8a8,
    )

    make = ct.int8_w8a8 if scheme == "int8" else ct.nvfp4_compressed_tensors
    path = make(tmp_path / scheme)
    sizes = (ct.E, ct.H, ct.INTER)
    name = ct.prefix().removesuffix(".experts")
    if scheme == "int8":
        from vllm.model_executor.layers.fused_moe.oracle.int8 import Int8MoeBackend

        module, select = w8a8, "select_int8_moe_backend"
        chosen = (next(iter(Int8MoeBackend)), None)
        method = "CompressedTensorsW8A8Int8MoEMethod"
    else:
        from vllm.model_executor.layers.fused_moe.oracle.nvfp4 import NvFp4MoeBackend

        module, select = w4a4, "select_nvfp4_moe_backend"
        chosen = (NvFp4MoeBackend.EMULATION, None)
        method = "CompressedTensorsW4A4Nvfp4MoEMethod"
    with mock.patch.object(module, select, lambda *_, **__: chosen):
        theirs = build(tp_size, rank, ep, name, quant_config_of(path), sizes)
        ours = build(tp_size, rank, ep, name, quant_config_of(path), sizes)
    assert type(ours.routed_experts.quant_method).__name__ == method
    params = load_both(theirs, ours, path, ct.prefix())
    params = {n: p for n, p in params.items() if not n.endswith("_bias")}
    assert any("scale" in p for p in params), params
    assert_same_parameters(ours, params)
