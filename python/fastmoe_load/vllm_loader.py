"""vLLM's `load_format="fastmoe"` model loader, at the import path it had before it moved to
`fastmoe_load.engines.vllm_loader` (imports vLLM)."""

from .engines.vllm_loader import LOAD_FORMAT, FastMoeModelLoader, fill_expert_layers, register

__all__ = ["LOAD_FORMAT", "FastMoeModelLoader", "fill_expert_layers", "register"]
