"""Adamax, the legacy tf_keras kernel's exact evaluation order (spec §4).

Per step, with ``t = iterations + 1`` and ``b1p = b1**t``::

    m  += (g - m) * (1 - b1)        # (1 - b1) computed in float32: 1 - f32(b1)
    u   = max(b2 * u, |g|)
    var -= (lr / (1 - b1p)) * (m / (u + epsilon))

With the backward-compatible ``decay``: ``lr_t = lr / (1 + decay * iterations)``.
"""
from .numerics import f32, power

SLOTS = ("m", "u")
CONSTANTS = ("current_lr", "eps", "one_minus_b1", "beta_1", "beta_2")


def decayed_lr(learning_rate, decay, iterations):
    """Inverse-time ``decay`` of the legacy optimizers, in float32 (0-based iterations)."""
    lr = f32(learning_rate)
    if decay:
        lr = lr / (f32(1) + f32(decay) * f32(iterations))
    return f32(lr)


def constants(learning_rate, beta_1, beta_2, epsilon, iterations):
    """Float32 scalars for the step that follows ``iterations`` completed steps.
    ``learning_rate`` is this step's rate, already decayed."""
    one = f32(1)
    b1p = power(beta_1, iterations + 1)
    return {"current_lr": f32(learning_rate) / (one - b1p), "eps": f32(epsilon),
            "one_minus_b1": one - f32(beta_1), "beta_1": f32(beta_1), "beta_2": f32(beta_2)}


def update(xp, var, grad, slots, c):
    """One Adamax update of a float32 ``var``; returns (var, slots)."""
    m = slots["m"] + (grad - slots["m"]) * c["one_minus_b1"]
    u = xp.maximum(c["beta_2"] * slots["u"], xp.abs(grad))
    var = var - c["current_lr"] * (m / (u + c["eps"]))
    return var, {"m": m, "u": u}

