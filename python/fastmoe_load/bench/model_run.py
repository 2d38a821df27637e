"""`python -m fastmoe_load bench --model`: a whole transformers model, filled by `load_model`
beside `AutoModelForCausalLM.from_pretrained` of the same checkpoint, in one run."""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch

import fastmoe_load as fml

MARKER = "fastmoe_model_bench.json"


def qwen3_moe_config(layers: int):
    """Qwen3-30B-A3B's shapes with fewer layers and a smaller vocabulary."""
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "qwen3_moe",
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_experts=128,
        num_experts_per_tok=8,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        vocab_size=32000,
    )


def save_random_model(path: str, config) -> str:
    """A model of `config` with random weights (every one, norms too, so that a wrong slice
    shows), saved by transformers in its default format (one tensor per expert), unless the
    same one is in `path` already."""
    from transformers import AutoModelForCausalLM

    marker = os.path.join(path, MARKER)
    wanted = config.to_json_string()
    if os.path.exists(marker):
        with open(marker) as f:
            if f.read() == wanted:
                return path
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02, generator=generator)
    model.save_pretrained(path)
    with open(marker, "w") as f:
        f.write(wanted)
    return path


def main(device: str, layers: int, directory: str | None, repeats: int) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    path = directory or os.path.join(tempfile.gettempdir(), f"fastmoe_model_bench_{layers}")
    save_random_model(path, qwen3_moe_config(layers))
    target = torch.device(device)
    size = sum(
        os.path.getsize(os.path.join(path, f))
        for f in os.listdir(path)
        if f.endswith(".safetensors")
    )
    print(f"checkpoint: {path} (Qwen3-MoE shapes, {layers} layers, {size / 1e9:.2f} GB)")

    def sync() -> None:
        if target.type == "cuda":
            torch.cuda.synchronize(target)

    def with_from_pretrained() -> torch.nn.Module:
        # transformers loads to the CPU by default; other devices go through `device_map`.
        placement = {} if target.type == "cpu" else {"device_map": device}
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **placement)

    def with_load_model() -> torch.nn.Module:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(path), dtype=torch.bfloat16
            )
        fml.load_model(model, path, device=target, strict=True)
        return model

    times: dict[str, list[float]] = {"from_pretrained": [], "load_model": []}
    loaders = {"from_pretrained": with_from_pretrained, "load_model": with_load_model}
    for run in range(repeats + 1):
        for name, load in loaders.items():
            sync()
            start = time.perf_counter()
            model = load()
            sync()
            if run:
                times[name].append(time.perf_counter() - start)
            del model
    base = statistics.median(times["from_pretrained"])
    print(f"{'path':<36} {'seconds':>8} {'GB/s':>7} {'x from_pretrained':>18}")
    for name, seconds in times.items():
        median = statistics.median(seconds)
        print(f"{name:<36} {median:8.3f} {size / median / 1e9:7.2f} {base / median:18.2f}")
