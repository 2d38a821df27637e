"""Peer loaders for the speed comparison, each as its users run it.

Two ways to use each peer, both reading whole files:

* ``load_*(files, device)`` reads every tensor of ``files`` onto ``device``, holds them until
  the end of the call, synchronizes the device and returns the bytes loaded (the whole-file
  rows, "own tensors").
* ``iterate_*(files, device, direct=...)`` yields ``(name, tensor)`` with each tensor on the
  device, as vLLM's weights iterator for the peer does (`vllm/model_executor/model_loader/
  weight_utils.py`); `peer_ranks` hands each one to vLLM's weight_loader for a TP or EP rank.

The peers are imported inside the functions, so importing this module never needs them.

Warm rows read through the page cache, so each peer is set to a buffered mode there; cold rows
(`bench --cold`) run each peer in its own default, O_DIRECT mode (``direct=True``):

* InstantTensor (pinned 0.2.2): ``safe_open(..., copy=True)``, as vLLM opens it; each tensor
  owns its memory. Buffered: ``backend=Backend.MMAP``, the buffered backend it recommends for
  in-memory data, which warm data is, and the faster one there (``URING_BUFFERED`` measured
  slower). Direct: its default backend, ``URING`` else ``AIO``, both O_DIRECT. Threads are left
  to its own sizing, ``min(32, cores) - 4``: 12 copy threads with 36 chunks in flight on a
  16-core machine.
* fastsafetensors (pinned 0.5.0): the bounce-buffer reader (``nogds=True``; GDS reads O_DIRECT
  by design and has no page-cache mode), ``max_threads=16`` and 16 MiB bounce buffers, its
  defaults. Whole files: ``SafeTensorsFileLoader`` with every file copied at once; iterated:
  ``ParallelLoader`` one file after another, as vLLM's iterator uses it. Buffered:
  ``FASTSAFETENSORS_ODIRECT=0``; direct: ``FASTSAFETENSORS_ODIRECT=1`` (0.5 reads local files
  O_DIRECT unless told otherwise).
* Run:ai Model Streamer (pinned 0.17.0): ``SafetensorsStreamer`` streaming to the device, each
  tensor owned by the caller (its default in 0.17). Buffered:
  ``RUNAI_STREAMER_FS_STRATEGY=io_uring_buffered,sync_buffered``; direct: its default,
  ``io_uring_direct,libaio_direct,sync_buffered``. The strategy is fixed for the process at the
  streamer's first request, so one bench run uses one of the two. The streamer reads into a
  host ring and copies each tensor to the device with ``Tensor.to``. Its concurrency
  (``RUNAI_STREAMER_CONCURRENCY`` / ``RUNAI_STREAMER_FS_QUEUE_DEPTH``, 16 threads or 64 reads in
  flight) and host memory limit (``RUNAI_STREAMER_MEMORY_LIMIT``, 40 GB) keep their defaults,
  which suit a 16-core machine; an environment that sets them is respected. (vLLM streams to
  the device in its distributed mode, and to host memory in a single process.)
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

Loader = Callable[[list[str], torch.device], int]
# `(files, device)` -> every tensor of the files, by name, on the device, one at a time.
Reader = Callable[[list[str], torch.device], Iterator[tuple[str, torch.Tensor]]]

# Run:ai's read strategies: through the page cache, and its default (O_DIRECT).
RUNAI_BUFFERED = "io_uring_buffered,sync_buffered"
RUNAI_DIRECT = "io_uring_direct,libaio_direct,sync_buffered"


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


def _hold(tensors: Iterable[tuple[str, torch.Tensor]], device: torch.device) -> int:
    """Keeps every tensor until all are read (the whole-file rows), then the bytes loaded."""
    held = dict(tensors)
    torch.cuda.synchronize(device)
    return sum(tensor.numel() * tensor.element_size() for tensor in held.values())


def iterate_instanttensor(
    files: list[str], device: torch.device, direct: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """InstantTensor's tensors as vLLM's iterator opens them (``copy=True``): from mapped
    files on its thread pool (``Backend.MMAP``), or with ``direct`` its default O_DIRECT
    backend (``URING``, else ``AIO``)."""
    from instanttensor import Backend, safe_open

    device = _cuda_device(device)
    backend = {} if direct else {"backend": Backend.MMAP}
    # safe_open sorts the list it is given in place, hence the copy; it synchronizes the current
    # stream, hence the device context.
    with (
        torch.cuda.device(device),
        safe_open(list(files), framework="pt", device=device, copy=True, **backend) as f,
    ):
        yield from f.tensors()


def load_instanttensor(files: list[str], device: torch.device) -> int:
    """InstantTensor copying from mapped files on its thread pool (``Backend.MMAP``)."""
    return _hold(iterate_instanttensor(files, device), _cuda_device(device))


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

    torch.cuda.init()  # Maps torch's CUDA runtime before it is looked up.
    if getattr(nogds, "_loaded_library", True):
        return
    path = _loaded_cudart()
    if path is None:
        return  # Leave it to its own search, which may still find a system toolkit.
    cpp.load_library_functions(path)
    if cpp.is_cuda_found():
        nogds._loaded_library = True


def load_fastsafetensors(files: list[str], device: torch.device) -> int:
    """fastsafetensors' bounce-buffer reader (``nogds=True``) with buffered reads, every file
    copied to the device at once."""
    from fastsafetensors import SafeTensorsFileLoader, SingleGroup

    device = _cuda_device(device)
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
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())


def iterate_fastsafetensors(
    files: list[str], device: torch.device, direct: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """fastsafetensors' ``ParallelLoader`` as vLLM's iterator makes it in one process (a
    `SingleGroup`, ``queue_size=0``, one file after another, each yielded tensor independent of
    the load buffers), with the bounce-buffer reader (``nogds=True``): buffered reads, or
    O_DIRECT with ``direct``."""
    from fastsafetensors import SingleGroup
    from fastsafetensors.parallel_loader import ParallelLoader

    device = _cuda_device(device)
    _bind_fastsafetensors_cudart()
    # Its reader threads look the setting up while the files are read, so it holds for the
    # whole iteration.
    with torch.cuda.device(device), _environment(FASTSAFETENSORS_ODIRECT="1" if direct else "0"):
        loader = ParallelLoader(
            SingleGroup(),
            sorted(files),
            queue_size=0,
            use_tqdm_on_load=False,
            device=str(device),
            nogds=True,
        )
        try:
            with contextlib.closing(loader.iterate_weights()) as tensors:
                yield from tensors
        finally:
            loader.close()


def iterate_runai(
    files: list[str], device: torch.device, direct: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """Run:ai Model Streamer streaming to the device, reading through io_uring without O_DIRECT,
    or with ``direct`` its default O_DIRECT strategy."""
    from runai_model_streamer import SafetensorsStreamer

    device = _cuda_device(device)
    # The strategy is read when the streamer starts, so it has to be set before entering it.
    # sync_buffered, its threaded pread reader, is the fallback where neither is available.
    strategy = RUNAI_DIRECT if direct else RUNAI_BUFFERED
    with (
        torch.cuda.device(device),
        _environment(RUNAI_STREAMER_FS_STRATEGY=strategy),
        SafetensorsStreamer() as streamer,
    ):
        streamer.stream_files(list(files), device=str(device))
        yield from streamer.get_tensors()


def load_runai(files: list[str], device: torch.device) -> int:
    """Run:ai Model Streamer reading through io_uring without O_DIRECT."""
    return _hold(iterate_runai(files, device), _cuda_device(device))


def _version(distribution: str, pinned: str) -> str:
    # The installed version where there is one, so that a name never claims a version that did
    # not run; looking it up reads package metadata and imports nothing.
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return pinned


@dataclass(frozen=True)
class Peer:
    name: str
    # The module whose import proves the peer usable.
    module: str
    load: Loader
    iterate: Callable[..., Iterator[tuple[str, torch.Tensor]]]
    # How the rows name its buffered and its O_DIRECT mode.
    buffered: str
    direct: str


_PEERS = [
    Peer(
        f"InstantTensor {_version('instanttensor', '0.2.2')}",
        "instanttensor",
        load_instanttensor,
        iterate_instanttensor,
        "mmap backend",
        "O_DIRECT",
    ),
    Peer(
        f"fastsafetensors {_version('fastsafetensors', '0.5.0')}",
        "fastsafetensors",
        load_fastsafetensors,
        iterate_fastsafetensors,
        "nogds, buffered reads",
        "nogds, O_DIRECT",
    ),
    Peer(
        f"Run:ai Model Streamer {_version('runai-model-streamer', '0.17.0')}",
        "runai_model_streamer",
        load_runai,
        iterate_runai,
        "buffered",
        "O_DIRECT",
    ),
]

# The peers' packages, as pip names them.
PACKAGES = ["instanttensor", "fastsafetensors", "runai-model-streamer"]


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except (ImportError, OSError):
        # OSError: a native library that is missing or built for another platform.
        return False
    return True


def available() -> dict[str, Loader]:
    """The whole-file loaders (buffered) of the peers that import in this interpreter, by
    display name."""
    return {f"{p.name} ({p.buffered})": p.load for p in _PEERS if _importable(p.module)}


def readers(device: torch.device, direct: bool = False) -> dict[str, Reader]:
    """The readers of the peers that import in this interpreter, by display name, in their
    buffered mode or, with `direct`, their O_DIRECT one; none unless `device` is a CUDA
    device (the peers load onto GPUs only)."""
    if torch.device(device).type != "cuda":
        return {}
    return {
        f"{p.name} ({p.direct if direct else p.buffered})": functools.partial(
            p.iterate, direct=direct
        )
        for p in _PEERS
        if _importable(p.module)
    }
