"""The tf_keras 2.21 replay behind tests/test_tf_keras_oracle.py, run in its own process:
TensorFlow and Mesa's lavapipe (both carry LLVM) crash when they share one.

    python -m tests.tf_keras_replay      # prints {case: "ok" | error} as JSON
"""
import json
import os
import sys
import warnings

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import ireeopt  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402
from ireeopt import schedules  # noqa: E402
from tests.tf_keras_replay_cases import DENSE_CASES, SPARSE_CASES  # noqa: E402

SHAPES = {"dense/kernel": (6, 4), "dense/bias": (4,), "emb": (20, 3)}

DENSE = {
    "adam": ("Adam", {}),
    "adam-amsgrad-clipnorm": ("Adam", {"amsgrad": True, "clipnorm": 0.3, "learning_rate": 0.01}),
    "adam-adaptive-eps": ("Adam", {"adaptive_epsilon": True, "epsilon": 1e-3}),
    "adam-global-ema": ("Adam", {"global_clipnorm": 1.0, "use_ema": True, "ema_momentum": 0.9,
                                 "ema_overwrite_frequency": 4, "learning_rate": 0.02}),
    "adamw-exclude": ("AdamW", {"weight_decay": 0.05, "learning_rate": 0.01, "exclude": ["bias"]}),
    "adamw-schedule": ("AdamW", {"learning_rate": ("CosineDecay", {"initial_learning_rate": 0.001,
                                                                    "decay_steps": 6, "warmup_target": 0.01,
                                                                    "warmup_steps": 3})}),
    "adamw-clipvalue": ("AdamW", {"clipvalue": 0.2, "amsgrad": True}),
    "adamax": ("Adamax", {"learning_rate": 0.01}),
    "adamax-decay-clip": ("Adamax", {"learning_rate": 0.02, "decay": 0.05, "clipnorm": 0.5, "beta_1": 0.8}),
    "adamax-exponential": ("Adamax", {"learning_rate": ("ExponentialDecay", {"initial_learning_rate": 0.05,
                                                                              "decay_steps": 3,
                                                                              "decay_rate": 0.7})}),
}


def _make(kind, kwargs, lib):
    kwargs = dict(kwargs)
    exclude = kwargs.pop("exclude", None)
    lr = kwargs.get("learning_rate")
    if isinstance(lr, tuple):
        module = schedules if lib == "ireeopt" else tf_keras.optimizers.schedules
        kwargs["learning_rate"] = getattr(module, lr[0])(**lr[1])
    if lib == "ireeopt":
        opt = getattr(ireeopt, kind)(**kwargs)
    elif kind == "Adamax":
        opt = tf_keras.optimizers.legacy.Adamax(**kwargs)
    else:
        opt = getattr(tf_keras.optimizers, kind)(**kwargs)
    if exclude:
        opt.exclude_from_weight_decay(var_names=exclude)
    return opt


def _gradients(rng, step, sparse):
    grads = {n: (rng.standard_normal(s) * (5.0 if n == "emb" else 1.0)).astype(np.float32)
             for n, s in SHAPES.items()}
    if step == 3:
        grads["dense/bias"] = None
    if sparse:
        idx = rng.integers(0, 20, 9)
        grads["emb"] = (rng.standard_normal((9, 3)).astype(np.float32) * 5, idx)
    return grads


def _replay(kind, kwargs, sparse=False, steps=8):
    rng = np.random.default_rng(0)
    init = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    ours = {n: ireeopt.Variable(init[n], name=n) for n in SHAPES}
    theirs = {n: tf.Variable(init[n], name=n) for n in SHAPES}
    opt_ours, opt_theirs = _make(kind, kwargs, "ireeopt"), _make(kind, kwargs, "tf_keras")
    for step in range(steps):
        grads = _gradients(rng, step, sparse)
        pairs_ours, pairs_theirs = [], []
        for n in SHAPES:
            g = grads[n]
            if isinstance(g, tuple):
                pairs_ours.append((ireeopt.IndexedSlices(g[0], g[1], SHAPES[n]), ours[n]))
                pairs_theirs.append((tf.IndexedSlices(tf.constant(g[0]), tf.constant(g[1]),
                                                      tf.constant(SHAPES[n])), theirs[n]))
            else:
                pairs_ours.append((g, ours[n]))
                pairs_theirs.append((None if g is None else tf.constant(g), theirs[n]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt_ours.apply_gradients(pairs_ours)
        opt_theirs.apply_gradients([(g, v) for g, v in pairs_theirs if g is not None])
        for n in SHAPES:
            np.testing.assert_allclose(ours[n].numpy(), theirs[n].numpy(), rtol=2e-5, atol=2e-6,
                                       err_msg=f"{n} after step {step + 1}")




def main():
    results = {}
    for sparse in (False, True):
        for case in (SPARSE_CASES if sparse else DENSE_CASES):
            key = f"{case}{' sparse' if sparse else ''}"
            try:
                _replay(*DENSE[case], sparse=sparse)
                results[key] = "ok"
            except AssertionError as e:
                results[key] = str(e)
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
