"""The SGLang adapter (`fastmoe_load.engines.sglang`) against SGLang 0.5.23's own expert loading,
bit for bit: TP ranks, EP ranks, redundant experts placed by expert-location metadata,
fused shared-expert slots, per-expert and fused checkpoints (Qwen3-MoE, Mixtral, DeepSeek-V3,
gpt-oss with its interleaved rows and float32 biases), and quantized experts (DeepSeek-V3 fp8
block scales, ModelOpt NVFP4, compressed-tensors int4, gpt-oss mxfp4) in SGLang's own
quantized layers.

Two references, for each case:

- `sglang`: SGLang's own `FusedMoE` layers, built on the CPU under a published test config
  (`override_server_args`, `get_parallel().override` for the TP/EP ranks, SGLang's own
  `ExpertLocationMetadata`), filled by their own `weight_loader`/`weight_loader_fused` as the
  models' `load_weights` call them. Skipped where SGLang is not installed: its PyPI wheel
  pins CUDA builds (torch 2.14.1, `sglang-kernel`, `flashinfer`), so it is not a test
  dependency; the layers build on a CPU with the wheel installed `--no-deps` and a few pure
  Python packages (`scripts/engine-env sglang`).
- `reference`: `sglang_reference.py`, a re-implementation of that code path, run everywhere;
  for quantized experts, layers shaped as SGLang's methods create them, compared with slices
  of the files cut by hand.

An SGLang engine itself does not run here: its CPU backend needs a from-source `sgl-kernel`
build with AVX-512/AMX kernels (this machine has AVX2 only), and its GPU backends CUDA.
"""

from __future__ import annotations

import inspect
import re
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import fastmoe_load as fml
import pytest
import torch
from conftest import bits
from fastmoe_load.engines.sglang import (
    describe,
    fill_expert_layer,
    fill_expert_layers,
    logical_experts,
)
from safetensors.torch import load_file
from sglang_reference import ExpertLocation, ReferenceFusedMoE, load_like_sglang

E = 5  # conftest's families have 5 routed experts
FAMILIES = ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"]
# Placements: (tp_rank, tp_size, ep_rank, ep_size, physical -> logical map or None, shared
# slots). Five experts do not split over two EP ranks: SGLang adds a redundant sixth.
PLACEMENTS = {
    "tp1": (0, 1, 0, 1, None, 0),
    "tp2-rank1": (1, 2, 0, 1, None, 0),
    "ep2-rank1-redundant": (0, 1, 1, 2, [0, 1, 2, 3, 4, 0], 0),
    "tp2-ep2-rank1-rebalanced": (1, 2, 1, 2, [4, 2, 0, 3, 1, 2], 0),
    "tp2-shared-slot": (1, 2, 0, 1, None, 1),
}


def group_of(ckpt: fml.Checkpoint, layer_id: int) -> fml.MoeLayer:
    return next(g for g in ckpt.moe_layers() if f"layers.{layer_id}." in g.prefix)


@contextmanager
def sglang_ranks(placement: tuple, logical: int = E):
    """SGLang's published config for building layers of `placement`'s ranks, with its
    expert-location metadata (None without a map), which the layers read when loading."""
    from sglang.srt.eplb import expert_location as el
    from sglang.srt.runtime_context import get_context, get_parallel

    tp_rank, tp_size, ep_rank, ep_size, mapping, _ = placement
    with get_context().override_server_args(tp_size=tp_size * ep_size, ep_size=ep_size):
        ranks = dict(moe_tp_rank=tp_rank, moe_tp_size=tp_size, moe_ep_rank=ep_rank)
        with get_parallel().override(**ranks, moe_ep_size=ep_size):
            metadata = None
            if mapping is not None:
                physical_to_logical = torch.tensor([mapping] * 4)
                metadata = el.ExpertLocationMetadata._init_raw(
                    ep_size=ep_size,
                    physical_to_logical_map=physical_to_logical,
                    logical_to_all_physical_map=el._compute_logical_to_all_physical_map(
                        physical_to_logical, logical, ep_size, ep_rank
                    ),
                    moe_ep_rank=ep_rank,
                )
            el.set_global_expert_location_metadata(metadata, allow_overwrite=True)
            try:
                yield metadata
            finally:
                el.set_global_expert_location_metadata(None, allow_overwrite=True)


def build_sglang(group: fml.MoeLayer, layer_id: int, placement: tuple) -> torch.nn.Module:
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

    _, _, _, _, mapping, shared = placement
    layer = FusedMoE(
        num_experts=(E if mapping is None else len(mapping)) + shared,
        hidden_size=group.hidden_size,
        intermediate_size=group.intermediate_size,
        layer_id=layer_id,
        top_k=2,
        num_fused_shared_experts=shared,
        params_dtype=torch.bfloat16,
        with_bias=group.has_bias,
        prefix=f"model.layers.{layer_id}.mlp.experts",
    )
    for param in layer.parameters():
        param.data.fill_(float("nan"))
    return layer


def build(group: fml.MoeLayer, layer_id: int, placement: tuple) -> ReferenceFusedMoE:
    tp_rank, tp_size, ep_rank, ep_size, mapping, shared = placement
    physical = E if mapping is None else len(mapping)
    location = None
    if mapping is not None:  # SGLang's map covers every layer
        location = ExpertLocation([mapping] * (layer_id + 1))
    return ReferenceFusedMoE(
        num_experts=physical + shared,
        hidden_size=group.hidden_size,
        intermediate_size=group.intermediate_size,
        layer_id=layer_id,
        tp_rank=tp_rank,
        tp_size=tp_size,
        ep_rank=ep_rank,
        ep_size=ep_size,
        num_fused_shared_experts=shared,
        with_bias=group.has_bias,
        location=location,
    )


def assert_same_state(ours: torch.nn.Module, theirs: torch.nn.Module, what: str) -> None:
    for (name, actual), (_, expected) in zip(
        ours.named_parameters(), theirs.named_parameters(), strict=True
    ):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
        assert torch.equal(bits(actual), bits(expected)), f"{what}: {name} differs"


@pytest.fixture(params=["sglang", "reference"])
def layers(request):
    """`(layer builder, context manager of a placement yielding its location metadata)`
    for SGLang's own FusedMoE or its re-implementation."""
    if request.param == "reference":

        @contextmanager
        def reference_ranks(placement):
            yield None  # each ReferenceFusedMoE carries its own location

        return build, reference_ranks
    pytest.importorskip("sglang.srt.layers.moe.fused_moe_triton.layer")
    return build_sglang, sglang_ranks


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_matches_sglang_loading(saved_models, layers, family: str, placement: str) -> None:
    """Ours from each save of the model (experts through fastmoe_load, the rest as the model
    hands it over) equals SGLang's loading of the save its model reads: per-expert files,
    or gpt-oss's fused ones."""
    new_layer, ranks = layers
    config = PLACEMENTS[placement]
    if family != "deepseek_v3" and config[5]:
        pytest.skip("fused shared experts are DeepSeek's")
    with ranks(config) as metadata, fml.open(saved_models[family, True].path) as ckpt:
        layer_ids = sorted({int(g.prefix.split(".")[2]) for g in ckpt.moe_layers()})
        if family == "gpt_oss" and config[3] > 1:
            # SGLang's gpt-oss hands every expert's fused tensors, biases included, to
            # `weight_loader_fused`, which copies them whole: no EP load, with any loader.
            group = group_of(ckpt, layer_ids[0])
            with pytest.raises(RuntimeError, match="must match the size"):
                load_like_sglang(
                    new_layer(group, 0, config),
                    {n: ckpt.tensor(n) for n in group.tensor_names},
                    E,
                )
            pytest.skip("SGLang 0.5.23 cannot load gpt-oss (bf16) on EP ranks")
        expected = {}
        for layer_id in layer_ids:
            group = group_of(ckpt, layer_id)
            theirs = new_layer(group, layer_id, config)
            load_like_sglang(theirs, {n: ckpt.tensor(n) for n in group.tensor_names}, E)
            routed = theirs.num_local_experts - theirs.num_fused_shared_experts
            assert not theirs.w2_weight[:routed].isnan().any()
            expected[layer_id] = theirs
        for original in (True, False):
            with fml.open(saved_models[family, original].path) as source:
                for layer_id in layer_ids:
                    group = group_of(source, layer_id)
                    ours = new_layer(group, layer_id, config)
                    location = getattr(ours, "location", metadata)
                    consumed = fill_expert_layer(ours, source, group, location)
                    assert consumed and all("bias" not in name for name in consumed)
                    rest = {n: source.tensor(n) for n in group.tensor_names if n not in consumed}
                    load_like_sglang(ours, rest, E)
                    save = "per-expert" if original else "fused"
                    assert_same_state(ours, expected[layer_id], f"{family} {save} {layer_id}")
                    if config[5]:  # the shared slot is left to the model's load_weights
                        assert ours.w13_weight[-1].isnan().all()
                        assert ours.w2_weight[-1].isnan().all()


def test_logical_experts_follow_sglang_placement() -> None:
    layer = ReferenceFusedMoE(
        num_experts=8, hidden_size=4, intermediate_size=4, ep_rank=1, ep_size=2
    )
    assert logical_experts(layer) == [4, 5, 6, 7]
    location = ExpertLocation([[7, 6, 5, 4, 3, 2, 1, 0], [0, 0, 1, 1, 2, 2, 3, 3]])
    assert logical_experts(layer, location) == [3, 2, 1, 0]
    layer.layer_id = 1
    assert logical_experts(layer, location) == [2, 2, 3, 3]
    layer.layer_id = 2  # past SGLang's map: identity, as its logical_to_all_physical
    assert logical_experts(layer, location) == [4, 5, 6, 7]
    layer.uses_expert_location = False  # e.g. a draft model's layer
    layer.layer_id = 0
    assert logical_experts(layer, location) == [4, 5, 6, 7]


def test_layers_the_adapter_cannot_fill_are_left_to_the_model(saved_models) -> None:
    saved = saved_models["qwen3_moe", True]
    with fml.open(saved.path) as ckpt:
        groups = list(ckpt.moe_layers())
        model = torch.nn.Module()
        layers = {}
        for g in groups:
            layers[g.prefix] = build(g, int(g.prefix.split(".")[2]), PLACEMENTS["tp1"])
        first, second = groups[0].prefix, groups[1].prefix
        layers[second].quant_method = object()  # a quantized layer
        for prefix, layer in layers.items():
            parent = model
            for part in prefix.split(".")[:-1]:
                if not hasattr(parent, part):
                    parent.add_module(part, torch.nn.Module())
                parent = getattr(parent, part)
            parent.add_module(prefix.split(".")[-1], layer)
        consumed = fill_expert_layers(model, ckpt)
    assert consumed == set(groups[0].tensor_names)
    assert not layers[first].w13_weight.isnan().any()
    assert layers[second].w13_weight.isnan().all()


def test_placement_beyond_the_checkpoint_is_refused_untouched(saved_models) -> None:
    saved = saved_models["qwen3_moe", False]
    with fml.open(saved.path) as ckpt:
        group = group_of(ckpt, 0)
        layer = build(group, 0, (0, 1, 1, 2, [0, 1, 2, 3, 4, 7], 0))
        with pytest.raises(fml.FastMoeLoadError, match=r"places experts \[7\]"):
            fill_expert_layer(layer, ckpt, group, layer.location)
    assert layer.w13_weight.isnan().all() and layer.w2_weight.isnan().all()


def test_sglang_layer_contract() -> None:
    """Where SGLang is importable: its FusedMoE sets every attribute the adapter reads, and
    its loading code still has the shape `sglang_reference` re-implements."""
    layer_module = pytest.importorskip("sglang.srt.layers.moe.fused_moe_triton.layer")
    source = inspect.getsource(layer_module.FusedMoE.__init__)
    for attribute in (
        "moe_tp_rank",
        "moe_tp_size",
        "moe_ep_rank",
        "_expert_storage_rank",
        "num_local_experts",
        "num_fused_shared_experts",
        "layer_id",
        "uses_expert_location",
        "quant_method",
        "weight_load_method",
        "use_triton_kernels",
        "use_flashinfer_trtllm_moe",
        "use_presharded_weights",
    ):
        assert f"self.{attribute} =" in source, attribute
    loader = inspect.getsource(layer_module.FusedMoE._map_global_expert_id_to_local_expert_id)
    assert "self._expert_storage_rank * self._num_local_routed" in loader


def test_sglang_model_loader(saved_models, tmp_path) -> None:
    """SGLang builds `FastMoeModelLoader` from `load_format`, and its `load_model` fills the
    experts (SGLang's own FusedMoE layers) and hands every other tensor, and only those, to
    the model's `load_weights`, then SGLang's post-load processing."""
    pytest.importorskip("sglang.srt.layers.moe.fused_moe_triton.layer")
    from fastmoe_load.engines.sglang_loader import FastMoeModelLoader
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.model_loader.loader import get_model_loader

    with pytest.raises(fml.FastMoeLoadError, match="takes num_threads, io, prefetch"):
        FastMoeModelLoader(LoadConfig(model_loader_extra_config={"enable_gds": True}))
    loader = get_model_loader(
        LoadConfig(load_format=FastMoeModelLoader, model_loader_extra_config={"num_threads": 2})
    )
    assert isinstance(loader, FastMoeModelLoader)

    saved = saved_models["qwen3_moe", False]  # fused; SGLang's Qwen3-MoE reads per-expert
    per_expert = fml.open(saved_models["qwen3_moe", True].path)
    with sglang_ranks(PLACEMENTS["tp2-rank1"]), per_expert, fml.open(saved.path) as ckpt:
        model = torch.nn.Module()
        model.model = torch.nn.Module()
        model.model.layers = torch.nn.ModuleList()
        references = []
        for layer_id, group in enumerate(per_expert.moe_layers()):
            block = torch.nn.Module()
            block.mlp = torch.nn.Module()
            block.mlp.experts = build_sglang(group, layer_id, PLACEMENTS["tp2-rank1"])
            model.model.layers.append(block)
            reference = build_sglang(group, layer_id, PLACEMENTS["tp2-rank1"])
            tensors = {n: per_expert.tensor(n) for n in group.tensor_names}
            load_like_sglang(reference, tensors, E)
            references.append(reference)
        handed_over: list[str] = []
        model.load_weights = lambda weights: handed_over.extend(name for name, _ in weights)
        loader.initialize_model_for_startup = lambda **_: model
        config = type("ModelConfig", (), {"model_path": str(saved.path), "dtype": torch.bfloat16})
        device = type("DeviceConfig", (), {"device": "cpu"})
        assert loader.load_model(model_config=config, device_config=device) is model
        expert_names = {n for g in ckpt.moe_layers() for n in g.tensor_names}
        assert sorted(handed_over) == sorted(set(ckpt.keys()) - expert_names)
    for block, reference in zip(model.model.layers, references, strict=True):
        assert_same_state(block.mlp.experts, reference, "load_model")


# ---- quantized experts against SGLang's own loading ----

# Placements of the quantized fixtures' four experts: (tp_rank, tp_size, ep_rank, ep_size,
# physical -> logical map or None, shared slots); two redundant experts under EP 2.
QUANT_PLACEMENTS = {
    "tp1": (0, 1, 0, 1, None, 0),
    "tp2-rank1": (1, 2, 0, 1, None, 0),
    "ep2-rank1": (0, 1, 1, 2, None, 0),
    "ep2-rank1-redundant": (0, 1, 1, 2, [0, 1, 2, 3, 1, 2], 0),
    "tp2-ep2-rank0-rebalanced": (0, 2, 0, 2, [3, 2, 0, 1, 2, 3], 0),
}


def quantized_checkpoint(scheme: str, path) -> Path:
    """The quantized fixtures of the scheme tests, with real releases' names and dtypes:
    DeepSeek-V3 fp8 block scales, ModelOpt NVFP4, Kimi-K2's compressed-tensors int4 and
    gpt-oss mxfp4."""
    import test_int4
    import test_mxfp4
    import test_nvfp4
    import test_quant

    return {
        "fp8-block": lambda: test_quant.per_expert_block(path, torch.float32, "deepseek_v3"),
        "nvfp4": lambda: test_nvfp4.nvfp4_modelopt(path),
        "int4": lambda: test_int4.int4_pack_quantized(path),
        "mxfp4": lambda: test_mxfp4.gpt_oss_mxfp4(path),
    }[scheme]()


def sglang_quant_config(ckpt: fml.Checkpoint):
    """SGLang's quantization config of the checkpoint, from its config.json."""
    from sglang.srt.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )
    from sglang.srt.layers.quantization.fp8 import Fp8Config
    from sglang.srt.layers.quantization.modelopt_quant import ModelOptFp4Config
    from sglang.srt.layers.quantization.mxfp4 import Mxfp4Config

    config = ckpt.config["quantization_config"]
    kinds = {
        "fp8": Fp8Config,
        "modelopt": ModelOptFp4Config,
        "compressed-tensors": CompressedTensorsConfig,
        "mxfp4": Mxfp4Config,
    }
    return kinds[config["quant_method"]].from_config(config)


@contextmanager
def marlin_runner():
    """SGLang's Marlin MoE runner, under which its NVFP4 method builds off Blackwell (the
    Hopper deployment); loading is the same for every runner that keeps gate rows first."""
    from sglang.srt.layers.moe.utils import MoeRunnerBackend
    from sglang.srt.runtime_context import get_flags

    flags = get_flags().moe
    before = flags.runner_backend
    flags.runner_backend = MoeRunnerBackend.MARLIN
    try:
        yield
    finally:
        flags.runner_backend = before


def build_sglang_quantized(
    ckpt: fml.Checkpoint, group: fml.MoeLayer, layer_id: int, placement: tuple
) -> torch.nn.Module:
    """SGLang's FusedMoE for `group` under the checkpoint's quantization config, every
    parameter poisoned (NaN, or 0xA5 bytes where it holds integers or packed values)."""
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

    _, _, _, _, mapping, shared = placement
    with marlin_runner():
        layer = FusedMoE(
            num_experts=(group.num_experts if mapping is None else len(mapping)) + shared,
            hidden_size=group.hidden_size,
            intermediate_size=group.intermediate_size,
            layer_id=layer_id,
            top_k=2,
            num_fused_shared_experts=shared,
            params_dtype=torch.bfloat16,
            quant_config=sglang_quant_config(ckpt),
            with_bias=group.has_bias,
            prefix=group.prefix,
        )
    for param in layer.parameters():
        if param.is_floating_point() and param.element_size() > 1:
            param.data.fill_(float("nan"))
        else:
            param.data.view(torch.uint8).fill_(0xA5)
    return layer


def load_quantized_like_sglang(
    layer: torch.nn.Module, ckpt: fml.Checkpoint, group: fml.MoeLayer, names
) -> None:
    """The checkpoint tensors `names` (of `group`, one layer's experts) into SGLang's `layer`
    as its
    models' `load_weights` hand them over: per-expert names through
    `FusedMoE.make_expert_params_mapping` (DeepSeek, Qwen3-MoE, Kimi-K2), `experts.{e}.
    {gate,up,down}_proj.{suffix}` -> `experts.w13_{suffix}` / `w2_{suffix}`; gpt-oss's
    mxfp4 files through `GptOssForCausalLM._load_mxfp4_experts_weights` itself."""
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

    names = [n for n in ckpt.keys() if n in set(names)]  # the files' order
    prefix = layer.layer_name
    if not any(re.search(r"\.experts\.\d+\.", n) for n in names):
        from sglang.srt.models.gpt_oss import GptOssForCausalLM

        model = SimpleNamespace(
            config=SimpleNamespace(
                intermediate_size=layer.moe_runner_config.intermediate_size_per_partition
                * layer.moe_tp_size,
                num_local_experts=group.num_experts,
            ),
            named_parameters=lambda: [(f"{prefix}.{n}", p) for n, p in layer.named_parameters()],
            get_submodule=lambda name: layer,
        )
        weights = ((n, ckpt.tensor(n)) for n in names)
        GptOssForCausalLM._load_mxfp4_experts_weights(model, weights)
        return
    params = dict(layer.named_parameters())
    mapping = FusedMoE.make_expert_params_mapping(
        "gate_proj", "down_proj", "up_proj", group.num_experts
    )
    for name in names:
        for param_prefix, weight_name, expert_id, shard_id in mapping:
            if f".{weight_name}" not in name:
                continue
            param_name = param_prefix.removeprefix("experts.") + name.split(weight_name)[1]
            param = params[param_name]
            param.weight_loader(
                param, ckpt.tensor(name), f"{prefix}.{param_name}", shard_id, expert_id
            )
            break


def assert_quantized_state(ours: torch.nn.Module, theirs: torch.nn.Module, what: str) -> None:
    """Every parameter of `ours` equals SGLang's loading in `theirs`, as bytes."""
    for (name, actual), (_, expected) in zip(
        ours.named_parameters(), theirs.named_parameters(), strict=True
    ):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
        same = torch.equal(actual.data.view(torch.uint8), expected.data.view(torch.uint8))
        assert same, f"{what}: {name} differs"


QUANT_SCHEMES = {
    # scheme: (filled parameters, of which any left to SGLang's loader)
    "fp8-block": ("w13_weight", "w2_weight", "w13_weight_scale_inv", "w2_weight_scale_inv"),
    "nvfp4": (
        "w13_weight",
        "w2_weight",
        "w13_weight_scale",
        "w2_weight_scale",
        "w13_weight_scale_2",
        "w2_weight_scale_2",
    ),
    "int4": (
        "w13_weight_packed",
        "w2_weight_packed",
        "w13_weight_scale",
        "w2_weight_scale",
        "w13_weight_shape",
        "w2_weight_shape",
    ),
    "mxfp4": ("w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale"),
}


@pytest.fixture(scope="module", params=sorted(QUANT_SCHEMES))
def quantized(request, tmp_path_factory):
    return request.param, quantized_checkpoint(request.param, tmp_path_factory.mktemp("q"))


@pytest.mark.parametrize("placement", QUANT_PLACEMENTS)
def test_quantized_layers_match_sglang_loading(quantized, placement: str) -> None:
    """DeepSeek-V3 fp8 block scales (`Fp8MoEMethod`), ModelOpt NVFP4
    (`ModelOptNvFp4FusedMoEMethod`), compressed-tensors int4 (`CompressedTensorsWNA16MoE`,
    input-first) and gpt-oss mxfp4 (`Mxfp4MoEMethod`): SGLang's own layers filled by the
    adapter, the rest by SGLang's loading, equal SGLang's loading of everything, every
    parameter as bytes; the adapter fills exactly the parameters listed, and SGLang's loading
    reaches each of them."""
    pytest.importorskip("sglang.srt.layers.moe.fused_moe_triton.layer")
    scheme, path = quantized
    config = QUANT_PLACEMENTS[placement]
    with fml.open(path) as ckpt:
        group = ckpt.moe_layers()[-1]
        layer_id = int(group.prefix.split(".")[2])
        with sglang_ranks(config, group.num_experts) as metadata:
            theirs = build_sglang_quantized(ckpt, group, layer_id, config)
            ours = build_sglang_quantized(ckpt, group, layer_id, config)
            spec = describe(ours, ckpt, group, metadata)
            if scheme == "mxfp4" and config[4] is not None:
                # SGLang's gpt-oss loader slices experts linearly, whatever EPLB placed, so
                # it cannot load redundant experts; the adapter leaves them to it.
                assert "linear EP slices" in spec.unfillable()
                with pytest.raises(RuntimeError, match="must match the size"):
                    load_quantized_like_sglang(theirs, ckpt, group, group.tensor_names)
                return
            load_quantized_like_sglang(theirs, ckpt, group, group.tensor_names)
            assert spec.unfillable() is None, spec.unfillable()
            consumed = fill_expert_layer(ours, ckpt, group, metadata)
            assert sorted(spec.filled) == sorted(QUANT_SCHEMES[scheme])
            rest = [n for n in group.tensor_names if n not in consumed]
            load_quantized_like_sglang(ours, ckpt, group, rest)
        for name in QUANT_SCHEMES[scheme]:
            loaded = getattr(theirs, name).data.view(torch.uint8)
            assert not (loaded == 0xA5).all(), f"SGLang left {name} unloaded"
            if getattr(theirs, name).is_floating_point():
                assert not getattr(theirs, name).float().isnan().all(), name
        assert_quantized_state(ours, theirs, f"{scheme} {placement}")


def hand_sliced(
    scheme: str, path: Path, prefix: str, experts: list[int], tp_rank: int, tp_size: int
) -> dict:
    """What SGLang 0.5.23's loading writes for the filled parameters of `QUANT_SCHEMES`,
    sliced by hand from the safetensors file: gate's and up's rows of the rank (weights,
    scales on their grids; per-tensor scales as `[gate, up]`), down's columns; the WNA16
    parameters transposed (input-first) with `w13_weight_shape` the up projection's `[rows,
    cols]`; gpt-oss's fused mxfp4 rows of whole 32-value blocks, gate and up interleaved."""
    tensors = load_file(path / "model.safetensors")

    def narrow(t: torch.Tensor, dim: int) -> torch.Tensor:
        size = t.shape[dim] // tp_size
        return t.narrow(dim, tp_rank * size, size)

    if scheme == "mxfp4":
        inter = tensors[f"{prefix}.down_proj_blocks"].shape[2] * 32
        chunk = -(-inter // 32 // tp_size) * 32
        first, last = min(tp_rank * chunk, inter), min((tp_rank + 1) * chunk, inter)

        def fused(name: str, cols: slice | None = None) -> torch.Tensor:
            t = tensors[f"{prefix}.{name}"][experts]
            t = t.flatten(2) if t.dim() == 4 else t
            return t[:, 2 * first : 2 * last] if cols is None else t[..., cols]

        return {
            "w13_weight": fused("gate_up_proj_blocks"),
            "w13_weight_scale": fused("gate_up_proj_scales"),
            "w2_weight": fused("down_proj_blocks", slice(first // 2, last // 2)),
            "w2_weight_scale": fused("down_proj_scales", slice(first // 32, last // 32)),
        }
    weight = "weight_packed" if scheme == "int4" else "weight"
    kinds = {
        "fp8-block": ["weight_scale_inv"],
        "nvfp4": ["weight_scale", "weight_scale_2"],
        "int4": ["weight_scale"],
    }[scheme]
    out: dict[str, torch.Tensor] = {}
    for kind in (weight, *kinds):

        def t(e: int, module: str, kind: str = kind) -> torch.Tensor:
            return tensors[f"{prefix}.{e}.{module}.{kind}"]

        if t(0, "down_proj").dim() == 0:  # per tensor
            w13 = [torch.stack([t(e, "gate_proj"), t(e, "up_proj")]) for e in experts]
            w2 = [t(e, "down_proj") for e in experts]
        else:
            w13 = [
                torch.cat([narrow(t(e, m), 0) for m in ("gate_proj", "up_proj")]) for e in experts
            ]
            w2 = [narrow(t(e, "down_proj"), 1) for e in experts]
        if scheme == "int4":
            w13, w2 = [m.T for m in w13], [m.T for m in w2]
        out[f"w13_{kind}"], out[f"w2_{kind}"] = torch.stack(w13), torch.stack(w2)
    out["w13_weight"], out["w2_weight"] = out.pop(f"w13_{weight}"), out.pop(f"w2_{weight}")
    if scheme == "int4":
        out["w13_weight_packed"], out["w2_weight_packed"] = (
            out.pop("w13_weight"),
            out.pop("w2_weight"),
        )
        for target, module in (("w13", "up_proj"), ("w2", "down_proj")):
            shapes = [tensors[f"{prefix}.{e}.{module}.weight_shape"] for e in experts]
            out[f"{target}_weight_shape"] = torch.stack(shapes).float()
    return out


@pytest.mark.parametrize("placement", QUANT_PLACEMENTS)
def test_quantized_layers_match_hand_slices(quantized, placement: str) -> None:
    """Everywhere, SGLang or not: the adapter fills layers shaped as SGLang's quantized
    methods create them (`sglang_reference`'s stand-ins) with the slices SGLang's loading
    takes, cut by hand from the files, as bytes; the rest stays poisoned (NVFP4's input
    scales and gpt-oss's biases are SGLang's to load), and gpt-oss mxfp4 under EPLB is left to
    SGLang."""
    scheme, path = quantized
    tp_rank, tp_size, ep_rank, ep_size, mapping, _ = QUANT_PLACEMENTS[placement]
    with fml.open(path) as ckpt:
        group = ckpt.moe_layers()[-1]
        layer_id = int(group.prefix.split(".")[2])
        layer = ReferenceFusedMoE(
            num_experts=group.num_experts if mapping is None else len(mapping),
            hidden_size=group.hidden_size,
            intermediate_size=group.intermediate_size,
            layer_id=layer_id,
            tp_rank=tp_rank,
            tp_size=tp_size,
            ep_rank=ep_rank,
            ep_size=ep_size,
            location=None if mapping is None else ExpertLocation([mapping] * (layer_id + 1)),
            scheme=scheme,
        )
        spec = describe(layer, ckpt, group, layer.location)
        if scheme == "mxfp4" and mapping is not None:
            assert "linear EP slices" in spec.unfillable()
            return
        assert spec.unfillable() is None, spec.unfillable()
        consumed = fill_expert_layer(layer, ckpt, group, layer.location)
    left = {n for n in group.tensor_names if "input_scale" in n or n.endswith("_bias")}
    assert sorted(consumed) == sorted(set(group.tensor_names) - left)
    experts = logical_experts(layer, layer.location)
    want = hand_sliced(scheme, path, group.prefix, experts, tp_rank, tp_size)
    for name, param in layer.named_parameters():
        if name not in want:
            assert (param.data.view(torch.uint8) == 0xA5).all() or param.isnan().all(), name
            continue
        expected = want[name].to(param.dtype) if name.endswith("_shape") else want[name]
        assert param.dtype == expected.dtype and param.shape == expected.shape, name
        assert torch.equal(param.data.view(torch.uint8), expected.contiguous().view(torch.uint8)), (
            name
        )


def test_sglang_model_loader_fills_fp8_block_experts(tmp_path) -> None:
    """`FastMoeModelLoader.load_model` on a DeepSeek-V3 fp8 checkpoint (SGLang's own
    `Fp8MoEMethod` layer, TP rank 1 of 2): the experts' weights and block scales are filled,
    every other tensor, the shared expert's included, goes to the model's `load_weights`, and
    the layer equals SGLang's loading of the whole checkpoint."""
    pytest.importorskip("sglang.srt.layers.moe.fused_moe_triton.layer")
    from fastmoe_load.engines.sglang_loader import FastMoeModelLoader
    from sglang.srt.configs.load_config import LoadConfig

    path = quantized_checkpoint("fp8-block", tmp_path / "deepseek-v3-fp8")
    config = QUANT_PLACEMENTS["tp2-rank1"]
    loader = FastMoeModelLoader(LoadConfig(load_format=FastMoeModelLoader))
    with sglang_ranks(config, 4), fml.open(path) as ckpt:
        group = ckpt.moe_layers()[0]
        model = torch.nn.Module()
        model.model = torch.nn.Module()
        model.model.layers = torch.nn.ModuleList([torch.nn.Module(), torch.nn.Module()])
        model.model.layers[1].mlp = torch.nn.Module()
        model.model.layers[1].mlp.experts = build_sglang_quantized(ckpt, group, 1, config)
        reference = build_sglang_quantized(ckpt, group, 1, config)
        load_quantized_like_sglang(reference, ckpt, group, group.tensor_names)
        handed_over: list[str] = []
        model.load_weights = lambda weights: handed_over.extend(name for name, _ in weights)
        loader.initialize_model_for_startup = lambda **_: model
        model_config = type("ModelConfig", (), {"model_path": str(path), "dtype": torch.bfloat16})
        device = type("DeviceConfig", (), {"device": "cpu"})
        assert loader.load_model(model_config=model_config, device_config=device) is model
        assert sorted(handed_over) == sorted(set(ckpt.keys()) - set(group.tensor_names))
        assert any("shared_experts" in name for name in handed_over)
    assert_quantized_state(model.model.layers[1].mlp.experts, reference, "load_model fp8")
