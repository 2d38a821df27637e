"""Argument checks shared by the public functions."""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

from ._fastmoe_load import RequestError


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
