"""Configuration, validation, errors that change nothing, and state save/load."""
import numpy as np
import pytest

import ireeopt
from ireeopt import schedules
from ireeopt.runtime import cache

COMMON_KEYS = {"name", "weight_decay", "clipnorm", "global_clipnorm", "clipvalue", "use_ema", "ema_momentum",
               "ema_overwrite_frequency", "jit_compile", "is_legacy_optimizer"}


def _model(seed=0):
    rng = np.random.default_rng(seed)
    return [ireeopt.Variable(rng.standard_normal((4, 3)).astype(np.float32), name="dense/kernel"),
            ireeopt.Variable(rng.standard_normal(3).astype(np.float32), name="dense/bias")]


def _grads(rng):
    return [rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32)]


def snapshot(opt, variables):
    return ([v.numpy() for v in variables], [v.numpy() for v in opt.variables], int(opt.iterations))


def assert_same(a, b):
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        np.testing.assert_array_equal(x, y)
    assert a[2] == b[2] and len(a[1]) == len(b[1])


# ---------------------------------------------------------------- config
@pytest.mark.parametrize("opt", [
    ireeopt.Adam(learning_rate=0.01, beta_1=0.8, amsgrad=True, adaptive_epsilon=True, clipnorm=1.0,
                 use_ema=True, ema_overwrite_frequency=5, name="a"),
    ireeopt.AdamW(learning_rate=schedules.CosineDecay(1e-3, 1000, warmup_target=1e-2, warmup_steps=10),
                  weight_decay=0.01, adaptive_epsilon=True, global_clipnorm=2.0),
    ireeopt.Adamax(learning_rate=schedules.PiecewiseConstantDecay([10], [0.1, 0.01]), decay=0.01,
                   clipvalue=0.5, epsilon=1e-6),
    ireeopt.Adamax(lr=0.3),
], ids=["adam", "adamw-schedule", "adamax-schedule", "adamax-lr"])
def test_config_round_trip(opt):
    config = opt.get_config()
    assert COMMON_KEYS <= set(config)
    expected = {"learning_rate", "beta_1", "beta_2", "epsilon"}
    expected |= {"decay"} if isinstance(opt, ireeopt.Adamax) else {"amsgrad", "adaptive_epsilon"}
    assert expected <= set(config)
    clone = type(opt).from_config(config)
    assert clone.get_config() == config
    if isinstance(opt._learning_rate, schedules.LearningRateSchedule):
        assert config["learning_rate"]["class_name"] == type(opt._learning_rate).__name__
        assert clone._learning_rate == opt._learning_rate and clone.learning_rate == opt.learning_rate


def test_adaptive_epsilon_round_trips():
    assert ireeopt.Adam.from_config(ireeopt.Adam(adaptive_epsilon=True).get_config()).adaptive_epsilon is True


# ---------------------------------------------------------------- constructor validation
@pytest.mark.parametrize("make,exc,match", [
    (lambda: ireeopt.Adam(foo=1), TypeError, "foo"),
    (lambda: ireeopt.Adam(decay=0.1), ValueError, "decay"),
    (lambda: ireeopt.AdamW(weight_decay=None), ValueError, "weight_decay"),
    (lambda: ireeopt.Adam(clipnorm=1.0, global_clipnorm=1.0), ValueError, "clipnorm"),
    (lambda: ireeopt.Adam(clipnorm=1.0, clipvalue=1.0), ValueError, "clipvalue"),
    (lambda: ireeopt.Adam(clipnorm=-1.0), ValueError, "clipnorm"),
    (lambda: ireeopt.Adam(use_ema=True, ema_momentum=1.5), ValueError, "ema_momentum"),
    (lambda: ireeopt.Adam(use_ema=True, ema_overwrite_frequency=2.5), ValueError, "ema_overwrite_frequency"),
    (lambda: ireeopt.Adam(use_ema=True, ema_overwrite_frequency=-1), ValueError, "ema_overwrite_frequency"),
    (lambda: ireeopt.Adam(learning_rate="fast"), TypeError, "learning_rate"),
    (lambda: ireeopt.Adam(beta_1="x"), TypeError, "beta_1"),
    (lambda: ireeopt.Adam(amsgrad=1), TypeError, "amsgrad"),
    (lambda: ireeopt.Adam(mesh=object()), NotImplementedError, "mesh"),
    (lambda: ireeopt.Adamax(lr=0.1, learning_rate=0.2), ValueError, "lr"),
    (lambda: ireeopt.Adam(lr=0.1), TypeError, "lr"),
])
def test_constructor_errors(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_ema_settings_only_validated_with_ema():
    ireeopt.Adam(use_ema=False, ema_momentum=5.0, ema_overwrite_frequency="x")
    assert ireeopt.Adam(use_ema=True, ema_overwrite_frequency=0).ema_overwrite_frequency is None


# ---------------------------------------------------------------- learning rate
def test_learning_rate_set_between_steps_without_recompiling(rng):
    variables = _model()
    opt = ireeopt.Adam(learning_rate=0.01)
    opt.apply_gradients(zip(_grads(rng), variables))
    modules = len(cache._memory)
    before = variables[1].numpy()
    opt.learning_rate = 0.0
    opt.beta_1 = 0.5
    opt.apply_gradients(zip(_grads(rng), variables))
    np.testing.assert_array_equal(variables[1].numpy(), before)        # lr 0: nothing moves
    opt.learning_rate = 0.5
    opt.apply_gradients(zip(_grads(rng), variables))
    assert np.abs(variables[1].numpy() - before).max() > 0.1
    assert len(cache._memory) == modules


@pytest.mark.parametrize("kind,make", [("adamw", ireeopt.AdamW), ("adamax", ireeopt.Adamax)])
def test_hyperparameters_set_between_steps_take_effect(kind, make, rng):
    """Betas, epsilon, weight decay, the clip threshold and the EMA momentum set between
    steps are this step's (the host caches what stays the same from step to step): the
    values follow the float64 reference that changes them at the same steps."""
    from .reference import Reference

    variables = _model()
    opt = make(learning_rate=0.05, weight_decay=0.01, clipnorm=1.0, use_ema=True, ema_overwrite_frequency=3)
    ref = Reference(kind, [v.numpy() for v in variables], [v.name for v in variables], learning_rate=0.05,
                    weight_decay=0.01, clipnorm=1.0, use_ema=True, ema_overwrite_frequency=3)
    settings = [dict(beta_1=0.5, beta_2=0.9, epsilon=1e-3, weight_decay=0.2, clipnorm=0.3, ema_momentum=0.5),
                dict(beta_1=0.95, beta_2=0.99, epsilon=1e-5, weight_decay=0.0, clipnorm=5.0, ema_momentum=0.9)]
    names = {"beta_1": "b1", "beta_2": "b2", "epsilon": "eps", "weight_decay": "wd", "clipnorm": "clipnorm",
             "ema_momentum": "ema_momentum"}
    for step in range(5):
        if step in (1, 3):
            for key, value in settings[step // 2].items():
                setattr(opt, key, value)
                setattr(ref, names[key], value)
        grads = _grads(rng)
        opt.apply_gradients(zip(grads, variables))
        ref.step(grads)
        for v, want in zip(variables, ref.p):
            np.testing.assert_allclose(v.numpy(), want, rtol=1e-5, atol=1e-6, err_msg=f"{v.name} {step}")


def test_schedule_cannot_become_a_number():
    opt = ireeopt.Adam(learning_rate=schedules.ExponentialDecay(0.1, 10, 0.9))
    with pytest.raises(TypeError):
        opt.learning_rate = 0.1
    assert opt.learning_rate == np.float32(0.1)
    opt.learning_rate = schedules.InverseTimeDecay(0.2, 10, 0.9)
    assert opt.learning_rate == np.float32(0.2)
    assert opt.get_config()["learning_rate"]["class_name"] == "InverseTimeDecay"


def test_callable_learning_rate_called_every_step(rng):
    calls = []
    opt = ireeopt.Adam(learning_rate=lambda: calls.append(1) or 0.01)
    variables = _model()
    for _ in range(3):
        opt.apply_gradients(zip(_grads(rng), variables))
    assert len(calls) == 3


# ---------------------------------------------------------------- apply_gradients errors change nothing
def _bad_calls(variables):
    k, b = variables
    other_device_var = ireeopt.Variable(np.zeros(3, np.float32), name="other", device="local-task")
    stranger = ireeopt.Variable(np.zeros(3, np.float32), name="stranger")
    good_k = np.ones((4, 3), np.float32)
    return {
        "all None": ([(None, k), (None, b)], ValueError),
        "wrong shape": ([(good_k, k), (np.ones(4, np.float32), b)], ValueError),
        "string gradient": ([(good_k, k), (np.array(["a", "b", "c"]), b)], TypeError),
        "not a variable": ([(good_k, k), (np.ones(3, np.float32), np.zeros(3))], TypeError),
        "duplicate variable": ([(good_k, k), (good_k, k)], ValueError),
        "unknown variable": ([(good_k, k), (np.ones(3, np.float32), stranger)], ValueError),
        "mixed devices": ([(good_k, k), (np.ones(3, np.float32), other_device_var)], ValueError),
        "sparse out of range": ([(ireeopt.IndexedSlices(np.ones((1, 3)), [4], (4, 3)), k)], IndexError),
        "not pairs": ([good_k], TypeError),
    }


@pytest.mark.parametrize("case", list(_bad_calls(_model()).keys()))
def test_bad_apply_changes_nothing(case, rng):
    variables = _model()
    opt = ireeopt.AdamW(use_ema=True, amsgrad=True)
    opt.apply_gradients(zip(_grads(rng), variables))
    before = snapshot(opt, variables)
    call, exc = _bad_calls(variables)[case]
    with pytest.raises(exc):
        opt.apply_gradients(call)
    assert_same(snapshot(opt, variables), before)


def test_failing_callable_learning_rate_changes_nothing(rng):
    variables = _model()
    state = {"fail": False}

    def lr():
        if state["fail"]:
            raise RuntimeError("boom")
        return 0.01
    opt = ireeopt.Adam(learning_rate=lr)
    opt.apply_gradients(zip(_grads(rng), variables))
    before = snapshot(opt, variables)
    state["fail"] = True
    with pytest.raises(RuntimeError, match="boom"):
        opt.apply_gradients(zip(_grads(rng), variables))
    assert_same(snapshot(opt, variables), before)


def test_bad_first_call_leaves_optimizer_unbuilt():
    variables = _model()
    opt = ireeopt.Adam()
    with pytest.raises(ValueError):
        opt.apply_gradients([(np.ones((4, 3), np.float32), variables[0]), (np.ones(7, np.float32), variables[1])])
    assert not opt.built and int(opt.iterations) == 0


def test_none_gradient_warns_and_skips(rng):
    variables = _model()
    opt = ireeopt.Adam(use_ema=True)
    bias_before = variables[1].numpy()
    with pytest.warns(UserWarning, match="dense/bias"):
        opt.apply_gradients([(_grads(rng)[0], variables[0]), (None, variables[1])])
    np.testing.assert_array_equal(variables[1].numpy(), bias_before)
    assert len(opt.variables) == 1 + 2 + 2 * 2    # built for both: iteration, 2 averages, m/v each


def test_exclude_after_build_raises(rng):
    variables = _model()
    opt = ireeopt.AdamW()
    opt.build(variables)
    with pytest.raises(ValueError, match="before"):
        opt.exclude_from_weight_decay(var_names=["bias"])


def test_exclude_second_call_replaces_both_lists(rng):
    variables = _model()
    opt = ireeopt.AdamW(learning_rate=1.0, weight_decay=0.5)
    opt.exclude_from_weight_decay(var_list=[variables[0]], var_names=["kernel"])
    opt.exclude_from_weight_decay(var_names=["bias$"])
    k0, b0 = variables[0].numpy(), variables[1].numpy()
    opt.apply_gradients([(np.zeros((4, 3), np.float32), variables[0]), (np.zeros(3, np.float32), variables[1])])
    np.testing.assert_allclose(variables[0].numpy(), k0 * np.float32(0.5))
    np.testing.assert_array_equal(variables[1].numpy(), b0)


# ---------------------------------------------------------------- variables order, save / load
def test_variables_order():
    variables = _model()
    opt = ireeopt.Adam(amsgrad=True, use_ema=True)
    opt.build(variables)
    names = [v.name for v in opt.variables]
    assert names == ["iteration", "dense/kernel/average", "dense/bias/average", "dense/kernel/m",
                     "dense/kernel/v", "dense/bias/m", "dense/bias/v", "dense/kernel/vhat", "dense/bias/vhat"]
    adamax = ireeopt.Adamax()
    adamax.build(_model())
    assert [v.name for v in adamax.variables][1:] == ["dense/kernel/m", "dense/kernel/u", "dense/bias/m",
                                                      "dense/bias/u"]


@pytest.mark.parametrize("cls,kwargs", [(ireeopt.Adam, {"amsgrad": True, "use_ema": True}),
                                        (ireeopt.AdamW, {"learning_rate": schedules.ExponentialDecay(0.01, 3, 0.5)}),
                                        (ireeopt.Adamax, {"decay": 0.05})])
def test_save_load_round_trip_continues_identically(cls, kwargs, rng):
    grads = [_grads(rng) for _ in range(6)]
    variables = _model()
    opt = cls(**kwargs)
    for g in grads[:3]:
        opt.apply_gradients(zip(g, variables))
    store = {}
    opt.save_own_variables(store)
    assert int(store["0"]) == 3
    values = [v.numpy() for v in variables]
    for g in grads[3:]:
        opt.apply_gradients(zip(g, variables))

    fresh_vars = _model(seed=99)
    for v, value in zip(fresh_vars, values):
        v.assign(value)
    fresh = cls.from_config(opt.get_config())
    fresh.build(fresh_vars)
    fresh.load_own_variables(store)
    assert int(fresh.iterations) == 3
    for g in grads[3:]:
        fresh.apply_gradients(zip(g, fresh_vars))
    for a, b in zip(variables, fresh_vars):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("mutate", ["drop", "extra", "shape"])
def test_load_wrong_store_raises_and_changes_nothing(mutate, rng):
    variables = _model()
    opt = ireeopt.Adam()
    opt.apply_gradients(zip(_grads(rng), variables))
    store = {}
    opt.save_own_variables(store)
    opt.apply_gradients(zip(_grads(rng), variables))
    if mutate == "drop":
        del store[str(len(store) - 1)]
    elif mutate == "extra":
        store[str(len(store))] = np.zeros(3, np.float32)
    else:
        store["1"] = np.zeros((3, 4), np.float32)
    before = snapshot(opt, variables)
    with pytest.raises(ValueError):
        opt.load_own_variables(store)
    assert_same(snapshot(opt, variables), before)


def test_finalize_variable_values(rng):
    variables = _model()
    opt = ireeopt.Adam(use_ema=True, ema_momentum=0.5)
    opt.apply_gradients(zip(_grads(rng), variables))
    averages = [v.numpy() for v in opt.variables[1:3]]
    opt.finalize_variable_values(variables)
    for var, avg in zip(variables, averages):
        np.testing.assert_array_equal(var.numpy(), avg)
