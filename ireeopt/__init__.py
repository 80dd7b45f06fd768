"""ireeopt: Keras-exact Adam, AdamW and Adamax compiled ahead of time by IREE.

``import ireeopt`` needs only numpy and iree-base-runtime; JAX and the IREE
compiler are imported lazily, when a step has to be compiled.
"""
import importlib.metadata as _md

from .kernels import schedules
from .kernels.train import lookup
from .runtime.artifact import ArtifactError, load
from .runtime.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .runtime.optimizer import Optimizer
from .runtime.optimizers import Adam, Adamax, AdamW
from .runtime.sparse import IndexedSlices
from .runtime.variable import Variable

try:
    __version__ = _md.version("ireeopt")
except _md.PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"



def compile(optimizer, variables, targets=("llvm-cpu",), sparse=None, sparse_buckets=None, loss=None, batch=None):
    """Compile every step ``optimizer`` needs for ``variables`` ahead of time for each of
    ``targets`` (``llvm-cpu``, ``llvm-cpu:generic``, ``llvm-cpu:aarch64``, ``vulkan-spirv``,
    ``cuda``); returns an ``Artifact`` to ``save(dir)``.  Needs jax and iree-base-compiler.

    ``variables``: ireeopt.Variables or ``{name: {"shape": [...], "dtype": "float32",
    "sparse": False}}``; ``sparse``: names of Variables that take IndexedSlices gradients;
    ``sparse_buckets``: the padded row counts compiled for them.  ``loss`` and an example
    ``batch``: also the train step of ``opt.minimize(loss, variables, batch)``, which the
    loaded optimizer runs as ``minimize(None, variables, batch)`` without jax."""
    from .compiler.artifact import DEFAULT_SPARSE_BUCKETS, compile_artifact

    return compile_artifact(optimizer, variables, targets, sparse,
                            DEFAULT_SPARSE_BUCKETS if sparse_buckets is None else sparse_buckets, loss, batch)


__all__ = ["Adam", "AdamW", "Adamax", "ArtifactError", "CheckpointError", "IndexedSlices", "Optimizer", "Variable",
           "compile", "load", "load_checkpoint", "lookup", "save_checkpoint", "schedules", "__version__"]
