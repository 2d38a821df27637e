"""An SGLang model loader: routed experts go straight from the checkpoint into SGLang's
`FusedMoE` parameters (each rank reads only its TP slice and its own experts, fused or
per-expert files alike); every other tensor goes through the model's own `load_weights`, as
with SGLang's default loader, whose weight loaders narrow and place it while fastmoe_load
makes their copies from the checkpoint (`direct_copies.DirectCopies`).

Turning it on. SGLang takes a loader class as `load_format` (its `get_model_loader` builds
`load_format(load_config)` for any class it is given); the class pickles by name, so it
reaches SGLang's scheduler processes too:

    import sglang
    from fastmoe_load.engines.sglang_loader import FastMoeModelLoader
    engine = sglang.Engine(model_path="path/or/repo", load_format=FastMoeModelLoader)

(`--load-format` on SGLang's command line takes only its own names.)
`model_loader_extra_config` may carry `num_threads`, `io` and `prefetch`, passed to
`fastmoe_load.open`.

Reloading. `Engine.update_weights_from_disk(model_path, load_format=FastMoeModelLoader)`
(SGLang's in-place weight update, as RL frameworks call it after each training step) builds
this loader for the new path, asks it for `_get_weights_iterator` (here: the checkpoint is
opened and its files' state recorded, so that an unreadable checkpoint is refused with the
served weights untouched), undoes the quantization methods' packing
(`restore_weights_before_loading`), and calls `load_weights_and_postprocess`: here the
expert layers are filled by fastmoe_load, every other tensor goes to the model's
`load_weights`, then SGLang's post-load processing runs, as at start-up. A checkpoint found
changed before the first write is refused (`FileChangedError`) with nothing written, and the
roll-back SGLang then attempts (the same load again) keeps the served weights instead of
reading the changed files; a change found later is refused too, and SGLang's roll-back
loads the path again.

What it relies on in SGLang (0.5.23): `DefaultModelLoader.initialize_model_for_startup`
(builds the model on the target device), `load_weights_only` (the model's `load_weights`,
after SGLang's renaming of the checkpoint's names) and `postprocess_weights` (each
quantization method's `process_weights_after_loading`), the two halves of its
`load_weights_and_postprocess`;
`get_global_expert_location_metadata()`; `weight_utils.download_weights_from_hf`;
`model_config.model_path`, `.revision`, `.dtype`; `load_config.download_dir`,
`.ignore_patterns`, `.model_loader_extra_config`; and, for the expert layers, what
`fastmoe_load.engines.sglang` lists.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from sglang.srt.configs.device_config import DeviceConfig
from sglang.srt.configs.load_config import LoadConfig
from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.eplb.expert_location import get_global_expert_location_metadata
from sglang.srt.model_loader.loader import DefaultModelLoader
from sglang.srt.model_loader.utils import set_default_torch_dtype
from sglang.srt.model_loader.weight_utils import download_weights_from_hf

from .._fastmoe_load import RequestError
from .._validate import local_checkpoint, open_options
from ..checkpoint import Checkpoint
from ..checkpoint import open as open_checkpoint
from ..direct_copies import DirectCopies
from .reload import CheckpointGuard
from .sglang import fill_expert_layers

logger = logging.getLogger("fastmoe_load")


class FastMoeModelLoader(DefaultModelLoader):
    """Loads a safetensors checkpoint: routed experts through `fastmoe_load`, the rest
    through the model's own `load_weights`."""

    def __init__(self, load_config: LoadConfig) -> None:
        # DefaultModelLoader.__init__ checks the extra config against its own options.
        self.load_config = load_config
        self.open_options: dict[str, Any] = open_options(
            load_config.model_loader_extra_config, type(self).__name__
        )
        # The checkpoint of a pending in-place update, between `_get_weights_iterator` and
        # `load_weights_and_postprocess`; and whether the last update was refused before
        # writing anything (SGLang's roll-back then reloads: the served weights stay).
        self._update: tuple[Checkpoint, CheckpointGuard] | None = None
        self._refused_untouched = False

    def checkpoint_dir(self, model_config: ModelConfig) -> str:
        """The local checkpoint directory, downloaded first for a Hub model id."""
        return local_checkpoint(
            model_config.model_path,
            model_config,
            self.load_config,
            download_weights_from_hf,
        )

    def download_model(self, model_config: ModelConfig) -> None:
        self.checkpoint_dir(model_config)

    def load_model(
        self, *, model_config: ModelConfig, device_config: DeviceConfig
    ) -> torch.nn.Module:
        path = self.checkpoint_dir(model_config)
        model = self.initialize_model_for_startup(
            model_config=model_config, device_config=device_config
        )
        if getattr(model, "secondary_weights", ()):
            raise RequestError(
                f"{type(model).__name__} loads weights from several sources "
                f"(secondary_weights); {type(self).__name__} reads one checkpoint"
            )
        with open_checkpoint(path, **self.open_options) as ckpt:
            start = time.perf_counter()
            consumed = fill_expert_layers(model, ckpt, get_global_expert_location_metadata())
            experts_done = time.perf_counter()
            remaining = [name for name in ckpt.keys() if name not in consumed]
            with set_default_torch_dtype(model_config.dtype):
                load_weights_and_postprocess(
                    model, ckpt, remaining, torch.device(device_config.device)
                )
        self.counter_after_loading_weights = time.perf_counter()
        logger.info(
            "%s: experts filled in %.2f s, %d other tensors loaded by %s in %.2f s",
            path,
            experts_done - start,
            len(remaining),
            type(model).__name__,
            self.counter_after_loading_weights - experts_done,
        )
        return model.eval()

    def _get_weights_iterator(self, source: Any, **_: Any) -> Iterator[tuple[str, torch.Tensor]]:
        """For SGLang's `update_weights_from_disk`: opens the checkpoint at
        `source.model_or_path` and records the state of its files; the weights themselves
        are read by `load_weights_and_postprocess`. Raises (`CheckpointError`, ...) with the
        served model untouched."""
        if self._update is not None:
            self._update[0].close()
            self._update = None
        if self._refused_untouched:  # SGLang's roll-back of an update refused untouched
            return iter(())
        path = local_checkpoint(
            source.model_or_path, source, self.load_config, download_weights_from_hf
        )
        ckpt = open_checkpoint(path, **self.open_options)
        try:
            self._update = (ckpt, CheckpointGuard(ckpt))
        except BaseException:
            ckpt.close()
            raise
        return iter(())

    def load_weights_and_postprocess(
        self, model: torch.nn.Module, weights: Any, target_device: torch.device
    ) -> None:
        """For SGLang's `update_weights_from_disk`, after `_get_weights_iterator`: fills the
        expert layers from the checkpoint opened there, hands every other tensor to the
        model's `load_weights`, then runs SGLang's post-load processing. The files are checked
        before the first write, after the experts and before each other tensor; a change
        raises `FileChangedError`."""
        if self._refused_untouched:
            # SGLang's roll-back: nothing was written, only the packing undone; redo it.
            self._refused_untouched = False
            DefaultModelLoader.postprocess_weights(model, target_device)
            return
        if self._update is None:  # not an update through `_get_weights_iterator`
            DefaultModelLoader.load_weights_and_postprocess(model, weights, target_device)
            return
        (ckpt, guard), self._update = self._update, None
        with ckpt:
            try:
                guard.check("before the update wrote into the model")
            except BaseException:
                # Nothing written: redo the packing SGLang undid, and have its roll-back
                # (which undoes it again, then loads through this loader) keep the weights.
                DefaultModelLoader.postprocess_weights(model, target_device)
                self._refused_untouched = True
                raise
            start = time.perf_counter()
            consumed = fill_expert_layers(model, ckpt, get_global_expert_location_metadata())
            guard.check("while the update read it")
            experts_done = time.perf_counter()
            remaining = [name for name in ckpt.keys() if name not in consumed]

            load_weights_and_postprocess(
                model,
                ckpt,
                remaining,
                target_device,
                check=lambda name: guard.check_tensor(name, "while the update read it"),
            )
            guard.check("while the update read it")
        logger.info(
            "%s: update: experts filled in %.2f s, %d other tensors loaded by %s in %.2f s",
            ckpt.path,
            experts_done - start,
            len(remaining),
            type(model).__name__,
            time.perf_counter() - experts_done,
        )


def load_weights_and_postprocess(
    model: torch.nn.Module,
    ckpt: Checkpoint,
    names: list[str],
    target_device: torch.device,
    check: Callable[[str], None] = lambda name: None,
) -> None:
    """SGLang's `DefaultModelLoader.load_weights_and_postprocess` of checkpoint tensors
    `names`, with the copies the model's weight loaders make from them made by fastmoe_load
    (`DirectCopies`); `check(name)` runs before each tensor is handed on."""

    def views(copies: DirectCopies) -> Iterator[tuple[str, torch.Tensor]]:
        for name, view in copies.views(names):
            check(name)
            yield name, view

    with DirectCopies(ckpt, target_device) as copies:
        DefaultModelLoader.load_weights_only(model, views(copies), target_device)
    DefaultModelLoader.postprocess_weights(model, target_device)
