"""Gradient clipping (spec §5). ``c`` is the threshold, a runtime scalar.

A sparse gradient arrives with its duplicates already summed; its squared norm over
the *raw* values (duplicates separate) is passed in as ``sumsq``, and ``clipvalue``
has already been applied to its raw values on the host (``host_clipped``).
"""

MODES = ("clipnorm", "global_clipnorm", "clipvalue")
#: a squared norm is summed over rows of this many elements, then over the rows
NORM_ROW = 4096


def squared_norm(xp, grad):
    """``sum(grad ** 2)``, summed row by row (NORM_ROW elements; the rest on its own), then
    over the rows' sums.  A sum over one long axis is compiled (llvm-cpu) to one thread
    adding into one float32: 2^24 elements took ~50 ms and came out 1.4% off; over
    independent contiguous rows it runs on every thread, vectorised, within float32
    rounding (1e-6)."""
    flat = grad.reshape(-1)
    rows = flat.shape[0] // NORM_ROW if isinstance(flat.shape[0], int) else 0   # (not for a symbolic length)
    if rows < 2:
        return xp.sum(flat * flat)
    head = flat[:rows * NORM_ROW].reshape(rows, NORM_ROW)
    tail = flat[rows * NORM_ROW:]
    return xp.sum(xp.sum(head * head, axis=1)) + xp.sum(tail * tail)


def clip_by_norm(xp, grad, c, sumsq):
    """Per variable: ``g * c / max(||g||, c)``."""
    return (grad * c) / xp.maximum(xp.sqrt(sumsq), c)


def clip_by_global_norm(xp, grads, c, sumsqs):
    """All gradients scaled by ``c * min(1/n, 1/c)``, ``n = sqrt(sum_i ||g_i||^2)``; a
    non-finite norm gives NaN everywhere, as Keras does (the ``n - n`` term)."""
    n = xp.sqrt(sum(sumsqs))
    scale = c * xp.minimum(1.0 / n, 1.0 / c) + (n - n)
    return [g * scale for g in grads]


def clip_by_value(xp, grad, c):
    """Elementwise clip to ``[-c, c]``."""
    return xp.clip(grad, -c, c)


def clip(xp, mode, grads, c, sumsqs=None, host_clipped=None):
    """Apply the one active clipping ``mode`` (or none) to the list ``grads``.
    ``sumsqs[i]``: a given squared norm, or None to compute it from ``grads[i]``."""
    sumsqs = sumsqs or [None] * len(grads)
    host_clipped = host_clipped or [False] * len(grads)
    if mode is None:
        return list(grads)
    if mode == "clipvalue":
        return [g if done else clip_by_value(xp, g, c) for g, done in zip(grads, host_clipped)]
    squares = [squared_norm(xp, g) if s is None else s for g, s in zip(grads, sumsqs)]
    if mode == "clipnorm":
        return [clip_by_norm(xp, g, c, s) for g, s in zip(grads, squares)]
    if mode == "global_clipnorm":
        return clip_by_global_norm(xp, grads, c, squares)
    raise ValueError(f"unknown clipping mode {mode!r}; expected one of {MODES}")
