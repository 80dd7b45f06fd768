"""Schedules against the float64 formulas of tests/reference.py, and their configs."""
import numpy as np
import pytest

from ireeopt import schedules

from .reference import schedule_value

CASES = [
    ("ExponentialDecay", {"initial_learning_rate": 0.1, "decay_steps": 10, "decay_rate": 0.5}),
    ("ExponentialDecay", {"initial_learning_rate": 0.1, "decay_steps": 10, "decay_rate": 0.5, "staircase": True}),
    ("PiecewiseConstantDecay", {"boundaries": [3, 10], "values": [1.0, 0.5, 0.1]}),
    ("PolynomialDecay", {"initial_learning_rate": 0.1, "decay_steps": 20}),
    ("PolynomialDecay", {"initial_learning_rate": 0.1, "decay_steps": 7, "end_learning_rate": 0.01,
                         "power": 2.0, "cycle": True}),
    ("InverseTimeDecay", {"initial_learning_rate": 0.1, "decay_steps": 5, "decay_rate": 0.5}),
    ("InverseTimeDecay", {"initial_learning_rate": 0.1, "decay_steps": 5, "decay_rate": 0.5, "staircase": True}),
    ("CosineDecay", {"initial_learning_rate": 0.1, "decay_steps": 20, "alpha": 0.1}),
    ("CosineDecay", {"initial_learning_rate": 0.0, "decay_steps": 20, "warmup_target": 0.1, "warmup_steps": 5}),
    ("CosineDecayRestarts", {"initial_learning_rate": 0.1, "first_decay_steps": 4}),
    ("CosineDecayRestarts", {"initial_learning_rate": 0.1, "first_decay_steps": 4, "t_mul": 1.0, "m_mul": 0.5,
                             "alpha": 0.05}),
]


@pytest.mark.parametrize("kind,cfg", CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)])
def test_values_and_config(kind, cfg):
    sched = getattr(schedules, kind)(**cfg)
    for step in range(0, 60):
        got = sched(step)
        assert isinstance(got, np.float32)
        np.testing.assert_allclose(got, schedule_value(kind, cfg, step), rtol=3e-6, atol=1e-9,
                                   err_msg=f"step {step}")
    config = sched.get_config()
    assert set(cfg) <= set(config)
    clone = type(sched).from_config(config)
    assert clone == sched and [clone(s) for s in range(30)] == [sched(s) for s in range(30)]
    assert schedules.deserialize(schedules.serialize(sched)) == sched


@pytest.mark.parametrize("cls,key", [(schedules.ExponentialDecay, "decay_steps"),
                                     (schedules.InverseTimeDecay, "decay_steps"),
                                     (schedules.PolynomialDecay, "decay_steps"),
                                     (schedules.CosineDecay, "decay_steps"),
                                     (schedules.CosineDecayRestarts, "first_decay_steps")])
@pytest.mark.parametrize("steps", [0, -3])
def test_nonpositive_decay_steps(cls, key, steps):
    args = {"initial_learning_rate": 0.1, key: steps}
    if cls in (schedules.ExponentialDecay, schedules.InverseTimeDecay):
        args["decay_rate"] = 0.5
    with pytest.raises(ValueError, match=key):
        cls(**args)


def test_piecewise_lengths():
    with pytest.raises(ValueError, match="boundaries"):
        schedules.PiecewiseConstantDecay([1, 2], [1.0, 2.0])
