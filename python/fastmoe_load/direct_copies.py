"""The copies an engine's own weight loaders make from checkpoint tensors into parameters,
carried out by fastmoe_load's pipeline instead of one tensor at a time.

An engine's `load_weights` narrows each checkpoint tensor to the rank's slice and copies it
into the parameter (`param.data.narrow(...).copy_(loaded.narrow(...))`), and fuses q/k/v or
gate/up by narrowing the parameter too. Handed zero-copy views of the checkpoint, each such
copy is a pageable host-to-device transfer on a GPU (6-8 GB/s, one at a time), or a
single-threaded memory copy on a CPU. `DirectCopies` lets the weight loaders run unchanged
and decide everything: while it is active, a copy from a checkpoint view into a contiguous
tensor of the target device is not made but recorded, as a plan of the view's bytes alone;
the recorded copies are made together through the staging pipeline (pinned buffers, several
copy threads) when the load ends, every `FLUSH_BYTES` (which bounds the scratch
memory of dtype conversions), and before anything else reads or writes the memory they
target, so every operation sees what it would have seen. Anything else (a
strided destination, a source the loader computed or wrote into, a view of another element
size, a dtype below one byte) runs as before. Reads that run no torch operator (`tolist()`,
`numpy()`, `print`) see a pending destination as it was before its copy.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode_stack
from torch.utils._pytree import tree_leaves

from ._fastmoe_load import LayoutError
from .checkpoint import Checkpoint
from .loader import fill
from .staging import Destination

_COPY = torch.ops.aten.copy_.default
_ATEN = torch.ops.aten
# Operators that only make a view, never read or copy data: they may touch a pending
# destination (a weight loader narrows a parameter before copying into it) without making
# the copies first. Anything else that touches one makes them first (`to`, `reshape` and
# `contiguous` may return an alias, yet copy).
_VIEWS = {
    _ATEN.alias,
    _ATEN.as_strided,
    _ATEN.chunk,
    _ATEN.detach,
    _ATEN.diagonal,
    _ATEN.expand,
    _ATEN.narrow,
    _ATEN.permute,
    _ATEN.select,
    _ATEN.slice,
    _ATEN.split,
    _ATEN.split_with_sizes,
    _ATEN.squeeze,
    _ATEN.t,
    _ATEN.transpose,
    _ATEN.unbind,
    _ATEN.unflatten,
    _ATEN.unfold,
    _ATEN.unsqueeze,
    _ATEN.view,
    _ATEN._reshape_alias,
}
# Bytes of recorded copies made at once: the pipeline's batch, and the bound on the scratch
# memory that copies converting a dtype take on the device.
FLUSH_BYTES = 1 << 30


class DirectCopies(TorchDispatchMode):
    """Within `with DirectCopies(ckpt, device) as copies:`, `copies.views(names)` yields
    `(name, view)` for each checkpoint tensor, the zero-copy CPU view `Checkpoint.tensor`
    gives, for a model's `load_weights`. Copies of (narrowed, reshaped) views into
    contiguous tensors on `device`, of the same shape, and of the same dtype or converted as
    `copy_` converts, are made through `fastmoe_load.fill` when the block ends (or before any
    other operation on the memory they target). Errors of the copies (`FileChangedError`,
    ...) are raised as the block ends; an error inside the block drops the copies not yet
    made."""

    def __init__(self, ckpt: Checkpoint, device: torch.device | str) -> None:
        super().__init__()
        self.ckpt = ckpt
        self.device = torch.device(device)
        self.copied_bytes = 0  # of the copies made, and how many they were
        self.copies_made = 0
        # Storage address of a view -> the tensor's name and element size.
        self._sources: dict[int, tuple[str, int]] = {}
        self._pending: list[Destination] = []
        self._pending_bytes = 0
        # Storage address -> byte ranges the pending copies write into it.
        self._targets: dict[int, list[tuple[int, int]]] = {}

    def views(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for name in names:
            view = self.ckpt.tensor(name)
            if view.numel():
                self._sources[view.untyped_storage().data_ptr()] = (name, view.element_size())
            yield name, view

    def flush(self) -> None:
        """Makes the recorded copies now, on the caller's current stream."""
        pending = self._take_pending()
        if pending:
            self.copied_bytes += fill(self.ckpt, pending)
            self.copies_made += len(pending)

    def __enter__(self) -> DirectCopies:
        if any(isinstance(mode, DirectCopies) for mode in _get_current_dispatch_mode_stack()):
            raise RuntimeError("DirectCopies blocks do not nest")
        return super().__enter__()

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        super().__exit__(kind, error, traceback)
        if kind is None:
            self.flush()
        else:
            self._take_pending()  # dropped: the load failed

    def _take_pending(self) -> list[Destination]:
        """The recorded copies, no longer recorded."""
        pending, self._pending, self._targets, self._pending_bytes = self._pending, [], {}, 0
        return pending

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _COPY and self._record(*args, **kwargs):
            return args[0]
        if func.overloadpacket not in _VIEWS:
            self._forget_written_sources(func, args, kwargs)
            if self._pending and self._touches_targets(args, kwargs):
                self.flush()
        return func(*args, **kwargs)

    def _forget_written_sources(self, func, args: Any, kwargs: Any) -> None:
        """A checkpoint view the loader writes into (`loaded += 1`, `loaded.zero_()`) holds
        other values than the file from then on: later copies from it are left to torch,
        which reads the view. Copies recorded before read the file, as torch would have."""
        for i, argument in enumerate(func._schema.arguments):
            if argument.alias_info is None or not argument.alias_info.is_write:
                continue
            value = args[i] if i < len(args) else kwargs.get(argument.name)
            for leaf in tree_leaves(value):
                if isinstance(leaf, torch.Tensor):
                    self._sources.pop(leaf.untyped_storage().data_ptr(), None)

    def _record(self, dst: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> bool:
        """Records `dst.copy_(src)` as a planned copy where it is one; False to run it."""
        if (
            type(src) is not torch.Tensor
            or src.device.type != "cpu"
            or dst.device != self.device
            or dst.shape != src.shape
            or not dst.is_contiguous()
            or (dst.requires_grad and torch.is_grad_enabled())
            or src.numel() == 0
            or src.is_conj()
            or src.is_neg()
        ):
            return False
        name, element_size = self._sources.get(src.untyped_storage().data_ptr(), (None, 0))
        storage = dst.untyped_storage().data_ptr()
        runs = (
            name
            and element_size == src.element_size()  # not a view as another dtype's elements
            and storage not in self._sources
            and strided_runs(src)
        )
        if not runs:  # not from the checkpoint, into it, or not in runs: left to torch
            return False
        try:
            plan = self.ckpt._handle.view_plan(name, offset=src.storage_offset(), **runs)
        except LayoutError:  # elements below one byte: left to torch
            return False
        start = dst.data_ptr()
        written = (start, start + dst.nbytes)
        if any(s < written[1] and written[0] < e for s, e in self._targets.get(storage, ())):
            self.flush()  # a second write to the same bytes lands after the first
        cast = None if src.dtype == dst.dtype else src.dtype
        self._pending.append(Destination(name, dst, plan, cast_from=cast))
        self._targets.setdefault(storage, []).append(written)
        self._pending_bytes += dst.nbytes
        if self._pending_bytes >= FLUSH_BYTES:
            self.flush()
        return True

    def _touches_targets(self, args: Any, kwargs: Any) -> bool:
        for leaf in tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor):
                try:
                    if leaf.untyped_storage().data_ptr() in self._targets:
                        return True
                except (RuntimeError, NotImplementedError):  # no storage to compare
                    return True
        return False


def strided_runs(view: torch.Tensor) -> dict[str, int] | None:
    """`view`'s elements as `rows` runs of `cols` contiguous elements, `row_stride` apart
    (the arguments of `view_plan`), or None where they are not."""
    dims = [
        (size, stride) for size, stride in zip(view.shape, view.stride(), strict=True) if size != 1
    ]
    groups: list[list[int]] = []  # [size, stride] of merged dimensions, innermost first
    for size, stride in reversed(dims):
        if groups and stride == groups[-1][0] * groups[-1][1]:
            groups[-1][0] *= size
        else:
            groups.append([size, stride])
    if not groups or groups[0][1] != 1:  # runs of one element
        groups.insert(0, [1, 1])
    if len(groups) > 2:
        return None
    cols = groups[0][0]
    rows, row_stride = groups[1] if len(groups) == 2 else (1, cols)
    if row_stride < cols:  # rows that overlap (an expanded view) are not runs
        return None
    return {"rows": rows, "cols": cols, "row_stride": row_stride}
