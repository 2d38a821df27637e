"""What a reload of new weights into a running engine needs besides the fill itself, shared by
the vLLM and SGLang loaders: proof that the checkpoint's files did not change while they were
read, and, where asked for, a host copy of the engine's weights to put back.

Trainers overwrite a checkpoint in place or write it beside and rename it over the old one,
often while the engines still read the previous one. A reload therefore checks every file of
the checkpoint (size, modification time, and that the path still names the file that was
opened: the checks the core makes before each copy) before it writes the first byte into the
engine, and refuses there with the engine's weights untouched. It checks them again once every
tensor was read: a file rewritten in place meanwhile may have given bytes of two versions. A
file replaced by a rename cannot: the open checkpoint keeps reading the file it opened, so the
engine then holds that version whole, and the reload says so. Only with a `HostBackup` can a
reload that finds a change after it began writing put the previous weights back.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .._fastmoe_load import FileChangedError
from ..checkpoint import Checkpoint

# Files besides the shards whose change means another checkpoint: the index names the shards,
# the config the quantization and layout.
SIDE_FILES = ("model.safetensors.index.json", "config.json")


@dataclass(frozen=True)
class ReloadStats:
    """What one reload of a rank did: the expert layers fastmoe_load filled, their bytes, the
    seconds of the whole expert part (`expert_seconds`: the engine's allocation of each layer
    in checkpoint format, the fill, the engine's processing into the served layout and its
    copy into the served tensors) and of the fill by fastmoe_load alone (`fill_seconds`),
    and how many other tensors went through the model's own `load_weights`."""

    path: str
    expert_layers: int
    expert_bytes: int
    expert_seconds: float
    fill_seconds: float
    other_tensors: int

    @property
    def gb_per_s(self) -> float:
        """Expert bytes per second of the whole expert part."""
        return self.expert_bytes / 1e9 / max(self.expert_seconds, 1e-9)

    @property
    def fill_gb_per_s(self) -> float:
        """Expert bytes per second of fastmoe_load's fill alone."""
        return self.expert_bytes / 1e9 / max(self.fill_seconds, 1e-9)


@dataclass(frozen=True)
class FileState:
    """What identifies one version of a file: its size, modification time and inode."""

    size: int
    mtime_ns: int
    dev: int
    ino: int

    @classmethod
    def of(cls, path: str) -> FileState | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return cls(st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino)

    def change(self, now: FileState | None) -> str | None:
        """How the file changed since `self`, in words, or None."""
        if now is None:
            return "it was deleted or moved"
        if (now.dev, now.ino) != (self.dev, self.ino):
            return "it was replaced by another file"
        if now.size != self.size:
            return f"its size was {self.size} bytes and is now {now.size}"
        if now.mtime_ns != self.mtime_ns:
            return "it was modified"
        return None


class CheckpointGuard:
    """The state of every file of an open checkpoint (its shards, `SIDE_FILES` where present),
    taken just after it was opened, so that a reload can prove nothing changed since.

    `check(when)` raises `FileChangedError` naming the first changed file, how it changed and
    `when`; it also asks the core, for one tensor of each shard, whether the shard is still
    the file it opened (the core recorded that at open, before this guard could).
    """

    def __init__(self, ckpt: Checkpoint) -> None:
        self.path = ckpt.path
        root = ckpt.path if os.path.isdir(ckpt.path) else os.path.dirname(ckpt.path)
        files = list(ckpt.shard_paths)
        files += [p for p in (os.path.join(root, f) for f in SIDE_FILES) if os.path.exists(p)]
        self.states = {path: FileState.of(path) for path in files}
        self._ckpt = ckpt
        # One tensor per shard, for the core's own check (`Checkpoint.tensor` checks its shard).
        self._probes: dict[int, str] = {}
        for name in ckpt.keys():
            shard = ckpt._handle.tensor_info(name)[0]
            self._probes.setdefault(shard, name)
            if len(self._probes) == len(ckpt.shard_paths):
                break

    def changed(self) -> tuple[str, str] | None:
        """The first file that changed since the guard was made and how, or None."""
        for path, was in self.states.items():
            if was is None:
                continue
            how = was.change(FileState.of(path))
            if how is not None:
                return path, how
        return None

    def check_tensor(self, name: str, when: str) -> None:
        """Raises `FileChangedError` if the shard holding tensor `name` changed."""
        path = self._ckpt.shard_paths[self._ckpt._handle.tensor_info(name)[0]]
        was = self.states.get(path)
        how = None if was is None else was.change(FileState.of(path))
        if how is not None:
            raise FileChangedError(self._message(path, how, when))

    def _message(self, path: str, how: str, when: str) -> str:
        return (
            f"{path}: {how} {when}; the checkpoint at {self.path} is being rewritten. "
            "Reload once the trainer has finished writing it (or write each checkpoint "
            "to a new directory)"
        )

    def check(self, when: str) -> None:
        """Raises `FileChangedError` if any file of the checkpoint changed (`when` says at
        which point of the reload, for the message)."""
        found = self.changed()
        if found is not None:
            path, how = found
            raise FileChangedError(self._message(path, how, when))
        for name in self._probes.values():
            self._ckpt._handle.tensor_info(name)  # raises FileChangedError for its shard


class HostBackup:
    """A host copy of tensors (the engine's parameters and buffers as they serve), taken before
    a reload writes, so that a reload that fails after it began writing can put every one back
    (`restore`). Costs host memory and a device-to-host copy of the model: asked for, never by
    default."""

    def __init__(self, tensors: Iterable[torch.Tensor]) -> None:
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        seen: set[tuple[int, int]] = set()
        for tensor in tensors:
            if tensor.is_meta:
                continue
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
            if key in seen:  # tied weights: one copy
                continue
            seen.add(key)
            self.saved.append((tensor, tensor.detach().to("cpu", copy=True)))

    @property
    def nbytes(self) -> int:
        return sum(copy.nbytes for _, copy in self.saved)

    @torch.no_grad()
    def restore(self) -> None:
        """Copies every saved tensor back into the tensor it was taken from."""
        for tensor, copy in self.saved:
            tensor.data.copy_(copy)
