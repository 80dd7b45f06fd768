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
import numpy as np

from .numerics import f32, one_minus, power

SLOTS = ("m", "v")
AMSGRAD_SLOT = "vhat"
CONSTANTS = ("alpha", "eps", "one_minus_b1", "one_minus_b2")


def constants(learning_rate, beta_1, beta_2, epsilon, iterations, adaptive_epsilon=False):
    """Float32 scalars for the step that follows ``iterations`` completed steps."""
    t = iterations + 1
    one = f32(1)
    b1p, b2p = power(beta_1, t), power(beta_2, t)
    root = np.sqrt(one - b2p)
    alpha = (f32(learning_rate) * root) / (one - b1p)
    eps = f32(epsilon) * root if adaptive_epsilon else f32(epsilon)
    return {"alpha": alpha, "eps": f32(eps), "one_minus_b1": one_minus(beta_1),
            "one_minus_b2": one_minus(beta_2)}


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
