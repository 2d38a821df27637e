"""What the package's command lines share (`python -m fastmoe_load`, `python -m
fastmoe_load.bench.distributed`): argument types whose mistakes end in one `error: ...` line,
never argparse's usage block or a traceback."""

from __future__ import annotations

import argparse
from typing import NoReturn

from ._fastmoe_load import RequestError
from ._validate import device_problem


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose mistakes end in one `error: ...` line."""

    def error(self, message: str) -> NoReturn:
        # One line, like every other user mistake, instead of argparse's usage block.
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def device_choice(text: str) -> str:
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise argparse.ArgumentTypeError(f"use cpu or cuda[:N], not {text!r}")
    return text


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


def check_device(device: str) -> None:
    """Raises `RequestError` for a device fastmoe_load cannot load into here (a CUDA device
    this machine does not have), in the words of the command line."""
    problem = device_problem(device, "use --device cpu")
    if problem is not None:
        raise RequestError(f"--device {device}: {problem}")
