"""The `python -m fastmoe_load` command line: `inspect`, `convert` and `bench`."""

from .main import main

__all__ = ["main"]
