"""The vLLM layer adapter, at the import path it had before it moved to
`fastmoe_load.engines.vllm`."""

from .engines.vllm import (
    QUANTIZED_METHODS,
    describe,
    load_fused_moe_layer,
    local_experts_of,
    tensor_parallel,
    wants_interleaved,
    weight_parameters,
)

__all__ = [
    "QUANTIZED_METHODS",
    "describe",
    "load_fused_moe_layer",
    "local_experts_of",
    "tensor_parallel",
    "wants_interleaved",
    "weight_parameters",
]
