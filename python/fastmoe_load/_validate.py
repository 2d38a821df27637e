"""Argument checks shared by the public functions."""

from __future__ import annotations

import operator
import os
from collections.abc import Callable, Mapping
from typing import Any

from ._fastmoe_load import RequestError


def device_problem(device: object, use_cpu: str) -> str | None:
    """Why fastmoe_load cannot load into `device` (a `torch.device` or its name) on this
    machine, or None where it can: only CPU memory and CUDA devices that are there. `use_cpu`
    says how the caller chooses the CPU (`use device='cpu'`). Asks torch only how many CUDA
    devices it sees, which allocates nothing."""
    import torch

    try:
        target = torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError):
        return "not a device name (cpu, cuda or cuda:N)"
    if target.type == "cpu":
        return None
    if target.type != "cuda":
        return (
            f"fastmoe_load loads into CPU memory and CUDA devices only, not {target.type}: "
            f"{use_cpu}, then move the tensors or model (.to({target.type!r}))"
        )
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        why = "torch was built without CUDA" if torch.version.cuda is None else "no GPU is visible"
        return f"no CUDA device here ({why}); {use_cpu}"
    if (target.index or 0) >= count:
        return (
            f"there {'is' if count == 1 else 'are'} only {count} CUDA "
            f"device{'s' if count > 1 else ''} (cuda:0 to cuda:{count - 1})"
        )
    return None


def as_index(value: object, what: str, where: str = "", minimum: int = 0) -> int:
    """`value` as an int of at least `minimum`: ints and integer scalars (numpy, 0-d torch
    tensors), never bools. `where` prefixes the message (file and experts prefix)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        index = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise RequestError(f"{where}{what} must be an int, got {value!r}") from None
    if index < minimum:
        raise RequestError(f"{where}{what} must be at least {minimum}, got {index}")
    return index


# What an engine's `model_loader_extra_config` may carry: options of `fastmoe_load.open`.
OPEN_OPTIONS = ("num_threads", "io", "prefetch")
# What an engine loader downloads of a Hub checkpoint: the weights, their index, config.json.
CHECKPOINT_FILES = ["*.safetensors", "*.json"]


def local_checkpoint(
    model: str, source: Any, load_config: Any, download: Callable[..., str]
) -> str:
    """The local checkpoint directory of an engine's `model` (a directory, or a Hub id that
    the engine's own `download_weights_from_hf` fetches, at `source.revision`, into
    `load_config.download_dir`)."""
    if os.path.isdir(model):
        return model
    return download(
        model,
        load_config.download_dir,
        CHECKPOINT_FILES,
        source.revision,
        ignore_patterns=load_config.ignore_patterns,
    )


def open_options(
    extra_config: Mapping[str, Any] | None, loader: str, also: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The `fastmoe_load.open` options in an engine's `model_loader_extra_config`, and the
    loader's own ones named in `also`; anything else is refused, naming `loader` and what it
    takes."""
    options = dict(extra_config or {})
    known = (*OPEN_OPTIONS, *also)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise RequestError(
            f"model_loader_extra_config for {loader} takes {', '.join(known)}; "
            f"not {', '.join(unknown)}"
        )
    return options
