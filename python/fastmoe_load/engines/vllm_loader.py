"""A vLLM model loader, `load_format="fastmoe"`: routed experts go straight from the
checkpoint into vLLM's expert parameters (each rank reads only its TP slice and its own
experts, fused or per-expert files alike); every other tensor goes through the model's own
`load_weights`, as with vLLM's default loader.

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

Reloading (RL weight refit). vLLM's in-place reload, `reload_weights` (a worker method, so
`llm.collective_rpc("reload_weights", kwargs={"weights_path": path})`, or `reload(llm, path)`
here), asks this loader for `get_all_weights`: inside vLLM's layerwise reload the expert
layers are filled by fastmoe_load and processed by vLLM into their served layout as at
start-up, every other tensor goes through the model's `load_weights`; a checkpoint being
rewritten is refused (see `reload_iterator`). `model_loader_extra_config`
`reload_keep_previous: true` keeps a host copy of the served weights during each reload, to
put back should a change be found after the reload began writing. vLLM's expert
redistribution (0.34) and `VLLM_RELOAD_MODE=direct` get every tensor through the model's
`load_weights`, as from vLLM's default loader.

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

import contextlib
import importlib
import itertools
import logging
import os
import time
from collections.abc import Iterator
from types import SimpleNamespace
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
from ..checkpoint import Checkpoint, MoeLayer
from ..checkpoint import open as open_checkpoint
from ..loader import stream_tensors
from .reload import CheckpointGuard, HostBackup, ReloadStats
from .spec import ExpertLayerSpec, fill_layer, fill_layers, log_left_to_engine
from .vllm import WEIGHT_PARAMETERS, describe

logger = logging.getLogger("fastmoe_load")

LOAD_FORMAT = "fastmoe"
# vLLM's own switch of its completeness check in `model_loader_extra_config`, honoured the
# same way: on, every parameter must be written exactly once, by fastmoe_load or by the
# model's `load_weights`; off, never checked; unset, checked where vLLM's loader checks.
TRACK_OPTION = "enable_weights_track"
# Keep a host copy of the served weights during each reload, so that a checkpoint found
# rewritten after the reload began writing is refused with the previous weights put back.
KEEP_PREVIOUS_OPTION = "reload_keep_previous"
_registered = False
# The last reload of this process (this rank), for benchmarks and RL frameworks' logs.
last_reload: ReloadStats | None = None


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
            dense = stream_tensors(ckpt, remaining, dense_device(model))
            loaded = model.load_weights(dense)
        # Through vLLM's logger, which vLLM shows by default (it configures no other), worded
        # like its own loader's line, so that it is found where vLLM users look.
        expert_bytes = sum(model.get_parameter(name).nbytes for name in filled)
        logging.getLogger("vllm.fastmoe_load").info(
            "Loading weights took %.2f seconds (%s): fastmoe_load filled %d expert layers, "
            "%.3f GB in %.2f s (%.2f GB/s); %s.load_weights loaded %d other tensors in %.2f s",
            time.perf_counter() - start,
            path,
            layers,
            expert_bytes / 1e9,
            experts_done - start,
            expert_bytes / 1e9 / max(experts_done - start, 1e-9),
            type(model).__name__,
            len(remaining),
            time.perf_counter() - experts_done,
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
        from the served path or a new `weights_path`) and its expert redistribution, which
        hand them to the model's `load_weights`. Within vLLM's layerwise reload, the expert
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


def dense_device(model: torch.nn.Module) -> torch.device:
    """Where the dense tensors go before the model's `load_weights` sees them: its GPU
    through the staging pipeline, where each rank keeps whole tensors (no tensor
    parallelism: a TP rank's own weight loaders narrow a CPU view to its slice and copy only
    that); the zero-copy CPU views otherwise."""
    from vllm.distributed import get_tensor_model_parallel_world_size

    device = next(model.parameters()).device
    if device.type == "cuda" and get_tensor_model_parallel_world_size() == 1:
        return device
    return torch.device("cpu")


def expert_layers(model: torch.nn.Module) -> dict[str, tuple[str, torch.nn.Module]]:
    """Expert layers by the model path their checkpoint names map under, with the path of
    the module that holds their parameters."""
    layers = {}
    for name, module in model.named_modules():
        params = module._parameters.keys()
        if any({w13, w2} <= params for w13, w2 in WEIGHT_PARAMETERS):
            addressed = name.removesuffix(".routed_experts")
            layers[addressed] = (name, module)
    return layers


def model_path_of(group: MoeLayer, mapper: Any, layers: dict[str, Any]) -> str | None:
    """The expert layer path every tensor of `group` maps under, if there is one."""
    mapped = [name if mapper is None else mapper.map_name(name) for name in group.tensor_names]
    if not mapped or None in mapped:
        return None
    parts = mapped[0].split(".")
    for end in range(len(parts) - 1, 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in layers:
            inside = candidate + "."
            return candidate if all(name.startswith(inside) for name in mapped) else None
    return None


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


# ---------------------------------------------------------------------------------------------
# Reloading into a served model.
#
# vLLM's in-place reload (`model_loader/reload`: `reload_weights` in `inplace.py`) first asks
# the loader for `get_all_weights`, then puts every module back in checkpoint format on the
# meta device (`initialize_layerwise_reload`: the served tensors are kept aside as the layer's
# `kernel_tensors`), and passes the weights to the model's `load_weights`; each layer is
# materialised, loaded, processed by its quantization method exactly as at start-up and copied
# into the served tensors (`_layerwise_process`) once all its values arrived, the rest at
# `finalize_layerwise_reload`. The iterator below runs inside `load_weights`, so when it is
# first asked for a tensor every layer is already back in checkpoint format: it fills the
# expert layers there (materialised as vLLM materialises them, then filled by fastmoe_load,
# then handed to vLLM's own `_layerwise_process`) and yields only the other tensors.
# ---------------------------------------------------------------------------------------------


def _layerwise() -> Any:
    """vLLM's layerwise reload functions, or the reason they cannot be used."""
    try:
        from vllm.model_executor.model_loader.reload import layerwise, meta, utils

        return SimpleNamespace(
            infos=layerwise.LAYERWISE_INFO,
            info=layerwise.get_layerwise_info,
            process=layerwise._layerwise_process,
            place_kernel_tensors=layerwise._place_kernel_tensors,
            original_loader=layerwise._get_original_loader,
            materialize=meta.materialize_layer,
            layer_tensors=utils.get_layer_tensors,
            load_numel=utils.get_tensor_load_numel,
            module=layerwise,
        )
    except (ImportError, AttributeError) as error:
        return f"this vLLM has no layerwise reload that fastmoe_load knows ({error})"


def _in_whole_reload(model: torch.nn.Module, vllm: Any) -> str | None:
    """Why the model is not inside a whole-model layerwise reload, or None if it is."""
    if isinstance(vllm, str):
        return vllm
    info = vllm.infos.get(model)
    if info is None or not info.can_load():
        return (
            "the model is not inside vLLM's whole-model layerwise reload (expert "
            "redistribution, VLLM_RELOAD_MODE=direct, or no reload)"
        )
    return None


def _not_in_checkpoint_format(
    module: torch.nn.Module, spec: ExpertLayerSpec, vllm: Any
) -> str | None:
    """Why vLLM's reload has not put this expert layer back in checkpoint format for
    fastmoe_load to fill, or None."""
    info = vllm.infos.get(module)
    if info is None or not info.can_load() or info.kernel_tensors is None:
        return "vLLM's reload did not restore this layer to checkpoint format"
    if not all(t.is_meta for t in spec.parameters.values()):
        return "vLLM's reload kept this layer's tensors in their served layout"
    return None


def reload_iterator(
    model: torch.nn.Module,
    path: str,
    open_options: dict[str, Any],
    *,
    keep_previous: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """The weights iterator of one reload of `model` from the checkpoint at `path`.

    Opens the checkpoint now (errors raise with the model untouched) and records the state of
    its files (`CheckpointGuard`); with `keep_previous`, copies every parameter and buffer
    to host memory first (`HostBackup`). When first asked for a tensor, inside vLLM's
    whole-model layerwise reload:

    1. every checkpoint expert group is matched to its layer and described while the layer
       is back in checkpoint format (meta tensors); a layer fastmoe_load cannot fill as
       vLLM's `weight_loader` fills it (`ExpertLayerSpec.unfillable`), or that vLLM's
       reload did not restore, is left to the model's `load_weights` and logged with why;
    2. each remaining layer is materialised (zeroed, as vLLM's reload does), filled by
       `fill_layer`, the files checked, and processed by vLLM (`_layerwise_process`: the
       quantization method's `process_weights_after_loading`, then the copy into the served
       tensors), so the served layout is rebuilt exactly as at start-up;
    3. every other tensor is yielded, zero-copy, to the model's `load_weights`.

    The files are checked before the first layer is copied into the served tensors: a file
    changed by then raises `FileChangedError` with every served tensor as it was (the layers
    are put back). They are checked again before each further expert layer and after the
    last tensor was read; a change found once writing began raises `FileChangedError` too,
    with the previous weights restored where `keep_previous` kept them, else naming how
    many layers already hold new values. Outside a whole-model layerwise reload (expert
    redistribution, `VLLM_RELOAD_MODE=direct`) every tensor is yielded, as vLLM's default
    loader yields them, and the log says so.

    The model's next `load_weights` call also reports the parameters fastmoe_load filled,
    so that vLLM's reload does not warn of them as not loaded.
    """
    ckpt = open_checkpoint(path, **open_options)
    try:
        guard = CheckpointGuard(ckpt)
        backup = (
            HostBackup(itertools.chain(model.parameters(), model.buffers()))
            if keep_previous
            else None
        )
    except BaseException:
        ckpt.close()
        raise
    filled: set[str] = set()
    _report_filled(model, filled)
    return _reload(model, ckpt, guard, backup, filled)


def _report_filled(model: torch.nn.Module, filled: set[str]) -> None:
    """Has the model's next `load_weights` call return `filled` besides what it loaded."""
    previous = vars(model).get("load_weights")
    if getattr(previous, "fastmoe_reload", False):  # of a reload that never ran
        previous = previous.previous
    call = previous if previous is not None else type(model).load_weights.__get__(model)

    def load_weights(weights: Any) -> Any:
        if previous is None:
            del model.load_weights
        else:
            model.load_weights = previous
        loaded = call(weights)
        return None if loaded is None else set(loaded) | filled

    load_weights.fastmoe_reload = True  # type: ignore[attr-defined]
    load_weights.previous = previous  # type: ignore[attr-defined]
    model.load_weights = load_weights


def _reload(
    model: torch.nn.Module,
    ckpt: Checkpoint,
    guard: CheckpointGuard,
    backup: HostBackup | None,
    filled: set[str],
) -> Iterator[tuple[str, torch.Tensor]]:
    vllm = _layerwise()
    reloading = [] if isinstance(vllm, str) else [m for m in model.modules() if _loading(vllm, m)]
    with ckpt:
        try:
            yield from _reload_tensors(model, ckpt, guard, filled, vllm)
        except BaseException as error:
            if isinstance(vllm, str) or not reloading:
                raise
            rewritten = _abandon(model, reloading, vllm)
            if backup is not None:
                backup.restore()
                state = "the previous weights were restored from the host copy"
            elif rewritten == 0:
                state = "the previous weights are intact"
            else:
                state = (
                    f"{rewritten} layer(s) already hold new values, the others the previous "
                    f"ones: reload again (model_loader_extra_config "
                    f"{KEEP_PREVIOUS_OPTION}: true would have restored them)"
                )
            if not isinstance(error, GeneratorExit):
                logger.error("%s: reload refused (%s); %s", ckpt.path, error, state)
            raise


def _loading(vllm: Any, module: torch.nn.Module) -> bool:
    info = vllm.infos.get(module)
    return info is not None and info.can_load()


def _abandon(model: torch.nn.Module, reloading: list[torch.nn.Module], vllm: Any) -> int:
    """Ends vLLM's layerwise reload without processing: every layer still in checkpoint
    format gets its served tensors back (unwritten); returns how many layers the reload had
    already processed into their served tensors."""
    rewritten = 0
    for module in reloading:
        info = vllm.infos.get(module)
        if info is None or not info.can_load():
            rewritten += 1
            continue
        if info.kernel_tensors is not None:
            for tensor in vllm.layer_tensors(module).values():
                if hasattr(tensor, "weight_loader"):
                    tensor.weight_loader = vllm.original_loader(tensor)
            vllm.place_kernel_tensors(module, info)
        info.reset()
    if hasattr(model, "_original_do_torchao_reload"):
        model._do_torchao_reload = model._original_do_torchao_reload
    lifecycle = getattr(vllm.module, "__package__", None)
    if lifecycle is not None:
        try:
            importlib.import_module(f"{lifecycle}.lifecycle")._weight_update_active = False
        except ImportError:  # before 0.34 no such flag
            pass
    return rewritten


def _synchronize(spec: ExpertLayerSpec) -> None:
    """Waits for the fill's copies to a GPU, so that its time is the fill's own."""
    device = next(iter(spec.parameters.values())).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _as_at_start_up(module: torch.nn.Module) -> Iterator[None]:
    """Has the layer's processing during a reload end as at start-up.

    vLLM's unquantized MoE method (0.32-0.34) runs its kernel's own last step
    (`fused_experts.process_weights_after_loading`: the CPU kernel's prepacking into its
    grouped-GEMM layout) only when it builds the kernel, at start-up; a weight update skips
    it and would leave the checkpoint's layout where the kernel reads its own (vLLM's own
    reload does). Where the kernel has such a step, it runs here after the method's
    processing, on the layer being processed, as at start-up."""
    method = getattr(module, "quant_method", None)
    kernel = getattr(method, "moe_kernel", None)
    experts = getattr(kernel, "fused_experts", None)
    step = getattr(type(experts), "process_weights_after_loading", None)
    base = next(
        (
            c.__dict__["process_weights_after_loading"]
            for c in reversed(type(experts).__mro__)
            if "process_weights_after_loading" in c.__dict__
        ),
        None,
    )
    if not _unquantized_method(method) or step is None or step is base:
        yield
        return
    processing = method.process_weights_after_loading

    def then_the_kernels_step(layer: torch.nn.Module) -> None:
        processing(layer)
        experts.process_weights_after_loading(layer)

    method.process_weights_after_loading = then_the_kernels_step
    try:
        yield
    finally:
        del method.process_weights_after_loading


def _unquantized_method(method: Any) -> bool:
    return any(c.__name__ == "UnquantizedFusedMoEMethod" for c in type(method).__mro__)


def _reload_tensors(
    model: torch.nn.Module,
    ckpt: Checkpoint,
    guard: CheckpointGuard,
    filled: set[str],
    vllm: Any,
) -> Iterator[tuple[str, torch.Tensor]]:
    start = time.perf_counter()
    outside = _in_whole_reload(model, vllm)
    planned: list[tuple[str, torch.nn.Module, str]] = []
    left_to_model: list[str] = []
    if outside is None:
        layers = expert_layers(model)
        mapper = getattr(model, "hf_to_vllm_mapper", None)
        for group in ckpt.moe_layers():
            path = model_path_of(group, mapper, layers)
            if path is None:
                left_to_model.append(f"`{group.prefix}`: maps to no expert layer of this rank")
                continue
            module_path, module = layers[path]
            spec = describe(module, ckpt, group.prefix)
            reason = _not_in_checkpoint_format(module, spec, vllm) or spec.unfillable()
            if reason is not None:
                left_to_model.append(f"`{group.prefix}`: {reason}")
                continue
            planned.append((module_path, module, group.prefix))
    guard.check("before the reload wrote into the model")
    consumed: set[str] = set()
    expert_bytes = 0
    fill_seconds = 0.0
    for module_path, module, prefix in planned:
        info = vllm.info(module)
        vllm.materialize(module, info)
        spec = describe(module, ckpt, prefix)
        fill_start = time.perf_counter()
        consumed.update(fill_layer(ckpt, spec))
        _synchronize(spec)
        fill_seconds += time.perf_counter() - fill_start
        names = spec.filled
        filled.update(f"{module_path}.{name}" for name in names)
        info.load_numel += sum(vllm.load_numel(getattr(module, name)) for name in names)
        expert_bytes += sum(getattr(module, name).nbytes for name in names)
        # What was read for this layer came from the files as they were opened.
        guard.check("while the reload read it")
        if info.load_numel >= info.load_numel_total:
            with _as_at_start_up(module):
                vllm.process(module, info)
        # else the layer's other tensors come through load_weights, and vLLM processes it
        # when they have (or at finalize_layerwise_reload)
    experts_done = time.perf_counter()
    remaining = [name for name in ckpt.keys() if name not in consumed]
    global last_reload
    last_reload = ReloadStats(
        ckpt.path, len(planned), expert_bytes, experts_done - start, fill_seconds, len(remaining)
    )
    logging.getLogger("vllm.fastmoe_load").info(
        "Reloading %s: fastmoe_load filled %d expert layers, %.3f GB in %.2f s (%.2f GB/s; "
        "%.2f s with vLLM's processing); %d other tensors to %s.load_weights%s",
        ckpt.path,
        len(planned),
        expert_bytes / 1e9,
        fill_seconds,
        last_reload.fill_gb_per_s,
        experts_done - start,
        len(remaining),
        type(model).__name__,
        "" if outside is None else f" ({outside}: every tensor goes there)",
    )
    log_left_to_engine(ckpt, model, left_to_model)
    for name in remaining:
        # Its shard unchanged at the nanosecond, before the model's load_weights may process
        # a layer with it.
        guard.check_tensor(name, "while the reload read it")
        yield name, ckpt.tensor(name)
    guard.check("while the reload read it")


def reload(llm: Any, path: str | os.PathLike[str] | None = None) -> None:
    """Reloads, in place, the weights of every worker of `llm` (a `vllm.LLM` serving with
    `load_format="fastmoe"`) from the checkpoint at `path` (default: the served path, read
    again), then drops the prefix cache, whose keys and values the previous weights computed.

    One call for an RL loop after each training step; it is vLLM's own reload, which each
    worker runs with this loader (`FastMoeModelLoader.get_all_weights`):

        llm.collective_rpc("reload_weights", kwargs={"weights_path": path,
                                                     "is_checkpoint_format": True})
        llm.reset_prefix_cache()

    (the same two calls, awaited, on an `AsyncLLM`). Raises what a worker raised:
    `FileChangedError` for a checkpoint being rewritten (the served weights intact if the
    change was found before the first write, see `reload_iterator`), `CheckpointError` and
    the like for an unreadable one."""
    weights_path = None if path is None else os.fspath(path)
    llm.collective_rpc(
        "reload_weights", kwargs={"weights_path": weights_path, "is_checkpoint_format": True}
    )
    llm.reset_prefix_cache()
