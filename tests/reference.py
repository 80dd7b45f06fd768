"""A float64 numpy reference of spec §1-§7, written from the spec text alone.

It shares no code with ``kernels/``.  Low-precision variables are emulated by
rounding the parameter to its dtype after every step (math stays float64).
"""
import math
import re

import numpy as np


def schedule_value(kind, cfg, s):
    """Float64 value of a schedule ``kind`` with keyword ``cfg`` at 0-based step ``s``."""
    if kind == "ExponentialDecay":
        p = s / cfg["decay_steps"]
        p = math.floor(p) if cfg.get("staircase") else p
        return cfg["initial_learning_rate"] * cfg["decay_rate"] ** p
    if kind == "InverseTimeDecay":
        p = s / cfg["decay_steps"]
        p = math.floor(p) if cfg.get("staircase") else p
        return cfg["initial_learning_rate"] / (1 + cfg["decay_rate"] * p)
    if kind == "PiecewiseConstantDecay":
        b, v = cfg["boundaries"], cfg["values"]
        for i, bound in enumerate(b):
            if s <= bound:
                return v[i]
        return v[-1]
    if kind == "PolynomialDecay":
        lr0, ds = cfg["initial_learning_rate"], cfg["decay_steps"]
        end, power = cfg.get("end_learning_rate", 1e-4), cfg.get("power", 1.0)
        if cfg.get("cycle"):
            ds = ds * max(1, math.ceil(s / ds))
        else:
            s = min(s, ds)
        return (lr0 - end) * (1 - s / ds) ** power + end
    if kind == "CosineDecay":
        lr0, ds, alpha = cfg["initial_learning_rate"], cfg["decay_steps"], cfg.get("alpha", 0.0)
        target, ws = cfg.get("warmup_target"), cfg.get("warmup_steps", 0)

        def cosine(step, start):
            return start * ((1 - alpha) * 0.5 * (1 + math.cos(math.pi * step / ds)) + alpha)
        if target is None:
            return cosine(min(s, ds), lr0)
        s = min(s, ds + ws)
        if s < ws:
            return lr0 + (target - lr0) * s / ws
        return cosine(s - ws, target)
    if kind == "CosineDecayRestarts":
        lr0, fds = cfg["initial_learning_rate"], cfg["first_decay_steps"]
        t_mul, m_mul, alpha = cfg.get("t_mul", 2.0), cfg.get("m_mul", 1.0), cfg.get("alpha", 0.0)
        f = s / fds
        if t_mul == 1:
            i = math.floor(f)
            f -= i
        else:
            i = math.floor(math.log(1 - f * (1 - t_mul)) / math.log(t_mul))
            f = (f - (1 - t_mul ** i) / (1 - t_mul)) / t_mul ** i
        return lr0 * ((1 - alpha) * 0.5 * m_mul ** i * (1 + math.cos(math.pi * f)) + alpha)
    raise ValueError(kind)


class Reference:
    """``kind`` in {"adam", "adamw", "adamax"}; keyword arguments as the optimizers take them.
    ``learning_rate`` may be a float, a ``(schedule kind, cfg)`` tuple, or a callable."""

    def __init__(self, kind, params, names, dtypes=None, learning_rate=0.001, beta_1=0.9, beta_2=0.999,
                 epsilon=1e-7, amsgrad=False, adaptive_epsilon=False, weight_decay=None, clipnorm=None,
                 clipvalue=None, global_clipnorm=None, use_ema=False, ema_momentum=0.99,
                 ema_overwrite_frequency=None, decay=0.0, exclude_names=()):
        if kind == "adamw" and weight_decay is None:
            weight_decay = 0.004
        self.kind, self.lr, self.b1, self.b2, self.eps = kind, learning_rate, beta_1, beta_2, epsilon
        self.amsgrad, self.adaptive_epsilon, self.decay = amsgrad, adaptive_epsilon, decay
        self.wd, self.clipnorm, self.clipvalue, self.global_clipnorm = weight_decay, clipnorm, clipvalue, global_clipnorm
        self.use_ema, self.ema_momentum, self.freq = use_ema, ema_momentum, ema_overwrite_frequency
        self.dtypes = dtypes or ["float32"] * len(params)
        self.p = [self._round(np.asarray(p, np.float64), d) for p, d in zip(params, self.dtypes)]
        self.names = names
        self.excluded = [any(re.search(pat, n) for pat in exclude_names) for n in names]
        self.m = [np.zeros_like(p) for p in self.p]
        self.v = [np.zeros_like(p) for p in self.p]      # v for Adam, u for Adamax
        self.vhat = [np.zeros_like(p) for p in self.p]
        self.avg = [p.copy() for p in self.p]
        self.iterations = 0

    @staticmethod
    def _round(x, dtype):
        if dtype == "float32":
            return x
        import ml_dtypes
        np_dtype = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
        return x.astype(np_dtype).astype(np.float64)

    def current_lr(self):
        lr = self.lr
        if isinstance(lr, tuple):
            lr = schedule_value(lr[0], lr[1], self.iterations)
        elif callable(lr):
            lr = lr()
        if self.decay:
            lr = lr / (1 + self.decay * self.iterations)
        return float(lr)

    def step(self, grads):
        """``grads``: one entry per variable: an array, None, or ``("sparse", values, indices)``."""
        lr = self.current_lr()
        sparse = {i: g for i, g in enumerate(grads) if isinstance(g, tuple)}
        idx = [i for i, g in enumerate(grads) if g is not None]
        # a gradient has its variable's dtype (as in Keras); the math is then float32/float64
        raw = {i: self._round(np.asarray(sparse[i][1] if i in sparse else grads[i], np.float64), self.dtypes[i])
               for i in idx}
        g = self._clip(raw)
        t = self.iterations + 1
        for i, gi in g.items():
            if i in sparse and self.kind == "adamax":
                self._lazy_adamax(i, gi, np.asarray(sparse[i][2]), lr, t)
                continue
            if i in sparse:             # Adam: dense-equivalent; duplicates summed after clipping
                dense = np.zeros_like(self.p[i])
                np.add.at(dense, np.asarray(sparse[i][2]), gi)
                gi = dense
            self._dense_update(i, gi, lr, t)
        if self.use_ema and self.freq and (self.iterations + 1) % self.freq == 0:
            for i in g:
                self.p[i] = self._round(self.avg[i], self.dtypes[i])
        self.iterations += 1

    def _clip(self, g):
        if self.clipnorm:
            c = self.clipnorm
            g = {i: x * c / max(np.sqrt(np.sum(x * x)), c) for i, x in g.items()}
        if self.global_clipnorm:
            c = self.global_clipnorm
            n = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
            g = {i: x * (c / max(n, c)) for i, x in g.items()}
        if self.clipvalue:
            g = {i: np.clip(x, -self.clipvalue, self.clipvalue) for i, x in g.items()}
        return g

    def _finish(self, i, p):
        self.p[i] = self._round(p, self.dtypes[i])
        if self.use_ema:
            self.avg[i] = self.ema_momentum * self.avg[i] + (1 - self.ema_momentum) * self.p[i]

    def _dense_update(self, i, gi, lr, t):
        p = self.p[i]
        if self.wd and not self.excluded[i]:
            p = p - p * self.wd * lr
        if self.kind in ("adam", "adamw"):
            self.m[i] = self.m[i] + (gi - self.m[i]) * (1 - self.b1)
            self.v[i] = self.v[i] + (gi * gi - self.v[i]) * (1 - self.b2)
            v_used = self.v[i]
            if self.amsgrad:
                self.vhat[i] = np.maximum(self.vhat[i], self.v[i])
                v_used = self.vhat[i]
            alpha = lr * math.sqrt(1 - self.b2 ** t) / (1 - self.b1 ** t)
            eps = self.eps * math.sqrt(1 - self.b2 ** t) if self.adaptive_epsilon else self.eps
            p = p - self.m[i] * alpha / (np.sqrt(v_used) + eps)
        else:
            self.m[i] = self.m[i] + (gi - self.m[i]) * (1 - self.b1)
            self.v[i] = np.maximum(self.b2 * self.v[i], np.abs(gi))
            p = p - lr / (1 - self.b1 ** t) * self.m[i] / (self.v[i] + self.eps)
        self._finish(i, p)

    def _lazy_adamax(self, i, gi, indices, lr, t):
        """Only the touched rows move (spec §4); weight decay, if any, on those rows only."""
        rows, inverse = np.unique(indices, return_inverse=True)
        summed = np.zeros((len(rows),) + gi.shape[1:])
        np.add.at(summed, inverse.reshape(-1), gi)
        p = self.p[i].copy()
        pr = p[rows]
        if self.wd and not self.excluded[i]:
            pr = pr - pr * self.wd * lr
        m = self.m[i][rows] * self.b1 + summed * (1 - self.b1)
        u = np.maximum(self.v[i][rows] * self.b2, np.abs(summed))
        p[rows] = pr - lr / (1 - self.b1 ** t) * m / (u + self.eps)
        self.m[i][rows], self.v[i][rows] = m, u
        self._finish(i, p)
