"""The device runtime: buffers, variables, compiled-step modules, optimizers.

Imports only numpy and ``iree.runtime`` (plus the numpy-only host parts of
``ireeopt.kernels``).  Compilation is reached lazily, only on a cache miss.
"""
