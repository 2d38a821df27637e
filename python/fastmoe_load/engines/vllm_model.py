"""Where a vLLM model's expert layers are, and which checkpoint expert group maps to which:
shared by the first load (`vllm_loader`) and the in-place reload (`vllm_reload`). No engine
imported: the model is any `torch.nn.Module` whose expert modules own vLLM's parameter names.
"""

from __future__ import annotations

from typing import Any

import torch

from ..checkpoint import MoeLayer
from .vllm import WEIGHT_PARAMETERS


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
