"""Peer loaders for the speed comparison, each in its page-cache (buffered) mode.

Every ``load_*`` function reads all tensors of ``files`` onto ``device``, holds them until the
end of the call, synchronizes the device and returns the bytes loaded. The peers are imported
inside the functions, so importing this module never needs them.

The comparison is against warm (page-cache resident) data, so each peer is configured to read
through the page cache. Two of them default to O_DIRECT on local disks, which would bypass the
cache and make every run cold:

* InstantTensor (pinned 0.2.2): ``safe_open`` with ``backend=Backend.MMAP``. Its default
  (``URING``, else ``AIO``) is O_DIRECT. Of its buffered backends, ``MMAP`` is the one it
  recommends for in-memory data, which warm data is, and it measures faster there than
  ``URING_BUFFERED``. Threads are left to its own sizing, ``min(32, cores) - 4``: 12 copy
  threads with 36 chunks in flight on a 16-core machine. ``copy=True`` (its default) makes each
  tensor own its memory, as a caller that keeps the weights needs.
* fastsafetensors (pinned 0.5.0): ``SafeTensorsFileLoader(nogds=True)``, the bounce-buffer
  reader, with ``FASTSAFETENSORS_ODIRECT=0`` because 0.5 opens local files O_DIRECT by default.
  ``max_threads=16`` and 16 MiB bounce buffers are its documented defaults, one thread per core
  here. GDS (``nogds=False``) reads O_DIRECT by design and so has no page-cache mode.
* Run:ai Model Streamer (pinned 0.17.0): ``SafetensorsStreamer`` with
  ``RUNAI_STREAMER_FS_STRATEGY=io_uring_buffered,sync_buffered``; its default,
  ``io_uring_direct,libaio_direct,sync_buffered``, is O_DIRECT. The streamer reads into a host
  ring and copies each tensor to the device with ``Tensor.to``. Its concurrency
  (``RUNAI_STREAMER_CONCURRENCY`` / ``RUNAI_STREAMER_FS_QUEUE_DEPTH``, 16 threads or 64 reads in
  flight) and host memory limit (``RUNAI_STREAMER_MEMORY_LIMIT``, 40 GB) keep their defaults,
  which suit a 16-core machine; an environment that sets them is respected.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
from collections.abc import Callable, Iterable, Iterator

import torch

Loader = Callable[[list[str], torch.device], int]


def _cuda_device(device: torch.device) -> torch.device:
    # The peers take the device index separately from its type; "cuda" alone means the
    # current device, as it does for torch.
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"peer loaders need a CUDA device, not {device}")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    # The peers read their I/O mode from the environment; set it for one load only, so a peer's
    # setting never leaks into the next peer or into fastmoe_load's own runs.
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _total_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def load_instanttensor(files: list[str], device: torch.device) -> int:
    """InstantTensor copying from mapped files on its thread pool (``Backend.MMAP``)."""
    from instanttensor import Backend, safe_open

    device = _cuda_device(device)
    tensors: dict[str, torch.Tensor] = {}
    # safe_open sorts the list it is given in place, hence the copy; it synchronizes the current
    # stream, hence the device context.
    with (
        torch.cuda.device(device),
        safe_open(list(files), framework="pt", device=device, backend=Backend.MMAP) as f,
    ):
        for name, tensor in f.tensors():
            tensors[name] = tensor
    torch.cuda.synchronize(device)
    return _total_bytes(tensors.values())


def _loaded_cudart() -> str | None:
    # The CUDA runtime torch already has mapped, found the way InstantTensor finds it.
    with open("/proc/self/maps", encoding="utf-8") as maps:
        for line in maps:
            _, slash, rest = line.partition("/")
            path = slash + rest.strip()
            if os.path.basename(path).startswith("libcudart.so"):
                return path
    return None


def _bind_fastsafetensors_cudart() -> None:
    # fastsafetensors dlopens the unversioned "libcudart.so", which an environment with only
    # torch's wheels lacks (they ship libcudart.so.<major>), and without it the loader refuses the
    # GPU. Point it at the runtime torch already uses, so the two share one runtime wherever the
    # toolkit is installed or not.
    from fastsafetensors import cpp
    from fastsafetensors.copier import nogds

    if getattr(nogds, "_loaded_library", True):
        return
    path = _loaded_cudart()
    if path is None:
        return  # Leave it to its own search, which may still find a system toolkit.
    cpp.load_library_functions(path)
    if cpp.is_cuda_found():
        nogds._loaded_library = True


def load_fastsafetensors(files: list[str], device: torch.device) -> int:
    """fastsafetensors' bounce-buffer reader (``nogds=True``) with buffered reads."""
    from fastsafetensors import SafeTensorsFileLoader, SingleGroup

    device = _cuda_device(device)
    torch.cuda.init()  # Maps torch's CUDA runtime before it is looked up.
    _bind_fastsafetensors_cudart()
    tensors: dict[str, torch.Tensor] = {}
    with torch.cuda.device(device), _environment(FASTSAFETENSORS_ODIRECT="0"):
        loader = SafeTensorsFileLoader(
            SingleGroup(), str(device), nogds=True, max_threads=16, bbuf_size_kb=16 * 1024
        )
        try:
            loader.add_filenames({0: list(files)})
            buffers = loader.copy_files_to_device()
            try:
                # Each tensor shares ownership of its buffer, so it stays valid after close().
                for name in loader.get_keys():
                    tensors[name] = buffers.get_tensor(name)
            finally:
                buffers.close()
        finally:
            loader.close()
    torch.cuda.synchronize(device)
    return _total_bytes(tensors.values())


def load_runai(files: list[str], device: torch.device) -> int:
    """Run:ai Model Streamer reading through io_uring without O_DIRECT."""
    from runai_model_streamer import SafetensorsStreamer

    device = _cuda_device(device)
    tensors: dict[str, torch.Tensor] = {}
    # The strategy is read when the streamer starts, so it has to be set before entering it.
    # sync_buffered, its threaded pread reader, is the fallback where io_uring is unavailable.
    with (
        torch.cuda.device(device),
        _environment(RUNAI_STREAMER_FS_STRATEGY="io_uring_buffered,sync_buffered"),
        SafetensorsStreamer() as streamer,
    ):
        streamer.stream_files(list(files), device=str(device))
        for name, tensor in streamer.get_tensors():
            tensors[name] = tensor
    torch.cuda.synchronize(device)
    return _total_bytes(tensors.values())


def _version(distribution: str, pinned: str) -> str:
    # The installed version where there is one, so that a name never claims a version that did
    # not run; looking it up reads package metadata and imports nothing.
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return pinned


# (display name, module whose import proves the peer usable, loader)
_PEERS: list[tuple[str, str, Loader]] = [
    (
        f"InstantTensor {_version('instanttensor', '0.2.2')} (mmap backend)",
        "instanttensor",
        load_instanttensor,
    ),
    (
        f"fastsafetensors {_version('fastsafetensors', '0.5.0')} (nogds, buffered reads)",
        "fastsafetensors",
        load_fastsafetensors,
    ),
    (
        f"Run:ai Model Streamer {_version('runai-model-streamer', '0.17.0')} (io_uring buffered)",
        "runai_model_streamer",
        load_runai,
    ),
]

PEERS: dict[str, Loader] = {name: loader for name, _, loader in _PEERS}


def available() -> dict[str, Loader]:
    """The peers that import in this interpreter, by display name."""
    found: dict[str, Loader] = {}
    for name, module, loader in _PEERS:
        try:
            importlib.import_module(module)
        except (ImportError, OSError):
            # OSError: a native library that is missing or built for another platform.
            continue
        found[name] = loader
    return found
