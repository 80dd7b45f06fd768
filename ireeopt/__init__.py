"""ireeopt: Keras-exact Adam, AdamW and Adamax compiled ahead of time by IREE.

``import ireeopt`` needs only numpy and iree-base-runtime; JAX and the IREE
compiler are imported lazily, when a step has to be compiled.
"""
import importlib.metadata as _md

from .kernels import schedules
from .runtime.optimizer import Optimizer
from .runtime.optimizers import Adam, Adamax, AdamW
from .runtime.sparse import IndexedSlices
from .runtime.variable import Variable

try:
    __version__ = _md.version("ireeopt")
except _md.PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = ["Adam", "AdamW", "Adamax", "IndexedSlices", "Optimizer", "Variable", "schedules", "__version__"]
