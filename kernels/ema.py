"""Exponential moving average of the weights (spec §6)::

    avg = ema_momentum * avg + (1 - ema_momentum) * var     # (1 - momentum) in float64
    var = avg        when this step overwrites (a runtime flag)
"""
import functools

from .numerics import f32, one_minus


@functools.lru_cache(maxsize=64)
def constants(ema_momentum, overwrite):
    """(Cached: the same few values every step; the dict must not be changed.)"""
    return {"ema_momentum": f32(ema_momentum), "ema_one_minus": one_minus(ema_momentum),
            "ema_overwrite": f32(1.0 if overwrite else 0.0)}


def update(avg, var, c):
    return c["ema_momentum"] * avg + c["ema_one_minus"] * var


def overwrite(xp, var, avg, c):
    # The flag is broadcast first so the select stays elementwise inside the fused update;
    # a scalar predicate makes IREE branch on the host (a readback every step).
    return xp.where(xp.broadcast_to(c["ema_overwrite"], var.shape) > 0, avg, var)
