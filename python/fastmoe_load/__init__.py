"""fastmoe_load: load Mixture-of-Experts checkpoints into inference engines, fast.

import fastmoe_load as fml
with fml.open("path/to/checkpoint") as ckpt:
    for layer in ckpt.moe_layers():
        fml.load_fused_moe(ckpt, layer.prefix, w13, w2, tp_rank=0, tp_size=1)
"""

import logging
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from ._fastmoe_load import (
    CheckpointError,
    FastMoeLoadError,
    FileChangedError,
    HeaderError,
    LayoutError,
    RequestError,
    TensorNotFoundError,
)
from .checkpoint import Checkpoint, MoeLayer, UnsupportedGroup, UnsupportedWarning, open
from .loader import LoadStats, destination_shapes, load_fused_moe
from .placement import expert_placement
from .staging import StagingPool
from .transformers import LoadWarning, ModelLoadReport, load_model

try:
    # The installed distribution's version: the Cargo workspace's, which maturin reads.
    __version__ = _version("fastmoe-load")
except PackageNotFoundError:  # a source tree on the path that was never installed
    __version__ = "0+unknown"

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "FastMoeLoadError",
    "FileChangedError",
    "HeaderError",
    "LayoutError",
    "LoadStats",
    "LoadWarning",
    "ModelLoadReport",
    "MoeLayer",
    "RequestError",
    "StagingPool",
    "TensorNotFoundError",
    "UnsupportedGroup",
    "UnsupportedWarning",
    "__version__",
    "destination_shapes",
    "expert_placement",
    "load_fused_moe",
    "load_model",
    "open",
]

# A library logs, the application decides where to: silent unless configured.
logging.getLogger("fastmoe_load").addHandler(logging.NullHandler())
