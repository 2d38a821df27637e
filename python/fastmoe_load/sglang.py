"""The SGLang layer adapter, at the import path it had before it moved to
`fastmoe_load.engines.sglang`."""

from .engines.sglang import describe, fill_expert_layer, fill_expert_layers, logical_experts

__all__ = ["describe", "fill_expert_layer", "fill_expert_layers", "logical_experts"]
