"""Argument checks shared by the public functions."""

from __future__ import annotations

import operator

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
