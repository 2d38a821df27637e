"""In-place reload (RL weight refit) of a vLLM model served with `load_format="fastmoe"`.

vLLM's in-place reload, `reload_weights` (a worker method, so
`llm.collective_rpc("reload_weights", kwargs={"weights_path": path})`, or `reload(llm, path)`
here, also importable from `engines.vllm_loader`), asks the model loader for
`get_all_weights`, which `FastMoeModelLoader` answers with `reload_iterator`: inside vLLM's
layerwise reload the expert layers are filled by fastmoe_load and processed by vLLM into their
served layout as at start-up, every other tensor goes through the model's `load_weights`; a
checkpoint being rewritten is refused (see `reload_iterator`). `model_loader_extra_config`
`reload_keep_previous: true` keeps a host copy of the served weights during each reload, to
put back should a change be found after the reload began writing. `VLLM_RELOAD_MODE=direct`
gets every tensor through the model's `load_weights`, as from vLLM's default loader.

Expert redistribution (vLLM 0.34). EPLB's rebalancing (`rearrange_expert_weights_inplace`,
`distributed/eplb/rebalance_execute.py`) moves the served expert rows between EP ranks over
its communicator (`EplbCommunicator`: torch.distributed, PyNCCL or NIXL sends and receives)
and never reads the checkpoint nor calls the model loader: fastmoe_load takes no part in it.
Only the fault-tolerance recovery after an EP rank died (`v1/worker/sentinel`,
`reload_experts_from_disk`) reads the checkpoint: it puts each affected MoE layer alone into a
layerwise reload (`initialize_layerwise_reload(layer, defer_processing=True)`), wraps the
layer's expert weight loaders so that each checkpoint expert lands in every local slot now
holding it (`_placement_weight_loader`), asks the engine's loader for `get_all_weights`, and
hands the model's `load_weights` the tensors under the affected layers' prefixes, raising if a
layer received none. With `load_format="fastmoe"` that is `reload_iterator` outside a
whole-model reload: every tensor is yielded, the experts go through vLLM's wrapped weight
loaders, bit for bit as with vLLM's default loader (`tests/test_vllm_reload.py`). fastmoe_load
does not fill those layers itself: the new placement lives only in the wrapped loaders, and a
layer whose tensors were all consumed would be refused by that check.

How vLLM's in-place reload goes (`model_loader/reload`: `reload_weights` in `inplace.py`,
0.32-0.34): it first asks the loader for `get_all_weights`, then puts every module back in
checkpoint format on the meta device (`initialize_layerwise_reload`: the served tensors are
kept aside as the layer's `kernel_tensors`), and passes the weights to the model's
`load_weights`; each layer is materialised, loaded, processed by its quantization method
exactly as at start-up and copied into the served tensors (`_layerwise_process`) once all its
values arrived, the rest at `finalize_layerwise_reload`. The iterator runs inside
`load_weights`, so when it is first asked for a tensor every layer is already back in
checkpoint format: it fills the expert layers there (materialised as vLLM materialises them,
then filled by fastmoe_load, then handed to vLLM's own `_layerwise_process`) and yields only
the other tensors.

vLLM is imported only when a reload runs (`_layerwise`); this module imports neither
`vllm_loader` nor vLLM at import time.
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

from ..checkpoint import Checkpoint
from ..checkpoint import open as open_checkpoint
from .reload import CheckpointGuard, HostBackup, ReloadStats
from .spec import ExpertLayerSpec, fill_layer, log_left_to_engine
from .vllm import describe
from .vllm_model import expert_layers, model_path_of

logger = logging.getLogger("fastmoe_load")

# Keep a host copy of the served weights during each reload, so that a checkpoint found
# rewritten after the reload began writing is refused with the previous weights put back.
KEEP_PREVIOUS_OPTION = "reload_keep_previous"
# The last reload of this process (this rank), for benchmarks and RL frameworks' logs.
last_reload: ReloadStats | None = None


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
            "redistribution from disk, VLLM_RELOAD_MODE=direct, or no reload)"
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
    redistribution from disk, `VLLM_RELOAD_MODE=direct`) every tensor is yielded, as vLLM's
    default loader yields them, and the log says so.

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
