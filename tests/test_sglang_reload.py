"""SGLang's in-place weight update (`update_weights_from_disk(model_path,
load_format=FastMoeModelLoader)`) through the fastmoe loader, on SGLang 0.5.23's own `FusedMoE`
layers built on the CPU (an SGLang engine does not run here, see `test_sglang.py`): served
from checkpoint A, updated from checkpoint B in the order SGLang's `WeightUpdater` calls the
loader, the layers must hold what SGLang's own loading of B writes, bit for bit; a checkpoint
rewritten before the first write is refused with the served weights intact, SGLang's roll-back
included. Skipped where SGLang is not installed."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sglang.srt.layers.moe.fused_moe_triton.layer")

import fastmoe_load as fml
from conftest import bits, build_model
from test_sglang import (
    PLACEMENTS,
    E,
    assert_same_state,
    build_sglang,
    load_like_sglang,
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


class Served:
    """A model of SGLang `FusedMoE` layers served from a checkpoint by the fastmoe loader."""

    def __init__(self, path, per_expert_path) -> None:
        from fastmoe_load.engines.sglang_loader import FastMoeModelLoader
        from sglang.srt.configs.load_config import LoadConfig

        self.loader = FastMoeModelLoader(LoadConfig(load_format=FastMoeModelLoader))
        self.model = torch.nn.Module()
        self.model.model = torch.nn.Module()
        self.model.model.layers = torch.nn.ModuleList()
        with fml.open(per_expert_path) as ckpt:
            for layer_id, group in enumerate(ckpt.moe_layers()):
                block = torch.nn.Module()
                block.mlp = torch.nn.Module()
                block.mlp.experts = build_sglang(group, layer_id, PLACEMENT)
                self.model.model.layers.append(block)
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
        return [block.mlp.experts for block in self.model.model.layers]


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
        served = Served(checkpoints["A", False], checkpoints["A", True])
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
        served = Served(checkpoints["A", False], checkpoints["A", True])
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
