"""The native module: the thin binding over the Rust core. The public API lives in the
package (`fastmoe_load.open`, `load_fused_moe`, ...); these are its building blocks."""

import os
from typing import Literal

class FastMoeLoadError(ValueError):
    """Base of every error fastmoe_load raises; the message names the file and tensor."""

class HeaderError(FastMoeLoadError):
    """A safetensors header is corrupt, does not match its file, or the file is not one."""

class CheckpointError(FastMoeLoadError):
    """The checkpoint as a whole is unusable: a missing shard, a tensor stored twice, a bad
    index or config.json, a file that cannot be read, a closed checkpoint."""

class TensorNotFoundError(FastMoeLoadError):
    """A tensor or routed-expert group that is not in the checkpoint."""

class LayoutError(FastMoeLoadError):
    """Routed-expert tensors that do not form a layout the library reads (or are
    inconsistent: shapes, dtypes, scales that do not fit their weights)."""

class RequestError(FastMoeLoadError):
    """A load request that cannot be satisfied: destination shape or dtype, TP rank, expert
    ids, a TP split that cuts a scale block."""

class FileChangedError(FastMoeLoadError):
    """A shard was truncated, replaced or rewritten after the checkpoint was opened."""

class ShardBuffer:
    """One shard's private (copy-on-write) mapping, exported through the buffer protocol."""

    @property
    def path(self) -> str: ...
    def __len__(self) -> int: ...

class CompanionInfo:
    """One kind of companion tensor (scales) of a quantized group."""

    @property
    def kind(
        self,
    ) -> Literal[
        "weight_scale_inv",
        "weight_scale",
        "input_scale",
        "weight_scale_2",
        "weight_shape",
        "weight_zero_point",
        "scales",
        "qzeros",
        "weight_global_scale",
        "input_global_scale",
    ]: ...
    @property
    def scheme(self) -> Literal["block", "group", "channel", "tensor", "whole"]: ...
    @property
    def block(self) -> tuple[int, int] | None: ...
    @property
    def dtype(self) -> str:
        """safetensors dtype name, e.g. `F32`."""
    @property
    def merged_w13(self) -> bool: ...
    @property
    def fused_suffix(self) -> str | None: ...

class MoeLayerInfo:
    """One routed-expert group as the core detected it."""

    @property
    def prefix(self) -> str: ...
    @property
    def format(self) -> str: ...
    @property
    def num_experts(self) -> int: ...
    @property
    def hidden_size(self) -> int: ...
    @property
    def intermediate_size(self) -> int: ...
    @property
    def dtype(self) -> str: ...
    @property
    def bias_dtype(self) -> str | None: ...
    @property
    def tensor_names(self) -> list[str]: ...
    @property
    def quant_method(self) -> str | None: ...
    @property
    def pack(self) -> int:
        """Values per stored weight element along the input dimension."""
    @property
    def out_pack(self) -> int:
        """Values per stored weight element along the output dimension (AWQ's 8), else 1."""
    @property
    def k_first(self) -> bool:
        """Weights and block companions stored input-first, `[in, out]` (GPTQ, AWQ)."""
    @property
    def discarded(self) -> list[str]:
        """Tensors of the group that no destination takes (GPTQ's `g_idx`)."""
    @property
    def companions(self) -> list[CompanionInfo]: ...

class FillTicket:
    """A fill running on the copy threads; dropping it waits for the fill."""

    def wait(self) -> None:
        """Waits (GIL released); raises the fill's error, if any."""

class CopyPlan:
    """The byte-level recipe that fills one destination, bound to its checkpoint."""

    @property
    def nbytes(self) -> int:
        """Destination bytes, which are also the bytes read."""
    @property
    def num_ops(self) -> int: ...
    def windows(self, max_bytes: int) -> list[tuple[int, int]]: ...
    def check_intact(self) -> None: ...
    def execute(self, address: int, start: int = 0, end: int | None = None) -> None:
        """Writes destination bytes `[start, end)` to `address` (GIL released)."""
    def submit(self, address: int, start: int, end: int, buffer: object) -> FillTicket:
        """Starts writing `[start, end)` to `address` on the copy threads."""

class Checkpoint:
    """An open checkpoint with its copy threads."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        num_threads: int | None = None,
        interleaved: bool | None = None,
        io: Literal["mmap", "pread"] = "mmap",
        prefetch: bool = False,
    ) -> None: ...
    @property
    def path(self) -> str: ...
    @property
    def closed(self) -> bool: ...
    @property
    def num_threads(self) -> int: ...
    @property
    def prefetch(self) -> bool: ...
    @property
    def io(self) -> Literal["mmap", "pread"]: ...
    @property
    def model_type(self) -> str | None: ...
    def close(self) -> None: ...
    def keys(self) -> list[str]: ...
    def __contains__(self, name: str) -> bool: ...
    def tensor_info(self, name: str) -> tuple[int, str, list[int], int, int]:
        """`(shard index, dtype, shape, start, end)` of a tensor's bytes in its shard."""
    def shard(self, index: int) -> ShardBuffer: ...
    def shard_paths(self) -> list[str]: ...
    def config_json(self) -> str | None: ...
    def moe_layers(self) -> list[MoeLayerInfo]: ...
    def unsupported_groups(self) -> list[tuple[str, list[str], str]]:
        """`(prefix, tensor names, reason)` of each expert-like group that cannot be loaded."""
    @property
    def unsupported_quantization(self) -> str | None: ...
    def layer(self, prefix: str) -> MoeLayerInfo: ...
    def matrix(
        self, prefix: str, name: str, expert: int, kind: str | None = None
    ) -> tuple[str, int, int, int, int, int]:
        """`(tensor, offset, rows, cols, row_stride, col_stride)`, in elements."""
    def tensor_plan(
        self, name: str, *, dim: int | None = None, rank: int = 0, size: int = 1
    ) -> CopyPlan: ...
    def view_plan(
        self, name: str, *, offset: int, rows: int, cols: int, row_stride: int
    ) -> CopyPlan:
        """`rows` runs of `cols` contiguous elements of `name`, from element `offset`,
        `row_stride` elements apart, packed. Raises `LayoutError` for a view past the
        tensor's bytes or of a dtype below one byte."""
    def plan(
        self,
        prefix: str,
        target_name: str,
        *,
        tp_rank: int,
        tp_size: int,
        experts: list[int],
        stored_order: bool = False,
        interleaved: bool = False,
        k_first: bool = False,
        shard: tuple[int, int] | None = None,
    ) -> CopyPlan: ...
