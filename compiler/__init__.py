"""Trace a ``StepSpec`` with JAX, export StableHLO, compile it with iree-compile.

Imports jax and iree.compiler lazily, inside the functions: ``import
ireeopt.compiler`` itself is cheap and JAX-free.
"""
from .targets import target_flags  # noqa: F401
from .trace import lower_step  # noqa: F401
from .iree import compile_mlir  # noqa: F401
