"""vLLM's in-place reload (`model_loader/reload/inplace.py` `reload_weights`) of a model served
with `load_format="fastmoe"`: whole vLLM models (>= 0.33, built on the CPU) serve checkpoint
A, reload checkpoint B through vLLM's layerwise reload, and must then hold, every parameter
and buffer bit for bit, what a model freshly loaded from B holds and what vLLM's own reload
(`load_format="safetensors"`, A then B) leaves; the expert tensors never reach the model's
`load_weights`. And a checkpoint rewritten during a reload is refused with the served weights
intact. Skipped where vLLM is not installed."""

from __future__ import annotations

import importlib
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
vllm = pytest.importorskip("vllm")

import fastmoe_load as fml  # noqa: E402
from conftest import bits, build_model  # noqa: E402
from fastmoe_load.engines import vllm_loader, vllm_reload  # noqa: E402
from fastmoe_load.engines.vllm_model import expert_layers  # noqa: E402
from test_vllm_loader import WIDER, WIDER_FAMILY, quantize_fp8_blocks  # noqa: E402

# (case, family, save_pretrained options): Qwen3-MoE fused v5 and per-expert, gpt-oss fused,
# fp8 block-scaled experts (DeepSeek-V3's scheme) in a Qwen3-MoE, and DeepSeek-V3 itself (MLA
# attention, a dense first layer, a shared expert, the router's correction bias), bf16 and with
# fp8 block-scaled experts, per-expert files as DeepSeek-V3 releases them.
CASES = {
    "qwen3_moe-fused": ("qwen3_moe", dict(max_shard_size="40KB", save_original_format=False)),
    "qwen3_moe-per_expert": ("qwen3_moe", dict(max_shard_size="40KB")),
    "gpt_oss-fused": ("gpt_oss", dict(save_original_format=False)),
    "fp8-block": ("qwen3_moe", dict(save_original_format=True)),
    "deepseek_v3": ("deepseek_v3", dict(max_shard_size="40KB")),
    "deepseek_v3-fp8-block": ("deepseek_v3", dict(save_original_format=True)),
}
# Intermediate sizes vLLM's CPU MoE kernel takes unpadded: its padded layers cannot be reloaded
# by vLLM's own reload either (the reprocessed layer keeps the unpadded size).
UNPADDED = {"qwen3_moe": {"moe_intermediate_size": 64}}
# DeepSeek-V3 as released routes with a correction bias (`gate.e_score_correction_bias`,
# which vLLM builds only for `noaux_tc`), a buffer of the router a reload must refill too.
FAMILY_SIZES = {
    "deepseek_v3": {
        "moe_intermediate_size": 64,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
    }
}
# fp8 experts: sizes on vLLM's 128-entry blocks.
FP8_FAMILY_SIZES = {
    "qwen3_moe": {"hidden_size": 128, "moe_intermediate_size": 128, "head_dim": 32},
    "deepseek_v3": {
        **FAMILY_SIZES["deepseek_v3"],
        "hidden_size": 128,
        "moe_intermediate_size": 128,
    },
}
# Where vLLM's own reload keeps the served experts (gpt-oss's bf16 fused experts in 0.34: its
# load path bypasses the layerwise reload's accounting, and the layer's previous tensors are
# put back), so that only the fresh model can be compared with.
VLLM_RELOAD_KEEPS_EXPERTS = {"gpt_oss-fused"}
# DeepSeek-V3's attention on a CPU: vLLM's reference MLA backend. The one vLLM prefers where
# the CPU has AMX (AMX_MLA) packs `kv_b_proj`'s weight into its own and then releases it
# (`MLAAttention.process_weights_after_loading` leaves `kv_b_proj.weight` of shape [0]), so
# that no in-place reload, vLLM's own included, can copy the reprocessed weight back (see
# test_vllm_engine.VLLM_RELOAD_FAILS); it also needs vLLM's CPU ops, absent from CUDA wheels.
MLA_BACKEND = "CPU_MLA"


@pytest.fixture(scope="module")
def distributed(vllm_process_groups):
    vllm_loader.register()


def one_way_layout(weight: torch.Tensor) -> torch.Tensor:
    """Each expert's rows rotated by one and columns reversed (bytes moved, never cast)."""
    moved = weight.view(torch.uint8) if weight.element_size() == 1 else weight
    return moved.roll(1, dims=-2).flip(-1).contiguous().view(weight.dtype)


@pytest.fixture(autouse=True)
def without_cpu_kernels(monkeypatch):
    """vLLM's CUDA wheels lack the CPU ops (`vllm._C`) its post-load processing packs CPU
    weights with: there, dense layers keep their checkpoint layout (the same in every model
    compared). The CPU MoE kernel's expert prepacking is stood in for by another one-way
    layout (each expert's rows rotated and columns reversed), applied where vLLM shuffles
    experts into a GPU kernel's layout (`convert_to_unquantized_kernel_format`, rerun by
    every reload; 0.34 does not rerun the CPU prepacking on a weight update, its own reload
    neither), so that a reload that did not rebuild the served layout would show."""
    import importlib

    if hasattr(torch.ops._C, "convert_weight_packed"):
        return
    for module in ("utils", "linear", "vocab_parallel_embedding"):
        found = importlib.import_module(f"vllm.model_executor.layers.{module}")
        if hasattr(found, "dispatch_cpu_unquantized_gemm"):
            monkeypatch.setattr(found, "dispatch_cpu_unquantized_gemm", lambda *a, **k: None)
    cpu_moe = importlib.import_module("vllm.model_executor.layers.fused_moe.experts.cpu_moe")
    monkeypatch.setattr(cpu_moe, "cpu_prepack_moe_weight", lambda weight, isa: weight.clone())
    # fp8 experts: the VNNI prepacking vLLM reruns on every processing, stood in for alike.
    # vLLM offers its CPU fp8 backend only where the CPU has AMX tiles, and none otherwise
    # ("Unsupported FP8 MoE backend: NONE"). These tests run no forward pass and its
    # prepacking is stood in, so nothing needs AMX: it is offered on every CPU alike.
    monkeypatch.setattr(
        cpu_moe,
        "prepare_fp8_moe_layer_for_cpu",
        lambda w13, w2: tuple(one_way_layout(w) for w in (w13, w2)),
    )
    monkeypatch.setattr(
        cpu_moe.CPUExpertsFp8, "_supports_current_device", staticmethod(lambda: True)
    )
    method = importlib.import_module(
        "vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method"
    )
    if hasattr(method, "convert_to_unquantized_kernel_format"):
        convert = method.convert_to_unquantized_kernel_format

        def one_way(*args, **kwargs):
            w13, w2 = convert(*args, **kwargs)
            return tuple(one_way_layout(w) for w in (w13, w2))

        monkeypatch.setattr(method, "convert_to_unquantized_kernel_format", one_way)


def fp8_release(path) -> None:
    """Rewrites the bf16 checkpoint at `path` with fp8 block-scaled experts (128 x 128 blocks,
    float32 `weight_scale_inv`), every other layer left in bfloat16, the experts as Qwen3-FP8
    and DeepSeek-V3 release them."""
    with fml.open(path) as ckpt:
        tensors = {name: ckpt.tensor(name).clone() for name in ckpt.keys()}
        experts = {n for group in ckpt.moe_layers() for n in group.tensor_names}
    for file in path.glob("*.safetensors*"):
        file.unlink()
    for name in sorted(experts):
        stem = name.removesuffix(".weight")
        tensors[name], tensors[f"{stem}.weight_scale_inv"] = quantize_fp8_blocks(tensors[name])
    save_file(tensors, path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
        # Every other linear layer (router, attention, dense and shared MLPs) by its module.
        "modules_to_not_convert": sorted(
            name.removesuffix(".weight")
            for name, tensor in tensors.items()
            if name.startswith("model.layers.")
            and name.endswith(".weight")
            and tensor.dim() == 2
            and name not in experts
        ),
    }
    (path / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """case -> (checkpoint A, checkpoint B): the same architecture, other random weights."""
    saved = {}
    for case, (family, options) in CASES.items():
        fp8 = case.endswith("fp8-block")
        if fp8:
            sizes = FP8_FAMILY_SIZES[family]
        else:
            sizes = {
                **WIDER,
                **WIDER_FAMILY.get(family, {}),
                **UNPADDED.get(family, {}),
                **FAMILY_SIZES.get(family, {}),
            }
        pair = []
        for seed in (1, 2):
            model = build_model(family, seed=seed, **sizes)
            path = tmp_path_factory.mktemp(f"{case}-{'AB'[seed - 1]}")
            model.save_pretrained(path, **options)
            if fp8:
                fp8_release(path)
            pair.append(path)
        saved[case] = tuple(pair)
    return saved


def vllm_config(path, load_format: str, extra: dict | None = None, quantization=None):
    from vllm.config import AttentionConfig, DeviceConfig, LoadConfig, ModelConfig, VllmConfig

    model_config = ModelConfig(
        model=str(path),
        dtype="bfloat16",
        skip_tokenizer_init=True,
        enforce_eager=True,
        quantization=quantization,
    )
    return VllmConfig(
        model_config=model_config,
        load_config=LoadConfig(load_format=load_format, model_loader_extra_config=extra or {}),
        device_config=DeviceConfig(device="cpu"),
        attention_config=AttentionConfig(backend=MLA_BACKEND if model_config.use_mla else None),
    )


def serve(path, load_format: str, extra: dict | None = None, quantization=None):
    """A model as vLLM serves it: built, loaded and processed by `load_model`."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader import get_model_loader

    config = vllm_config(path, load_format, extra, quantization)
    with set_current_vllm_config(config):
        model = get_model_loader(config.load_config).load_model(
            vllm_config=config, model_config=config.model_config
        )
    return model, config


def reload(model, config, path) -> list[str]:
    """vLLM's in-place reload of `model` from `path`; the names that reached `load_weights`."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload.inplace import reload_weights

    received: list[str] = []
    model_load_weights = model.load_weights

    def recording_load_weights(weights):
        return model_load_weights(received.append(name) or (name, t) for name, t in weights)

    model.load_weights = recording_load_weights
    try:
        with set_current_vllm_config(config):
            reload_weights(config, model, None, str(path), True)
    finally:
        del model.load_weights
    return received


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(model.named_parameters())
    tensors |= {f"buffer {n}": b for n, b in model.named_buffers()}
    return tensors


def differing(actual: torch.nn.Module, expected: torch.nn.Module) -> list[str]:
    """The parameters and buffers whose shape, dtype or bytes differ."""
    ours, theirs = state(actual), state(expected)
    assert ours.keys() == theirs.keys()
    return [
        name
        for name, tensor in theirs.items()
        if ours[name].shape != tensor.shape
        or ours[name].dtype != tensor.dtype
        or not torch.equal(bits(ours[name].reshape(-1)), bits(tensor.reshape(-1)))
    ]


def assert_same_state(actual: torch.nn.Module, expected: torch.nn.Module, what: str) -> None:
    differ = differing(actual, expected)
    assert not differ, f"{what}: {len(differ)} tensors differ: {differ}"


@pytest.mark.parametrize("case", CASES)
def test_reload_matches_a_fresh_model(distributed, checkpoints, case, caplog):
    a, b = checkpoints[case]
    ours, config = serve(a, "fastmoe")
    served_ptrs = {n: t.data_ptr() for n, t in state(ours).items()}
    with caplog.at_level("INFO", logger="vllm.fastmoe_load"):
        received = reload(ours, config, b)
    fresh, _ = serve(b, "safetensors")
    assert_same_state(ours, fresh, f"{case}: reloaded A -> B vs a model loaded from B")

    # vLLM's own reload of the same model, A -> B, leaves the same, where it reloads right.
    theirs, their_config = serve(a, "safetensors")
    reload(theirs, their_config, b)
    stale = differing(theirs, fresh)
    if case in VLLM_RELOAD_KEEPS_EXPERTS and stale:
        assert stale and all(".experts." in name for name in stale), stale
    else:
        assert not stale, f"{case}: vLLM's own reload differs from a fresh model: {stale}"
        assert_same_state(ours, theirs, f"{case}: fastmoe's reload vs vLLM's")

    # In place (captured graphs keep their addresses), experts through fastmoe_load only.
    assert {n: t.data_ptr() for n, t in state(ours).items()} == served_ptrs
    with fml.open(b) as ckpt:
        groups = ckpt.moe_layers()
        experts = {name for group in groups for name in group.tensor_names}
        assert set(received) == set(ckpt.keys()) - experts
    (line,) = [r.getMessage() for r in caplog.records if "Reloading" in r.getMessage()]
    assert f"fastmoe_load filled {len(groups)} expert layers" in line, line


def quantized_release(scheme: str, monkeypatch):
    """For a case of `test_4_bit_reload_matches_a_fresh_model`: the `quantization` vLLM is
    given (None: the checkpoint's own), the experts method it must pick, and
    `make(path, seed)`, which saves such a release (another seed, other values); vLLM's
    kernel choice made for this CPU, where it has none of these kernels."""
    import test_vllm_loader as loader_tests

    if scheme == "mxfp4":
        from test_mxfp4 import gpt_oss_release
        from vllm.model_executor.layers.fused_moe.oracle import mxfp4 as oracle
        from vllm.model_executor.layers.quantization import mxfp4

        # vLLM's CPU backend, its prepacking (vLLM's CPU ops, absent from CUDA wheels) stood
        # in for by a one-way layout, as the other CPU MoE prepackings are here.
        backend = oracle.Mxfp4MoeBackend.CPU
        chosen = (backend, oracle.backend_to_kernel_cls(backend)[0])
        monkeypatch.setattr(mxfp4, "select_mxfp4_moe_backend", lambda *_, **__: chosen)
        cpu_moe = importlib.import_module("vllm.model_executor.layers.fused_moe.experts.cpu_moe")
        monkeypatch.setattr(
            cpu_moe,
            "prepare_mxfp4_moe_layer_for_cpu",
            lambda *tensors: tuple(one_way_layout(t) for t in tensors),
        )
        # Offered on CPUs without AMX tiles too, as the fp8 one (`without_cpu_kernels`).
        monkeypatch.setattr(chosen[1], "_supports_current_device", staticmethod(lambda: True))
        sizes = {**WIDER, **WIDER_FAMILY["gpt_oss"]}
        return None, "GptOssMxfp4MoEMethod", lambda path, seed: gpt_oss_release(path, seed, **sizes)
    if scheme == "nvfp4":
        loader_tests.nvfp4_on_this_cpu(monkeypatch)
        return None, "ModelOptNvFp4FusedMoE", loader_tests.nvfp4_checkpoint_at
    if scheme.startswith("int4"):
        loader_tests.int4_on_this_cpu(monkeypatch)
        symmetric = scheme.endswith("-symmetric")
        return (
            None,
            "CompressedTensorsWNA16MoEMethod",
            lambda path, seed: loader_tests.int4_checkpoint_at(path, symmetric, seed),
        )
    if scheme.endswith("-input-first"):
        from vllm.model_executor.layers.quantization import auto_awq, auto_gptq

        scheme = scheme.removesuffix("-input-first")
        module = auto_gptq if scheme == "gptq" else auto_awq
        chosen = loader_tests.triton_wna16()
        monkeypatch.setattr(module, "select_wna16_moe_backend", lambda *_, **__: chosen)
        method = f"Auto{scheme.upper()}MoEMethod"
    else:
        loader_tests.moe_wna16_on_this_cpu(monkeypatch)
        method = "MoeWNA16Method"
    quantization = None if method.startswith("Auto") else "moe_wna16"
    return (
        quantization,
        method,
        lambda path, seed: loader_tests.gptq_awq_checkpoint(path, scheme, seed),
    )


@pytest.mark.parametrize(
    "scheme",
    [
        "gptq",
        "awq",
        "gptq-input-first",
        "awq-input-first",
        "int4-symmetric",
        "int4-asymmetric",
        "nvfp4",
        "mxfp4",
    ],
)
def test_4_bit_reload_matches_a_fresh_model(distributed, tmp_path, monkeypatch, scheme):
    """4-bit experts: GPTQ and AWQ served by vLLM's `AutoGPTQMoEMethod` and `AutoAWQMoEMethod`
    (input-first parameters, turned output-first by their processing; the backend named for
    this CPU, Triton, keeps that layout where Marlin repacks it) and by `MoeWNA16Method`
    (`quantization="moe_wna16"`, the method vLLM falls back to where Marlin cannot take a
    layer), whose loading converts them (unpacked, zero points +1, repacked, AWQ reordered),
    compressed-tensors int4 by `CompressedTensorsWNA16MoEMethod`, ModelOpt NVFP4 (weights,
    block scales, global and input scales) by `ModelOptNvFp4FusedMoE`, and gpt-oss mxfp4
    (blocks, e8m0 scales, biases) by `GptOssMxfp4MoEMethod`: reloaded A -> B
    through fastmoe_load, every parameter and buffer bit for bit as a model loaded from B and
    as vLLM's own reload leaves it, the expert tensors never through `load_weights`."""
    quantization, method, make = quantized_release(scheme, monkeypatch)
    a, b = (make(tmp_path / ab, seed) for seed, ab in enumerate("AB"))
    ours, config = serve(a, "fastmoe", quantization=quantization)
    methods = {type(m.quant_method).__name__ for _, m in expert_layers(ours).values()}
    assert methods == {method}, methods
    served = {n: t.clone() for n, t in state(ours).items()}
    received = reload(ours, config, b)
    fresh, _ = serve(b, "safetensors", quantization=quantization)
    assert_same_state(ours, fresh, f"{scheme}: reloaded A -> B vs a model loaded from B")
    changed = [
        n
        for n, t in state(ours).items()
        if not torch.equal(bits(t.reshape(-1)), bits(served[n].reshape(-1)))
    ]
    weights = ("w13_qweight", "w13_weight_packed", "w13_weight")
    assert any(n.endswith(weights) for n in changed), changed

    theirs, their_config = serve(a, "safetensors", quantization=quantization)
    reload(theirs, their_config, b)
    assert_same_state(ours, theirs, f"{scheme}: fastmoe's reload vs vLLM's")
    with fml.open(b) as ckpt:
        experts = {name for group in ckpt.moe_layers() for name in group.tensor_names}
        assert set(received) == set(ckpt.keys()) - experts


def test_reload_of_the_served_path_and_back(distributed, checkpoints):
    """Reloads A -> B -> A (the same path again, as an RL loop overwriting one directory)."""
    a, b = checkpoints["qwen3_moe-fused"]
    ours, config = serve(a, "fastmoe")
    reference = {n: t.clone() for n, t in state(ours).items()}
    reload(ours, config, b)
    reload(ours, config, a)
    for name, tensor in state(ours).items():
        assert torch.equal(bits(tensor.reshape(-1)), bits(reference[name].reshape(-1))), name


def test_layer_vllm_cannot_take_from_fastmoe_load_goes_through_load_weights(
    distributed, checkpoints, monkeypatch, caplog
):
    """An expert layer fastmoe_load cannot fill as vLLM would (here: declared so) is reloaded
    by the model's own `load_weights`, with the same result, and the log says why."""
    from fastmoe_load.engines import spec as spec_module

    a, b = checkpoints["qwen3_moe-per_expert"]
    ours, config = serve(a, "fastmoe")
    monkeypatch.setattr(
        spec_module.ExpertLayerSpec, "unfillable", lambda self: "a layout it cannot rebuild"
    )
    with caplog.at_level("INFO"):
        received = reload(ours, config, b)
    fresh, _ = serve(b, "safetensors")
    assert_same_state(ours, fresh, "reloaded through load_weights")
    with fml.open(b) as ckpt:
        assert set(received) == set(ckpt.keys())
    assert "a layout it cannot rebuild" in caplog.text
    assert "fastmoe_load filled 0 expert layers" in caplog.text


def rewrite_in_place(path) -> None:
    """What a trainer saving over the checkpoint does to one shard: new bytes, same name."""
    shard = sorted(path.glob("*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-64:] = bytes(64)
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("when", ["before the first write", "after the experts were written"])
@pytest.mark.parametrize("keep_previous", [False, True])
def test_checkpoint_rewritten_during_a_reload_is_refused(
    distributed, checkpoints, tmp_path, monkeypatch, when, keep_previous
):
    """A shard rewritten while the reload reads it: refused (`FileChangedError`), the model
    usable with the previous weights, untouched if the change is found before the first
    write, restored from the host copy if found later with `reload_keep_previous`."""
    a, b = checkpoints["qwen3_moe-fused"]
    target = tmp_path / "b"
    shutil.copytree(b, target)
    extra = {"reload_keep_previous": True} if keep_previous else None
    ours, config = serve(a, "fastmoe", extra)
    before = {n: t.clone() for n, t in state(ours).items()}

    filled = []

    def fill_then_rewrite(ckpt, spec):
        consumed = original_fill(ckpt, spec)
        filled.append(spec.group.prefix)
        if when == "before the first write" and len(filled) == 1:
            rewrite_in_place(target)
        return consumed

    model_load_weights = type(ours).load_weights

    def rewrite_after_the_experts(self, weights):
        """The first tensor after the experts: each expert layer was processed into place."""

        def rewriting():
            for i, item in enumerate(weights):
                if i == 0:
                    rewrite_in_place(target)
                yield item

        return model_load_weights(self, rewriting())

    original_fill = vllm_reload.fill_layer
    with monkeypatch.context() as patched:
        patched.setattr(vllm_reload, "fill_layer", fill_then_rewrite)
        if when != "before the first write":
            patched.setattr(type(ours), "load_weights", rewrite_after_the_experts)
        with pytest.raises(fml.FileChangedError, match="rewritten"):
            reload(ours, config, target)
    after = state(ours)
    assert after.keys() == before.keys()
    for name, tensor in after.items():
        assert not tensor.is_meta, f"{name} left on the meta device"
    changed = sorted(
        n
        for n, t in after.items()
        if not torch.equal(bits(t.reshape(-1)), bits(before[n].reshape(-1)))
    )
    if when == "before the first write" or keep_previous:
        assert not changed
    else:  # the experts (and what was loaded before the change) hold new values
        assert any(".experts." in n for n in changed), changed
        assert len(changed) < len(before)

    # The model reloads normally once the checkpoint is complete again.
    reload(ours, config, b)
    fresh, _ = serve(b, "safetensors")
    assert_same_state(ours, fresh, "reload after a refused one")


def test_missing_checkpoint_is_refused_before_anything_changes(distributed, checkpoints, tmp_path):
    a, _ = checkpoints["qwen3_moe-fused"]
    ours, config = serve(a, "fastmoe")
    before = {n: t.clone() for n, t in state(ours).items()}
    (tmp_path / "empty").mkdir()  # no weights: a trainer that has not written yet
    with pytest.raises(fml.FastMoeLoadError):
        reload(ours, config, tmp_path / "empty")
    for name, tensor in state(ours).items():
        assert torch.equal(bits(tensor.reshape(-1)), bits(before[name].reshape(-1))), name


def redistribute(model, config, physical_to_logical: torch.Tensor) -> None:
    """vLLM's expert redistribution from disk (0.34's fault-tolerance recovery after an EP
    rank died, `reload_experts_from_disk`): every MoE layer reloaded with each physical slot
    holding the logical expert `physical_to_logical[layer, slot]`, through the loader's
    `get_all_weights` and the model's `load_weights`."""
    from vllm.config import set_current_vllm_config
    from vllm.v1.worker.sentinel.eplb_redistribute import reload_experts_from_disk

    reload_set = {
        (layer, int(logical)) for layer, row in enumerate(physical_to_logical) for logical in row
    }
    with set_current_vllm_config(config):
        reload_experts_from_disk(model, config, reload_set, physical_to_logical)


def test_expert_redistribution_from_disk_matches_vllm(distributed, checkpoints, caplog):
    """Each slot given another logical expert (here a rotation, one rank, no redundancy):
    the redistributed experts, read through `load_format="fastmoe"`'s `get_all_weights` (every
    tensor to the model's `load_weights`: see `vllm_reload`), are vLLM's own, bit for bit,
    each slot holding its new logical expert."""
    pytest.importorskip("vllm.v1.worker.sentinel.eplb_redistribute")
    a, _ = checkpoints["qwen3_moe-fused"]
    ours, config = serve(a, "fastmoe")
    theirs, their_config = serve(a, "safetensors")
    before = {n: t.clone() for n, t in state(ours).items()}
    experts = len(ours.moe_layers[0].routed_experts.w13_weight)
    rotated = torch.arange(experts).roll(1).repeat(len(ours.moe_layers), 1)
    with caplog.at_level("INFO", logger="vllm.fastmoe_load"):
        redistribute(ours, config, rotated.clone())
    redistribute(theirs, their_config, rotated.clone())
    assert_same_state(ours, theirs, "redistributed through fastmoe's loader vs vLLM's")
    changed = [
        n
        for n, t in state(ours).items()
        if not torch.equal(bits(t.reshape(-1)), bits(before[n].reshape(-1)))
    ]
    assert changed and all(".experts." in n for n in changed), changed
    # Slot s now holds what slot s - 1 held (the served layout is per expert).
    for name in changed:
        assert torch.equal(bits(state(ours)[name]), bits(before[name].roll(1, dims=0))), name
    assert "every tensor goes there" in caplog.text
