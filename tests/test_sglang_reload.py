"""SGLang's in-place weight update (`update_weights_from_disk(model_path,
load_format=FastMoeModelLoader)`) through the fastmoe loader, on SGLang 0.5.23's own `FusedMoE`
layers built on the CPU (an SGLang engine does not run here, see `test_sglang.py`): served
from checkpoint A, updated from checkpoint B in the order SGLang's `WeightUpdater` calls the
loader, the layers must hold what SGLang's own loading of B writes, bit for bit; a checkpoint
rewritten before the first write is refused with the served weights intact, SGLang's roll-back
included. Skipped where SGLang is not installed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("sglang.srt.layers.moe.fused_moe_triton.layer")

import fastmoe_load as fml
from conftest import bits, build_model
from test_sglang import (
    PLACEMENTS,
    QUANT_PLACEMENTS,
    QUANT_SCHEMES,
    E,
    assert_quantized_state,
    assert_same_state,
    build_sglang,
    build_sglang_quantized,
    load_like_sglang,
    load_quantized_like_sglang,
    quantized_checkpoint,
    sglang_ranks,
)

PLACEMENT = PLACEMENTS["tp2-rank1"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(A, B): Qwen3-MoE, fused v5 files, other random weights; and B per-expert for
    SGLang's own loading (its Qwen3-MoE reads per-expert names)."""
    saved = {}
    for which, seed in (("A", 1), ("B", 2)):
        model = build_model("qwen3_moe", seed=seed)
        for original in (False, True):
            path = tmp_path_factory.mktemp(f"{which}-{'orig' if original else 'v5'}")
            model.save_pretrained(path, max_shard_size="40KB", save_original_format=original)
            saved[which, original] = path
    return saved


def bf16_layers(per_expert_path) -> dict[int, torch.nn.Module]:
    """SGLang's `FusedMoE` layers of a bf16 checkpoint's expert groups, by layer index."""
    with fml.open(per_expert_path) as ckpt:
        return {
            layer_id: build_sglang(group, layer_id, PLACEMENT)
            for layer_id, group in enumerate(ckpt.moe_layers())
        }


class Served:
    """A model of SGLang `FusedMoE` layers (`layers`, by layer index) served from a
    checkpoint by the fastmoe loader."""

    def __init__(self, path, layers: dict[int, torch.nn.Module]) -> None:
        from fastmoe_load.engines.sglang_loader import FastMoeModelLoader
        from sglang.srt.configs.load_config import LoadConfig

        self.loader = FastMoeModelLoader(LoadConfig(load_format=FastMoeModelLoader))
        self.model = torch.nn.Module()
        self.model.model = torch.nn.Module()
        blocks = [torch.nn.Module() for _ in range(max(layers) + 1)]
        self.model.model.layers = torch.nn.ModuleList(blocks)
        for layer_id, experts in layers.items():
            blocks[layer_id].mlp = torch.nn.Module()
            blocks[layer_id].mlp.experts = experts
        self._experts = list(layers.values())
        self.handed_over: list[str] = []
        self.model.load_weights = lambda weights: self.handed_over.extend(n for n, _ in weights)
        self.loader.initialize_model_for_startup = lambda **_: self.model
        config = type("ModelConfig", (), {"model_path": str(path), "dtype": torch.bfloat16})
        device = type("DeviceConfig", (), {"device": "cpu"})
        self.loader.load_model(model_config=config, device_config=device)

    def update_weights_from_disk(self, path) -> tuple[bool, str]:
        """What SGLang's `WeightUpdater.update_weights_from_disk` does with the loader (0.5.23):
        the iterator, the packing undone, the load and post-processing, and on an error the
        same again as its roll-back."""
        from sglang.srt.model_loader.loader import DefaultModelLoader

        device = torch.device("cpu")
        self.handed_over.clear()

        def weights():
            return self.loader._get_weights_iterator(
                DefaultModelLoader.Source(str(path), revision=None)
            )

        def load(iterator):
            DefaultModelLoader.restore_weights_before_loading(self.model, device)
            self.loader.load_weights_and_postprocess(self.model, iterator, device)

        try:
            iterator = weights()
        except Exception as error:
            return False, f"Failed to get weights iterator: {error}."
        try:
            load(iterator)
        except Exception as error:
            load(weights())
            return False, f"Failed to update weights: {error}.\nRolling back."
        return True, "Succeeded to update model weights."

    def experts(self) -> list[torch.nn.Module]:
        return self._experts


def reference(per_expert_path) -> list[torch.nn.Module]:
    """SGLang's own loading of the checkpoint's experts into fresh layers."""
    layers = []
    with fml.open(per_expert_path) as ckpt:
        for layer_id, group in enumerate(ckpt.moe_layers()):
            layer = build_sglang(group, layer_id, PLACEMENT)
            load_like_sglang(layer, {n: ckpt.tensor(n) for n in group.tensor_names}, E)
            layers.append(layer)
    return layers


def test_update_weights_from_disk_matches_sglang_loading(checkpoints) -> None:
    with sglang_ranks(PLACEMENT):
        served = Served(checkpoints["A", False], bf16_layers(checkpoints["A", True]))
        for ours, theirs in zip(served.experts(), reference(checkpoints["A", True]), strict=True):
            assert_same_state(ours, theirs, "served A")
        ok, message = served.update_weights_from_disk(checkpoints["B", False])
        assert ok, message
        for ours, theirs in zip(served.experts(), reference(checkpoints["B", True]), strict=True):
            assert_same_state(ours, theirs, "updated to B")
        with fml.open(checkpoints["B", False]) as ckpt:
            experts = {n for g in ckpt.moe_layers() for n in g.tensor_names}
            assert sorted(served.handed_over) == sorted(set(ckpt.keys()) - experts)


def test_update_refused_untouched_when_the_checkpoint_changes(
    checkpoints, tmp_path, monkeypatch
) -> None:
    """A shard rewritten between the update's start and its first write: the update fails
    (`FileChangedError` in its message), SGLang's roll-back changes nothing either, and the
    layers hold A's values; a later update of the complete checkpoint succeeds."""
    import shutil

    from fastmoe_load.engines import reload as reload_module

    target = tmp_path / "b"
    shutil.copytree(checkpoints["B", False], target)
    with sglang_ranks(PLACEMENT):
        served = Served(checkpoints["A", False], bf16_layers(checkpoints["A", True]))
        before = [
            {n: t.clone() for n, t in layer.state_dict().items()} for layer in served.experts()
        ]
        original = reload_module.CheckpointGuard.__init__

        def rewritten_after_open(self, ckpt):
            original(self, ckpt)
            shard = sorted(target.glob("*.safetensors"))[-1]
            data = bytearray(shard.read_bytes())
            data[-64:] = bytes(64)
            shard.write_bytes(bytes(data))

        with monkeypatch.context() as patched:
            patched.setattr(reload_module.CheckpointGuard, "__init__", rewritten_after_open)
            ok, message = served.update_weights_from_disk(target)
        assert not ok and "is being rewritten" in message, message
        for layer, was in zip(served.experts(), before, strict=True):
            for name, tensor in layer.state_dict().items():
                assert torch.equal(bits(tensor), bits(was[name])), name

        ok, message = served.update_weights_from_disk(checkpoints["B", False])
        assert ok, message
        for ours, theirs in zip(served.experts(), reference(checkpoints["B", True]), strict=True):
            assert_same_state(ours, theirs, "updated to B after a refused update")


def other_experts(a: Path, b: Path) -> Path:
    """Checkpoint B: A's files with every expert slot holding another expert's tensors (expert
    e's those of e + 1, fused tensors rolled along the expert dimension): the same scheme,
    names, dtypes and shapes, other values in each slot."""
    import re
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(a, b, ignore=shutil.ignore_patterns("*.safetensors*"))
    with fml.open(a) as ckpt:
        tensors = {name: ckpt.tensor(name).clone() for name in ckpt.keys()}
        for group in ckpt.moe_layers():
            n = group.num_experts
            for name in group.tensor_names:
                found = re.search(r"\.experts\.(\d+)\.", name)
                if found:
                    other = f".experts.{(int(found[1]) + 1) % n}."
                    tensors[name] = ckpt.tensor(name.replace(found[0], other, 1)).clone()
                else:
                    tensors[name] = tensors[name].roll(1, dims=0)
    save_file(tensors, b / "model.safetensors", metadata={"format": "pt"})
    return b


# What SGLang 0.5.23's post-processing of these layers needs (it runs after every load and
# update, `DefaultModelLoader.postprocess_weights`), which layers built on a CPU lack.
POSTPROCESSED_ON_GPUS_ONLY = {
    "int4": "CompressedTensorsWNA16MoE repacks for Marlin (a CUDA op, built with ninja)",
    "mxfp4": "Mxfp4MoEMethod's Marlin needs SM90+",
    "nvfp4": "ModelOptNvFp4FusedMoEMethod's processing calls CUDA",
}
QUANT_UPDATES = [
    pytest.param(
        scheme,
        marks=pytest.mark.skip(
            reason=f"{POSTPROCESSED_ON_GPUS_ONLY[scheme]}: SGLang cannot process it on a CPU"
        ),
    )
    if scheme in POSTPROCESSED_ON_GPUS_ONLY
    else scheme
    for scheme in sorted(QUANT_SCHEMES)
]


@pytest.mark.parametrize("scheme", QUANT_UPDATES)
def test_quantized_update_matches_sglang_loading(scheme, tmp_path) -> None:
    """Quantized experts (DeepSeek-V3 fp8 block scales, ModelOpt NVFP4, compressed-tensors
    int4, gpt-oss mxfp4) served by the fastmoe loader on SGLang's own quantized layers (TP
    rank 1 of 2) and updated from another checkpoint as SGLang's `WeightUpdater` does: the
    layers hold, every parameter as bytes, what SGLang's own loading of the new checkpoint
    writes, and the expert tensors never reach the model's `load_weights`."""
    a = quantized_checkpoint(scheme, tmp_path / "a")
    b = other_experts(a, tmp_path / "b")
    config = QUANT_PLACEMENTS["tp2-rank1"]

    def layers(path, sglang_loads: bool) -> dict[int, torch.nn.Module]:
        built = {}
        with fml.open(path) as ckpt:
            for group in ckpt.moe_layers():
                layer_id = int(group.prefix.split(".")[2])
                built[layer_id] = build_sglang_quantized(ckpt, group, layer_id, config)
                if sglang_loads:
                    load_quantized_like_sglang(built[layer_id], ckpt, group, group.tensor_names)
        return built

    with fml.open(a) as ckpt:
        logical = ckpt.moe_layers()[0].num_experts
    with sglang_ranks(config, logical):
        served = Served(a, layers(a, sglang_loads=False))
        as_a = layers(a, sglang_loads=True)
        for ours, theirs in zip(served.experts(), as_a.values(), strict=True):
            assert_quantized_state(ours, theirs, f"{scheme}: served A")
        ok, message = served.update_weights_from_disk(b)
        assert ok, message
        as_b = layers(b, sglang_loads=True)
        for ours, theirs, was in zip(served.experts(), as_b.values(), as_a.values(), strict=True):
            assert_quantized_state(ours, theirs, f"{scheme}: updated to B")
            weight = QUANT_SCHEMES[scheme][0]
            assert not torch.equal(bits(getattr(ours, weight)), bits(getattr(was, weight)))
    with fml.open(b) as ckpt:
        experts = {n for g in ckpt.moe_layers() for n in g.tensor_names}
        assert sorted(served.handed_over) == sorted(set(ckpt.keys()) - experts)
