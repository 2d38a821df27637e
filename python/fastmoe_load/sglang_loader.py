"""SGLang's `FastMoeModelLoader`, at the import path it had before it moved to
`fastmoe_load.engines.sglang_loader` (imports SGLang)."""

from .engines.sglang_loader import FastMoeModelLoader

__all__ = ["FastMoeModelLoader"]
