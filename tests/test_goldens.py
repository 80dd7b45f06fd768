"""Published golden values (spec §11; Keras 3 and tf_keras unit tests, float32)."""
import numpy as np
import pytest

import ireeopt


def _trajectory(opt, steps=5):
    x = ireeopt.Variable(np.ones(10, np.float32), name="x")
    rows = []
    for step in range(steps):
        grad = np.full(10, 0.01, np.float32) if step == 0 else np.arange(0.1, 1.1, 0.1).astype(np.float32)
        opt.apply_gradients([(grad, x)])
        rows.append(x.numpy())
    return rows


def test_adam_amsgrad():
    rows = _trajectory(ireeopt.Adam(amsgrad=True))
    for row, want in zip(rows, [0.999, 0.9982, 0.9974, 0.9965, 0.9955]):
        np.testing.assert_allclose(row, np.full(10, want), atol=5e-4)


def test_adamw():
    rows = _trajectory(ireeopt.AdamW(learning_rate=1.0, weight_decay=0.5, epsilon=2))
    np.testing.assert_allclose(rows[0], np.full(10, 0.4998), atol=5e-4)
    np.testing.assert_allclose(rows[4], [0.0263, 0.0215, 0.0167, 0.012, 0.0073, 0.0026, -0.0021, -0.0067,
                                         -0.0113, -0.0159], atol=5e-4)


def test_adamax():
    rows = _trajectory(ireeopt.Adamax(learning_rate=0.2, beta_1=0.85, beta_2=0.95, epsilon=1e-6))
    np.testing.assert_allclose(rows[0], np.full(10, 0.8), atol=5e-4)
    np.testing.assert_allclose(rows[4], [0.1933, 0.204, 0.2076, 0.2094, 0.2105, 0.2112, 0.2117, 0.2121,
                                         0.2124, 0.2126], atol=5e-4)


@pytest.mark.parametrize("cls,want", [(ireeopt.Adam, [0.5, 1.5, 2.5, 3.5]),
                                      (ireeopt.Adamax, [0.5, 1.5, 2.5, 3.5]),
                                      (ireeopt.AdamW, [0.4980, 1.4960, 2.494, 3.492])])
def test_single_step(cls, want):
    var = ireeopt.Variable(np.array([1, 2, 3, 4], np.float32))
    cls(learning_rate=0.5).apply_gradients([(np.array([1, 6, 7, 2], np.float32), var)])
    np.testing.assert_allclose(var.numpy(), want, atol=5e-4)


def test_weight_decay_three_optimizers_and_exclusion():
    var = ireeopt.Variable(np.float32(2.0), name="var")
    kept = ireeopt.Variable(np.float32(2.0), name="kept")
    for opt in (ireeopt.Adam(learning_rate=1.0, weight_decay=0.004), ireeopt.AdamW(learning_rate=1.0),
                ireeopt.Adamax(learning_rate=1.0, weight_decay=0.004)):
        opt.exclude_from_weight_decay(var_list=[kept])
        opt.apply_gradients([(np.float32(0), var), (np.float32(0), kept)])
    np.testing.assert_allclose(var.numpy(), 1.9760959, rtol=1e-7)
    assert kept.numpy() == np.float32(2.0)


@pytest.mark.parametrize("setting,want", [({"clipnorm": 1}, [0.7071, 0.7071]), ({"clipvalue": 1}, [1, 1]),
                                          ({"global_clipnorm": 1}, [0.5, 0.5])])
def test_clipping(setting, want):
    """The clipped gradient is observed through the first moment: m = (1 - b1) * g."""
    a, b = (ireeopt.Variable(np.zeros(2, np.float32), name=n) for n in "ab")
    opt = ireeopt.Adam(**setting)
    opt.apply_gradients([(np.array([100, 100], np.float32), a), (np.array([100, 100], np.float32), b)])
    state = {v.name: v.numpy() for v in opt.variables[1:]}
    for name in "ab":
        np.testing.assert_allclose(state[f"{name}/m"] / np.float32(0.1), want, atol=5e-4)


def test_ema_overwrite():
    var = ireeopt.Variable(np.array([1, 2], np.float32), name="x")
    opt = ireeopt.Adam(learning_rate=0.1, use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=2)
    grad = np.array([0.5, -1], np.float32)
    opt.apply_gradients([(grad, var)])
    np.testing.assert_allclose(var.numpy(), [0.900001287, 2.09999895], rtol=1e-7)
    np.testing.assert_allclose(opt.variables[1].numpy(), [0.990000129, 2.00999975], rtol=1e-7)
    opt.apply_gradients([(grad, var)])
    np.testing.assert_allclose(var.numpy(), [0.971000373, 2.02899957], rtol=1e-7)
