"""A vLLM model loader, `load_format="fastmoe"`: routed experts go straight from the
checkpoint into vLLM's expert parameters (each rank reads only its TP slice and its own
experts, fused or per-expert files alike); every other tensor goes through the model's own
`load_weights`, as with vLLM's default loader, whose weight loaders narrow and place it while
fastmoe_load makes their copies from the checkpoint (`direct_copies.DirectCopies`: only the
rank's bytes read, through the staging pipeline on a GPU).

Turning it on. In the process that builds the model:

    from fastmoe_load.engines.vllm_loader import register
    register()
    llm = vllm.LLM(model="path/or/repo", load_format="fastmoe")

vLLM loads the model in its engine-core and worker processes, which may be started fresh
(spawned) and then know nothing of a `register()` call made in the parent. vLLM runs the
functions of the `vllm.general_plugins` entry-point group in every one of its processes, so
an installed package declares, in `pyproject.toml`:

    [project.entry-points."vllm.general_plugins"]
    fastmoe_load = "fastmoe_load.engines.vllm_loader:register"

after which `--load-format fastmoe` works from the command line too (`VLLM_PLUGINS`, if set,
must name `fastmoe_load`). `model_loader_extra_config` may carry `num_threads`, `io` and
`prefetch`, passed to `fastmoe_load.open`, and vLLM's own `enable_weights_track`: true proves
after the load that every parameter of the rank was written exactly once, by fastmoe_load or
by the model's `load_weights` (quantized models too; vLLM checks only unquantized ones by
default, and so does this loader), naming anything written twice or left as allocated.

Reloading in place (RL weight refit, vLLM's `reload_weights`): `get_all_weights` hands the
reload to `engines.vllm_reload`, whose `reload(llm, path)` is importable from here too.

What it relies on in vLLM (0.33):

- `register_model_loader(load_format)` and `BaseModelLoader`, whose `load_model` builds the
  model on the target device, calls `load_weights(model, model_config)`, then runs
  `process_weights_after_loading`;
- an expert layer is a module whose own parameters include `w13_weight` and `w2_weight`, or
  `w13_weight_packed` and `w2_weight_packed`, or `w13_qweight` and `w2_qweight` (GPTQ and
  AWQ; `RoutedExperts`, or `FusedMoE` before 0.33),
  with `moe_config.is_act_and_mul` true and, as its `quant_method`,
  `UnquantizedFusedMoEMethod` (unquantized checkpoints) or one of the quantized methods in
  `engines.vllm.QUANTIZED_METHODS` (fp8, NVFP4, int4, gpt-oss mxfp4) without a refined or
  padded scale grid (quantized checkpoints: their scales go into `w13_{kind}`/`w2_{kind}`),
  split by TP on the checkpoint's packs and scale blocks, and padded only as vLLM's gpt-oss
  mxfp4 layers are (`GptOssRoutedExperts`, values in the parameters' corner); inside a
  `MoERunner` it is the runner's `routed_experts`, and checkpoint names address the runner.
  `fastmoe_load.engines.vllm` lists what is read from the layer itself, and
  `ExpertLayerSpec.unfillable` decides, saying why in the log for each layer left to vLLM;
- `model.hf_to_vllm_mapper` (optional), a `WeightsMapper` whose `map_name` turns a
  checkpoint name into the model's name, or None for a dropped weight;
- `model.load_weights(iterable of (name, tensor))`, returning the names of the parameters
  it loaded, or None where the model does not track them;
- `DefaultModelLoader.track_weights_loading(model, loaded, quantized)`: the completeness
  check, reused as is so that this loader accepts exactly the models vLLM's does;
- `model_config.model`, `.revision`, `.quantization`; `load_config.download_dir`,
  `.ignore_patterns`, `.model_loader_extra_config`; `weight_utils.download_weights_from_hf`.

Parameters of another dtype than the checkpoint's (a float32 model from a bfloat16
checkpoint, float32 scales from bfloat16 ones) are converted as vLLM's loader converts them.
Expert layers this loader does not fill (other quantization methods) and checkpoint expert
groups that map to no layer are left to the model's `load_weights`, so they load exactly as
vLLM loads them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import torch
from vllm.config import ModelConfig
from vllm.config.load import LoadConfig
from vllm.model_executor.model_loader import (
    BaseModelLoader,
    DefaultModelLoader,
    register_model_loader,
)
from vllm.model_executor.model_loader.weight_utils import download_weights_from_hf

from .._fastmoe_load import LayoutError, RequestError, TensorNotFoundError
from .._validate import local_checkpoint, open_options
from ..checkpoint import Checkpoint
from ..checkpoint import open as open_checkpoint
from ..direct_copies import DirectCopies
from .spec import fill_layers, log_left_to_engine
from .vllm import WEIGHT_PARAMETERS, describe
from .vllm_model import expert_layers, model_path_of
from .vllm_reload import KEEP_PREVIOUS_OPTION, reload_iterator
from .vllm_reload import reload as reload  # re-exported: the README's import

LOAD_FORMAT = "fastmoe"
# vLLM's own switch of its completeness check in `model_loader_extra_config`, honoured the
# same way: on, every parameter must be written exactly once, by fastmoe_load or by the
# model's `load_weights`; off, never checked; unset, checked where vLLM's loader checks.
TRACK_OPTION = "enable_weights_track"
_registered = False


def register() -> None:
    """Makes `load_format="fastmoe"` available to vLLM in this process; vLLM may call it
    more than once per process, which is harmless."""
    global _registered
    if not _registered:
        register_model_loader(LOAD_FORMAT)(FastMoeModelLoader)
        _registered = True


class FastMoeModelLoader(BaseModelLoader):
    """Loads a safetensors checkpoint: routed experts through `fastmoe_load`, the rest
    through the model's own `load_weights`."""

    def __init__(self, load_config: LoadConfig) -> None:
        super().__init__(load_config)
        options = open_options(
            load_config.model_loader_extra_config,
            f"load_format={LOAD_FORMAT!r}",
            (TRACK_OPTION, KEEP_PREVIOUS_OPTION),
        )
        self.enable_weights_track: bool | None = options.pop(TRACK_OPTION, None)
        self.keep_previous: bool = options.pop(KEEP_PREVIOUS_OPTION, False)
        for option, value in (
            (TRACK_OPTION, self.enable_weights_track),
            (KEEP_PREVIOUS_OPTION, self.keep_previous),
        ):
            if value not in (None, True, False):
                raise RequestError(
                    f"model_loader_extra_config {option} must be true or false, not {value!r}"
                )
        self.open_options: dict[str, Any] = options

    def checkpoint_dir(self, model_config: ModelConfig) -> str:
        """The local checkpoint directory, downloaded first for a Hub model id."""
        return local_checkpoint(
            model_config.model, model_config, self.load_config, download_weights_from_hf
        )

    def download_model(self, model_config: ModelConfig) -> None:
        self.checkpoint_dir(model_config)

    def load_weights(self, model: torch.nn.Module, model_config: ModelConfig) -> None:
        if getattr(model, "secondary_weights", ()):
            raise RequestError(
                f"{type(model).__name__} loads weights from several sources "
                f"(secondary_weights); load_format={LOAD_FORMAT!r} reads one checkpoint"
            )
        path = self.checkpoint_dir(model_config)
        with open_checkpoint(path, **self.open_options) as ckpt:
            start = time.perf_counter()
            filled, consumed = fill_expert_layers(model, ckpt)
            layers = sum(
                name.endswith(tuple(f".{w13}" for w13, _ in WEIGHT_PARAMETERS)) for name in filled
            )
            experts_done = time.perf_counter()
            remaining = [name for name in ckpt.keys() if name not in consumed]
            with DirectCopies(ckpt, next(model.parameters()).device) as copies:
                loaded = model.load_weights(copies.views(remaining))
        # Through vLLM's logger, which vLLM shows by default (it configures no other), worded
        # like its own loader's line, so that it is found where vLLM users look.
        expert_bytes = sum(model.get_parameter(name).nbytes for name in filled)
        logging.getLogger("vllm.fastmoe_load").info(
            "Loading weights took %.2f seconds (%s): fastmoe_load filled %d expert layers, "
            "%.3f GB in %.2f s (%.2f GB/s); %s.load_weights loaded %d other tensors in %.2f s, "
            "%d of its copies (%.3f GB) made by fastmoe_load",
            time.perf_counter() - start,
            path,
            layers,
            expert_bytes / 1e9,
            experts_done - start,
            expert_bytes / 1e9 / max(experts_done - start, 1e-9),
            type(model).__name__,
            len(remaining),
            time.perf_counter() - experts_done,
            copies.copies_made,
            copies.copied_bytes / 1e9,
        )
        quantized = model_config.quantization is not None
        track = self.enable_weights_track
        if track is None:  # by default where vLLM's own loader tracks
            track = not quantized and loaded is not None
        if track:
            if loaded is None:
                raise RequestError(
                    f"{TRACK_OPTION}: {type(model).__name__}.load_weights does not report what "
                    "it loaded, so nothing can prove that every parameter was written"
                )
            check_all_loaded(model, set(loaded), filled, path, quantized)

    def get_all_weights(
        self, model_config: ModelConfig, model: torch.nn.Module
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint's tensors by name, for vLLM's in-place reload (`reload_weights`,
        from the served path or a new `weights_path`) and its expert redistribution from disk
        (0.34's recovery after an EP rank died), which hand them to the model's
        `load_weights`. Within vLLM's layerwise reload, the expert
        layers fastmoe_load fills are filled and processed (see `reload_iterator`) and their
        tensors are not yielded. The checkpoint is opened and checked here, before vLLM
        touches the model: an unreadable one raises (`CheckpointError`, ...) with the served
        weights untouched."""
        return reload_iterator(
            model,
            self.checkpoint_dir(model_config),
            self.open_options,
            keep_previous=self.keep_previous,
        )


def fill_expert_layers(model: torch.nn.Module, ckpt: Checkpoint) -> tuple[set[str], set[str]]:
    """Fills every expert layer that a checkpoint group maps to and that fastmoe_load fills
    exactly as vLLM would (`ExpertLayerSpec.unfillable`), all through one staging pipeline
    and all checked before the first byte is written (`fill_layers`); returns the parameter
    names filled and the checkpoint tensor names consumed. The others are logged, each with
    why, and left to the model's `load_weights`."""
    layers = expert_layers(model)
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    claimed: dict[str, str] = {}
    filled: set[str] = set()
    specs = []
    left_to_model: list[str] = []
    for group in ckpt.moe_layers():
        path = model_path_of(group, mapper, layers)
        if path is None:
            left_to_model.append(f"`{group.prefix}`: maps to no expert layer of this rank")
            continue
        if path in claimed:
            raise LayoutError(
                f"{ckpt.path}: experts at `{claimed[path]}` and at `{group.prefix}` both "
                f"map to {type(model).__name__}'s `{path}`"
            )
        claimed[path] = group.prefix
        module_path, module = layers[path]
        spec = describe(module, ckpt, group.prefix)
        reason = spec.unfillable()
        if reason is not None:
            left_to_model.append(f"`{group.prefix}`: {reason}")
            continue
        specs.append(spec)
        filled.update(f"{module_path}.{name}" for name in spec.filled)
    consumed = set(fill_layers(ckpt, specs))
    log_left_to_engine(ckpt, model, left_to_model)
    return filled, consumed


def check_all_loaded(
    model: torch.nn.Module, loaded: set[str], filled: set[str], path: str, quantized: bool
) -> None:
    """Proves that every parameter of `model` was written exactly once: by fastmoe_load
    (`filled`) or by the model's own `load_weights` (`loaded`), never by both, and none left
    as allocated except those vLLM's own check exempts (`track_weights_loading`: online
    quantization, KV-cache scales, parameters built from the config). Raises `LayoutError`
    naming what was written twice and `TensorNotFoundError` naming what was not written."""
    twice = sorted(loaded & filled)
    if twice:
        raise LayoutError(
            f"{path}: {len(twice)} parameter(s) of {type(model).__name__} written both by "
            f"fastmoe_load and by its load_weights: {', '.join(twice)}"
        )
    covered = loaded | filled  # vLLM adds the parameters it exempts from the check
    try:
        check = DefaultModelLoader(LoadConfig()).track_weights_loading
        # Before 0.33 the check took no `quantized`: pass it only where it says something.
        if quantized:
            check(model, covered, quantized=True)
        else:
            check(model, covered)
    except ValueError:
        missing = sorted(name for name, _ in model.named_parameters() if name not in covered)
        raise TensorNotFoundError(
            f"{path}: the checkpoint initialises no value for {len(missing)} parameter(s) "
            f"of {type(model).__name__}: {', '.join(missing)}"
        ) from None
