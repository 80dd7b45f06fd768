"""Gradient clipping (spec §5). ``c`` is the threshold, a runtime scalar.

A sparse gradient arrives with its duplicates already summed; its squared norm over
the *raw* values (duplicates separate) is passed in as ``sumsq``, and ``clipvalue``
has already been applied to its raw values on the host (``host_clipped``).
"""

MODES = ("clipnorm", "global_clipnorm", "clipvalue")


def squared_norm(xp, grad):
    return xp.sum(grad * grad)


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
    squares = [squared_norm(xp, g) if s is None else s for g, s in zip(grads, sumsqs)]
    if mode == "clipnorm":
        return [clip_by_norm(xp, g, c, s) for g, s in zip(grads, squares)]
    if mode == "global_clipnorm":
        return clip_by_global_norm(xp, grads, c, squares)
    if mode == "clipvalue":
        return [g if done else clip_by_value(xp, g, c) for g, done in zip(grads, host_clipped)]
    raise ValueError(f"unknown clipping mode {mode!r}; expected one of {MODES}")
