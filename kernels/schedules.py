"""Learning-rate schedules (spec §7), evaluated in float32 at the 0-based ``iterations``.

Each schedule follows tf_keras 2.21's float32 evaluation order.  They are plain
host computations (numpy): the learning rate is a runtime input of the compiled
step, so changing it or following a schedule never recompiles anything.
"""
import math

import numpy as np

f32 = np.float32


class LearningRateSchedule:
    """Base class: ``schedule(step) -> float32`` plus ``get_config``/``from_config``."""

    def __call__(self, step):
        raise NotImplementedError

    def get_config(self):
        raise NotImplementedError

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


def _positive_steps(name, value):
    if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


class _StepRatioDecay(LearningRateSchedule):
    """Shared by ExponentialDecay and InverseTimeDecay: a function of ``lr0``, ``decay_rate``
    and ``p = step / decay_steps`` (floored if ``staircase``)."""

    def __init__(self, initial_learning_rate, decay_steps, decay_rate, staircase=False, name=None):
        self.initial_learning_rate = initial_learning_rate
        self.decay_steps = _positive_steps("decay_steps", decay_steps)
        self.decay_rate = decay_rate
        self.staircase = staircase
        self.name = name

    def __call__(self, step):
        p = f32(step) / f32(self.decay_steps)
        if self.staircase:
            p = np.floor(p)
        return f32(self._decay(f32(self.initial_learning_rate), f32(self.decay_rate), p))

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate, "decay_steps": self.decay_steps,
                "decay_rate": self.decay_rate, "staircase": self.staircase, "name": self.name}


class ExponentialDecay(_StepRatioDecay):
    """``lr0 * decay_rate ** (step / decay_steps)`` (exponent floored if ``staircase``)."""

    @staticmethod
    def _decay(lr0, rate, p):
        return lr0 * np.power(rate, p)


class PiecewiseConstantDecay(LearningRateSchedule):
    """``values[0]`` up to and including ``boundaries[0]``, ``values[i+1]`` on
    ``(boundaries[i], boundaries[i+1]]``, ``values[-1]`` after the last boundary."""

    def __init__(self, boundaries, values, name=None):
        if len(values) != len(boundaries) + 1:
            raise ValueError("The length of boundaries should be 1 less than the length of values "
                             f"(got {len(boundaries)} boundaries and {len(values)} values)")
        self.boundaries = list(boundaries)
        self.values = list(values)
        self.name = name

    def __call__(self, step):
        for boundary, value in zip(self.boundaries, self.values):
            if step <= boundary:
                return f32(value)
        return f32(self.values[-1])

    def get_config(self):
        return {"boundaries": self.boundaries, "values": self.values, "name": self.name}


class PolynomialDecay(LearningRateSchedule):
    """``(lr0 - end) * (1 - s/ds) ** power + end`` with ``s`` capped at ``decay_steps``,
    or with ``ds`` growing by multiples of ``decay_steps`` when ``cycle``."""

    def __init__(self, initial_learning_rate, decay_steps, end_learning_rate=0.0001, power=1.0,
                 cycle=False, name=None):
        self.initial_learning_rate = initial_learning_rate
        self.decay_steps = _positive_steps("decay_steps", decay_steps)
        self.end_learning_rate = end_learning_rate
        self.power = power
        self.cycle = cycle
        self.name = name

    def __call__(self, step):
        s, ds = f32(step), f32(self.decay_steps)
        if self.cycle:
            multiplier = f32(1) if s == 0 else np.ceil(s / ds)
            ds = ds * multiplier
        else:
            s = np.minimum(s, ds)
        p = s / ds
        lr0, end = f32(self.initial_learning_rate), f32(self.end_learning_rate)
        return f32((lr0 - end) * np.power(f32(1) - p, f32(self.power)) + end)

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate, "decay_steps": self.decay_steps,
                "end_learning_rate": self.end_learning_rate, "power": self.power,
                "cycle": self.cycle, "name": self.name}


class InverseTimeDecay(_StepRatioDecay):
    """``lr0 / (1 + decay_rate * step / decay_steps)`` (floored ratio if ``staircase``)."""

    @staticmethod
    def _decay(lr0, rate, p):
        return lr0 / (f32(1) + rate * p)


def _cosine(step, decay_steps, from_lr, alpha):
    fraction = step / decay_steps
    cosine = f32(0.5) * (f32(1) + np.cos(f32(math.pi) * fraction))
    return f32(from_lr * ((f32(1) - f32(alpha)) * cosine + f32(alpha)))


class CosineDecay(LearningRateSchedule):
    """Cosine decay from ``initial_learning_rate`` (or from ``warmup_target`` after a linear
    warmup of ``warmup_steps``) down to ``alpha * lr`` over ``decay_steps``."""

    def __init__(self, initial_learning_rate, decay_steps, alpha=0.0, name=None,
                 warmup_target=None, warmup_steps=0):
        self.initial_learning_rate = initial_learning_rate
        self.decay_steps = _positive_steps("decay_steps", decay_steps)
        self.alpha = alpha
        self.name = name
        self.warmup_target = warmup_target
        self.warmup_steps = warmup_steps

    def __call__(self, step):
        s, ds = f32(step), f32(self.decay_steps)
        lr0 = f32(self.initial_learning_rate)
        if self.warmup_target is None:
            return _cosine(np.minimum(s, ds), ds, lr0, self.alpha)
        ws, target = f32(self.warmup_steps), f32(self.warmup_target)
        s = np.minimum(s, ds + ws)
        if s < ws:
            return f32((target - lr0) * (s / ws) + lr0)
        return _cosine(s - ws, ds, target, self.alpha)

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate, "decay_steps": self.decay_steps,
                "alpha": self.alpha, "name": self.name, "warmup_target": self.warmup_target,
                "warmup_steps": self.warmup_steps}


class CosineDecayRestarts(LearningRateSchedule):
    """SGDR: cosine decay restarting after ``first_decay_steps``, periods growing by
    ``t_mul`` and peaks scaled by ``m_mul`` at each restart."""

    def __init__(self, initial_learning_rate, first_decay_steps, t_mul=2.0, m_mul=1.0, alpha=0.0,
                 name=None):
        self.initial_learning_rate = initial_learning_rate
        self.first_decay_steps = _positive_steps("first_decay_steps", first_decay_steps)
        self.t_mul = t_mul
        self.m_mul = m_mul
        self.alpha = alpha
        self.name = name

    def __call__(self, step):
        one, t_mul = f32(1), f32(self.t_mul)
        fraction = f32(step) / f32(self.first_decay_steps)
        if t_mul == one:
            restart = np.floor(fraction)
            fraction = fraction - restart
        else:
            restart = np.floor(np.log(one - fraction * (one - t_mul)) / np.log(t_mul))
            done = (one - np.power(t_mul, restart)) / (one - t_mul)
            fraction = (fraction - done) / np.power(t_mul, restart)
        m_fac = np.power(f32(self.m_mul), restart)
        cosine = f32(0.5) * m_fac * (one + np.cos(f32(math.pi) * fraction))
        alpha = f32(self.alpha)
        return f32(f32(self.initial_learning_rate) * ((one - alpha) * cosine + alpha))

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate,
                "first_decay_steps": self.first_decay_steps, "t_mul": self.t_mul,
                "m_mul": self.m_mul, "alpha": self.alpha, "name": self.name}


ALL = (ExponentialDecay, PiecewiseConstantDecay, PolynomialDecay, InverseTimeDecay, CosineDecay,
       CosineDecayRestarts)


def serialize(schedule):
    return {"class_name": type(schedule).__name__, "config": schedule.get_config()}


def deserialize(config):
    classes = {cls.__name__: cls for cls in ALL}
    name = config.get("class_name")
    if name not in classes:
        raise ValueError(f"unknown learning-rate schedule {name!r}; known: {sorted(classes)}")
    return classes[name].from_config(config["config"])
