"""Adam, evaluated exactly as tf_keras 2.21 does (spec §2).

Per step, with ``t = iterations + 1``, ``b1p = b1**t`` and ``b2p = b2**t``::

    alpha   = (lr * sqrt(1 - b2p)) / (1 - b1p)
    eps_hat = epsilon * sqrt(1 - b2p)   if adaptive_epsilon else epsilon
    m      += (g - m) * (1 - b1)
    v      += (g*g - v) * (1 - b2)
    vhat    = max(vhat, v)              (amsgrad only; then v_used = vhat)
    var    -= (m * alpha) / (sqrt(v_used) + eps_hat)

The scalar constants are computed on the host in float32 (``constants``), so
every hyperparameter is a runtime input of the compiled step.
"""
import functools
import math

from .numerics import one_minus, r32, r32s

SLOTS = ("m", "v")
AMSGRAD_SLOT = "vhat"
CONSTANTS = ("alpha", "eps", "one_minus_b1", "one_minus_b2")


def constants(learning_rate, beta_1, beta_2, epsilon, iterations, adaptive_epsilon=False):
    """Float32 scalars for the step that follows ``iterations`` completed steps (each
    operation rounded to float32, see ``numerics.r32``; ``b**t`` correctly rounded;
    roundings that do not depend on each other done together: ~1 us of every step)."""
    t = float(iterations + 1)
    b1, b2, eps, one_minus_b1, one_minus_b2 = _fixed(beta_1, beta_2, epsilon)
    b1p, b2p = r32s(b1 ** t, b2 ** t)
    lr, one_minus_b1p, one_minus_b2p = r32s(float(learning_rate), 1.0 - b1p, 1.0 - b2p)
    root = r32(math.sqrt(one_minus_b2p))
    alpha = r32(r32(lr * root) / one_minus_b1p)
    if adaptive_epsilon:
        eps = r32(eps * root)
    return {"alpha": alpha, "eps": eps, "one_minus_b1": one_minus_b1, "one_minus_b2": one_minus_b2}


@functools.lru_cache(maxsize=64)
def _fixed(beta_1, beta_2, epsilon):
    """What of ``constants`` is the same every step (cached: ~2 us of every step's host time)."""
    return (r32(float(beta_1)), r32(float(beta_2)), r32(float(epsilon)), float(one_minus(beta_1)),
            float(one_minus(beta_2)))


def update(xp, var, grad, slots, c):
    """One Adam update of a float32 ``var`` with gradient ``grad``; returns (var, slots)."""
    m = slots["m"] + (grad - slots["m"]) * c["one_minus_b1"]
    v = slots["v"] + (grad * grad - slots["v"]) * c["one_minus_b2"]
    new = {"m": m, "v": v}
    v_used = v
    if "vhat" in slots:
        v_used = new["vhat"] = xp.maximum(slots["vhat"], v)
    var = var - (m * c["alpha"]) / (xp.sqrt(v_used) + c["eps"])
    return var, new
