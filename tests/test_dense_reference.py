"""The optimizer grid against the float64 reference of tests/reference.py.

Tolerances (float32 step vs float64 reference, 12 steps): rtol 2e-5 / atol 2e-6 on
parameters, the acceptance tolerance of the tf_keras replay.  bfloat16/float16
variables: within two units in the last place of their dtype, with an absolute floor of
2e-4 for values near zero (the reference rounds each step the same way, but a value
that lands on the other side of a rounding boundary carries that ulp forward).
"""
import numpy as np
import pytest

import ireeopt
from ireeopt import schedules

from .reference import Reference

SHAPES = {"dense/kernel": (5, 3), "dense/bias": (3,), "conv/kernel": (2, 2, 2)}
STEPS = 12
NONE_STEP = 5           # at this step dense/bias gets no gradient (a different compiled structure)

COMMON = {
    "default": ({}, {}),
    "betas_lr": ({"learning_rate": 0.02, "beta_1": 0.8, "beta_2": 0.95, "epsilon": 1e-4}, {}),
    "weight_decay_excluded": ({"weight_decay": 0.05, "learning_rate": 0.01}, {"exclude": ["bias$"]}),
    "clipnorm": ({"clipnorm": 0.5}, {}),
    "global_clipnorm": ({"global_clipnorm": 0.7}, {}),
    "clipvalue": ({"clipvalue": 0.3}, {}),
    "ema": ({"use_ema": True, "ema_momentum": 0.9, "ema_overwrite_frequency": 3, "learning_rate": 0.01}, {}),
    "exponential_decay": ({"learning_rate": ("ExponentialDecay", {"initial_learning_rate": 0.01,
                                                                   "decay_steps": 4, "decay_rate": 0.5})}, {}),
    "cosine_warmup": ({"learning_rate": ("CosineDecay", {"initial_learning_rate": 0.001, "decay_steps": 8,
                                                          "warmup_target": 0.02, "warmup_steps": 3})}, {}),
    "callable_lr": ({"learning_rate": "callable"}, {}),
    "bfloat16": ({"learning_rate": 0.01}, {"dtype": "bfloat16"}),
    "float16": ({"learning_rate": 0.01}, {"dtype": "float16"}),
}
ADAM_ONLY = {
    "amsgrad": ({"amsgrad": True, "learning_rate": 0.01}, {}),
    "adaptive_epsilon": ({"adaptive_epsilon": True, "epsilon": 1e-3}, {}),
    "amsgrad_wd_ema_clip": ({"amsgrad": True, "weight_decay": 0.01, "use_ema": True, "ema_momentum": 0.8,
                             "global_clipnorm": 1.0, "learning_rate": 0.01}, {"exclude": ["conv"]}),
}
ADAMAX_ONLY = {"decay": ({"decay": 0.1, "learning_rate": 0.01}, {}),
               "lr_alias": ({"lr": 0.05}, {})}
CLASSES = {"adam": ireeopt.Adam, "adamw": ireeopt.AdamW, "adamax": ireeopt.Adamax}

GRID = [(k, c) for k in CLASSES for c in COMMON]
GRID += [(k, c) for k in ("adam", "adamw") for c in ADAM_ONLY]
GRID += [("adamax", c) for c in ADAMAX_ONLY]


def _case(kind, case):
    return {**COMMON, **ADAM_ONLY, **ADAMAX_ONLY}[case]


def _gradients(rng, step):
    scale = {"dense/kernel": 1.0, "dense/bias": 0.01, "conv/kernel": 30.0}
    grads = {n: (rng.standard_normal(s) * scale[n]).astype(np.float32) for n, s in SHAPES.items()}
    if step == NONE_STEP:
        grads["dense/bias"] = None
    return grads


def run_case(kind, case, jit_compile=True, steps=STEPS):
    kwargs, extra = _case(kind, case)
    kwargs = dict(kwargs)
    dtype = extra.get("dtype", "float32")
    rng = np.random.default_rng(7)
    init = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    ref_kwargs = dict(kwargs)
    counter = {"n": 0}
    if kwargs.get("learning_rate") == "callable":
        def lr_fn():
            counter["n"] += 1
            return 0.001 * counter["n"]
        ref_counter = {"n": 0}

        def ref_lr():
            ref_counter["n"] += 1
            return 0.001 * ref_counter["n"]
        kwargs["learning_rate"], ref_kwargs["learning_rate"] = lr_fn, ref_lr
    elif isinstance(kwargs.get("learning_rate"), tuple):
        sched_kind, cfg = kwargs["learning_rate"]
        kwargs["learning_rate"] = getattr(schedules, sched_kind)(**cfg)
    if "lr" in ref_kwargs:
        ref_kwargs["learning_rate"] = ref_kwargs.pop("lr")
    variables = {n: ireeopt.Variable(init[n], name=n, dtype=dtype) for n in SHAPES}
    opt = CLASSES[kind](jit_compile=jit_compile, **kwargs)
    if extra.get("exclude"):
        opt.exclude_from_weight_decay(var_names=extra["exclude"])
    ref = Reference(kind, [variables[n].numpy().astype(np.float64) for n in SHAPES], list(SHAPES),
                    dtypes=[dtype] * len(SHAPES), exclude_names=extra.get("exclude", ()), **ref_kwargs)
    grad_rng = np.random.default_rng(11)
    for step in range(steps):
        grads = _gradients(grad_rng, step)
        opt.apply_gradients([(grads[n], variables[n]) for n in SHAPES])
        ref.step([grads[n] for n in SHAPES])
    return opt, variables, ref, dtype


def assert_matches(variables, ref, dtype):
    for i, name in enumerate(SHAPES):
        got = variables[name].numpy().astype(np.float64)
        if dtype == "float32":
            np.testing.assert_allclose(got, ref.p[i], rtol=2e-5, atol=2e-6, err_msg=name)
        else:
            ulp = 2.0 ** -7 if dtype == "bfloat16" else 2.0 ** -10
            np.testing.assert_allclose(got, ref.p[i], rtol=2 * ulp, atol=2e-4, err_msg=name)


@pytest.mark.parametrize("kind,case", GRID)
def test_matches_float64_reference(kind, case):
    opt, variables, ref, dtype = run_case(kind, case)
    assert int(opt.iterations) == STEPS
    assert_matches(variables, ref, dtype)
    # slots follow the reference too (first moment of every variable)
    state = {v.name: v.numpy() for v in opt.variables[1:]}
    for i, name in enumerate(SHAPES):
        np.testing.assert_allclose(state[f"{name}/m"], ref.m[i], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("kind,case", [("adam", "amsgrad_wd_ema_clip"), ("adamax", "decay"),
                                       ("adamw", "bfloat16")])
def test_eager_reference_path_matches(kind, case):
    """jit_compile=False runs the same kernels op by op in JAX; it follows the reference too."""
    _, variables, ref, dtype = run_case(kind, case, jit_compile=False)
    assert_matches(variables, ref, dtype)


@pytest.mark.parametrize("adaptive", [False, True])
def test_adam_constants_are_float32_operations(adaptive):
    """The host's per-step Adam scalars (kernels/adam.py, computed in doubles rounded to
    float32) equal the same operations done in numpy float32, with ``b**t`` from float64
    rounded once (spec §2), over many steps and settings."""
    from ireeopt.kernels import adam

    f32 = np.float32
    rng = np.random.default_rng(3)
    for _ in range(300):
        lr, eps = 10.0 ** rng.uniform(-6, 0), 10.0 ** rng.uniform(-9, -3)
        b1, b2 = (rng.choice([0.9, 0.95, rng.uniform(0.5, 0.9999)]) for _ in range(2))
        iterations = int(rng.integers(0, 20000))
        t = iterations + 1
        b1p, b2p = f32(float(f32(b1)) ** t), f32(float(f32(b2)) ** t)
        root = np.sqrt(f32(1) - b2p)
        want = {"alpha": (f32(lr) * root) / (f32(1) - b1p),
                "eps": f32(eps) * root if adaptive else f32(eps),
                "one_minus_b1": f32(1.0 - b1), "one_minus_b2": f32(1.0 - b2)}
        got = adam.constants(lr, b1, b2, eps, iterations, adaptive)
        assert got == {k: float(v) for k, v in want.items()}, (lr, b1, b2, eps, iterations)
