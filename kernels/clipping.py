"""Gradient clipping (spec §5). ``c`` is the threshold, a runtime scalar."""

MODES = ("clipnorm", "global_clipnorm", "clipvalue")


def clip_by_norm(xp, grad, c):
    """Per variable: ``g * c / max(||g||, c)``."""
    norm = xp.sqrt(xp.sum(grad * grad))
    return (grad * c) / xp.maximum(norm, c)


def global_norm(xp, grads):
    """``sqrt(sum_i ||g_i||^2)`` over all gradients of the step."""
    total = sum(xp.sum(g * g) for g in grads)
    return xp.sqrt(total)


def clip_by_global_norm(xp, grads, c):
    """All gradients scaled by ``c * min(1/n, 1/c)``; a non-finite norm gives NaN
    everywhere, as Keras does (the ``n - n`` term)."""
    n = global_norm(xp, grads)
    scale = c * xp.minimum(1.0 / n, 1.0 / c) + (n - n)
    return [g * scale for g in grads]


def clip_by_value(xp, grad, c):
    """Elementwise clip to ``[-c, c]``."""
    return xp.clip(grad, -c, c)


def clip(xp, mode, grads, c):
    """Apply the one active clipping ``mode`` (or none) to the list ``grads``."""
    if mode is None:
        return list(grads)
    if mode == "clipnorm":
        return [clip_by_norm(xp, g, c) for g in grads]
    if mode == "global_clipnorm":
        return clip_by_global_norm(xp, grads, c)
    if mode == "clipvalue":
        return [clip_by_value(xp, g, c) for g in grads]
    raise ValueError(f"unknown clipping mode {mode!r}; expected one of {MODES}")
