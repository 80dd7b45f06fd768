"""Optimizer math, written once against an array namespace ``xp``.

Every kernel is a small pure function of arrays and scalars.  The compiler traces
them with ``xp = jax.numpy`` (and lowers to StableHLO for IREE); the host-side
constants (``constants(...)`` functions and the schedules) are evaluated with
numpy in float32/float64 exactly as the spec prescribes.  Nothing here imports
JAX at module level, and nothing here knows about IREE or devices.
"""

import hashlib as _hashlib
import pathlib as _pathlib


def sources_hash():
    """sha256 of these kernel sources (what a lowered or compiled step depends on)."""
    h = _hashlib.sha256()
    for path in sorted(_pathlib.Path(__file__).resolve().parent.glob("*.py")):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()
