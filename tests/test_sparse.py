"""Sparse (IndexedSlices) gradients: Adam/AdamW dense-equivalent, Adamax lazy.

Tolerances against the float64 reference: rtol 2e-5 / atol 2e-6 (as for dense);
sparse vs densified Adam: rtol 1e-6 / atol 1e-7 (only the summation order differs).
"""
import numpy as np
import pytest

import ireeopt
from ireeopt.runtime import cache
from ireeopt.runtime.module import StepModule

from .reference import Reference

R, D = 40, 3


def _table(seed=0, shape=(R, D)):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _slices(rng, k, rows=R, width=(D,), dtype=np.int32):
    idx = rng.integers(0, rows, k).astype(dtype)
    return ireeopt.IndexedSlices(rng.standard_normal((k,) + width).astype(np.float32), idx)


@pytest.mark.parametrize("cls,kwargs", [
    (ireeopt.Adam, {"learning_rate": 0.01}),
    (ireeopt.Adam, {"learning_rate": 0.01, "amsgrad": True, "use_ema": True, "ema_overwrite_frequency": 3}),
    (ireeopt.AdamW, {"learning_rate": 0.01, "weight_decay": 0.1}),
])
def test_adam_sparse_equals_densified(cls, kwargs):
    rng = np.random.default_rng(1)
    sparse_var = ireeopt.Variable(_table(), name="emb")
    dense_var = ireeopt.Variable(_table(), name="emb")
    a, b = cls(**kwargs), cls(**kwargs)
    for _ in range(15):
        g = _slices(rng, 25)                     # 25 rows of 40: duplicates are certain
        dense = np.zeros((R, D), np.float32)
        np.add.at(dense, g.indices, g.values)
        a.apply_gradients([(g, sparse_var)])
        b.apply_gradients([(dense, dense_var)])
    np.testing.assert_allclose(sparse_var.numpy(), dense_var.numpy(), rtol=1e-6, atol=1e-7)
    for x, y in zip(a.variables[1:], b.variables[1:]):
        np.testing.assert_allclose(x.numpy(), y.numpy(), rtol=1e-6, atol=1e-7)


def _check_against_reference(kind, kwargs, grads_per_step, shapes, dtype_map=None):
    cls = {"adam": ireeopt.Adam, "adamw": ireeopt.AdamW, "adamax": ireeopt.Adamax}[kind]
    names = [f"v{i}" for i in range(len(shapes))]
    init = [_table(i, s) for i, s in enumerate(shapes)]
    variables = [ireeopt.Variable(x, name=n) for x, n in zip(init, names)]
    opt = cls(**kwargs)
    ref = Reference(kind, init, names, **kwargs)
    for grads in grads_per_step:
        opt.apply_gradients([(g, v) for g, v in zip(grads, variables)])
        ref.step([("sparse", g.values, g.indices) if isinstance(g, ireeopt.IndexedSlices) else g for g in grads])
    for i, v in enumerate(variables):
        np.testing.assert_allclose(v.numpy(), ref.p[i], rtol=2e-5, atol=2e-6, err_msg=v.name)
    return opt, variables


def test_adamax_lazy_leaves_untouched_rows_and_slots_bit_identical():
    rng = np.random.default_rng(2)
    var = ireeopt.Variable(_table(), name="emb")
    opt = ireeopt.Adamax(learning_rate=0.05)
    opt.apply_gradients([(_slices(rng, 30), var)])           # every slot row gets some history
    before = [var.numpy()] + [v.numpy() for v in opt.variables[1:]]
    g = ireeopt.IndexedSlices(np.ones((4, D), np.float32), np.array([5, 9, 5, 31]))
    opt.apply_gradients([(g, var)])
    after = [var.numpy()] + [v.numpy() for v in opt.variables[1:]]
    untouched = np.setdiff1d(np.arange(R), [5, 9, 31])
    for x, y in zip(before, after):
        np.testing.assert_array_equal(x[untouched], y[untouched])      # bit-identical
        assert (x[[5, 9, 31]] != y[[5, 9, 31]]).all()


@pytest.mark.parametrize("kwargs", [{"learning_rate": 0.05},
                                    {"learning_rate": 0.05, "weight_decay": 0.1, "decay": 0.1},
                                    {"learning_rate": 0.05, "use_ema": True, "ema_overwrite_frequency": 2}])
def test_adamax_lazy_matches_reference(kwargs):
    rng = np.random.default_rng(3)
    steps = [[_slices(rng, 12)] for _ in range(10)]
    _check_against_reference("adamax", kwargs, steps, [(R, D)])


@pytest.mark.parametrize("kind", ["adam", "adamax"])
@pytest.mark.parametrize("clip", [{"clipnorm": 0.5}, {"global_clipnorm": 0.8}, {"clipvalue": 0.4}])
def test_clipping_happens_before_duplicates_are_summed(kind, clip):
    """Heavy duplicates make clip-then-sum differ from sum-then-clip; the reference clips
    the raw values (norm over values with duplicates separate)."""
    rng = np.random.default_rng(4)
    steps = []
    for _ in range(6):
        idx = np.array([1, 1, 1, 1, 7, 7, 3])
        steps.append([ireeopt.IndexedSlices(rng.standard_normal((7, D)).astype(np.float32) * 3, idx),
                      rng.standard_normal(5).astype(np.float32)])
    _check_against_reference(kind, {"learning_rate": 0.05, **clip}, steps, [(R, D), (5,)])
    # and the other order (sum duplicates, then clip) really gives a different first moment here
    values, idx = steps[0][0].values, steps[0][0].indices
    summed = np.zeros((R, D))
    np.add.at(summed, idx, values)
    first, other = (Reference(kind, [_table(0)], ["v"], learning_rate=0.05, **clip) for _ in range(2))
    first.step([("sparse", values, idx)])
    other.step([("sparse", summed[[1, 7, 3]], [1, 7, 3])])
    assert np.abs(first.m[0] - other.m[0]).max() > 1e-3


@pytest.mark.parametrize("k", [7, 8, 9, 15, 16, 17, 33])
@pytest.mark.parametrize("kind", ["adam", "adamax"])
def test_bucket_boundaries(k, kind):
    rng = np.random.default_rng(k)
    steps = [[_slices(rng, k)] for _ in range(3)]
    _check_against_reference(kind, {"learning_rate": 0.02}, steps, [(R, D)])


def test_buckets_are_reused_not_recompiled_per_k():
    rng = np.random.default_rng(5)
    var = ireeopt.Variable(_table(shape=(R + 1, D)), name="emb")     # a shape no other test compiles
    opt = ireeopt.Adamax()
    opt.apply_gradients([(_slices(rng, 17), var)])
    modules = len(cache._memory)
    for k in range(18, 33):                       # all in the 32-row bucket
        opt.apply_gradients([(_slices(rng, k), var)])
    assert len(cache._memory) == modules
    opt.apply_gradients([(_slices(rng, 33), var)])
    assert len(cache._memory) == modules + 1


@pytest.mark.parametrize("kind", ["adam", "adamax"])
def test_empty_gradient(kind):
    steps = [[ireeopt.IndexedSlices(np.ones((3, D), np.float32), [0, 2, 2])],
             [ireeopt.IndexedSlices(np.zeros((0, D), np.float32), np.zeros(0, np.int32))],
             [ireeopt.IndexedSlices(np.ones((2, D), np.float32), [5, 0])]]
    opt, (var,) = _check_against_reference(kind, {"learning_rate": 0.1}, steps[:1], [(R, D)])
    before = [var.numpy()] + [v.numpy() for v in opt.variables[1:]]
    opt.apply_gradients([(steps[1][0], var)])
    assert int(opt.iterations) == 2
    if kind == "adamax":                          # lazy: nothing at all moves
        for x, y in zip(before, [var.numpy()] + [v.numpy() for v in opt.variables[1:]]):
            np.testing.assert_array_equal(x, y)
    _check_against_reference(kind, {"learning_rate": 0.1}, steps, [(R, D)])


@pytest.mark.parametrize("kind", ["adam", "adamax"])
def test_int64_indices_all_rows_and_other_ranks(kind):
    rng = np.random.default_rng(6)
    steps = []
    for _ in range(4):
        steps.append([_slices(rng, 20, dtype=np.int64),                                    # int64
                      ireeopt.IndexedSlices(rng.standard_normal((R, D)).astype(np.float32),
                                            rng.permutation(R)),                            # all rows
                      ireeopt.IndexedSlices(rng.standard_normal(6).astype(np.float32),
                                            rng.integers(0, 9, 6).astype(np.uint8)),        # rank 1
                      _slices(rng, 5, rows=6, width=(2, 2))])                               # rank 3
    _check_against_reference(kind, {"learning_rate": 0.02}, steps, [(R, D), (R, D), (9,), (6, 2, 2)])


def test_mixed_dense_and_sparse_is_one_call_and_a_variable_may_switch(monkeypatch):
    calls = []
    original = StepModule.__call__
    monkeypatch.setattr(StepModule, "__call__", lambda self, args: calls.append(1) or original(self, args))
    rng = np.random.default_rng(7)
    steps = [[_slices(rng, 10), rng.standard_normal((4, 2)).astype(np.float32), _slices(rng, 3)],
             [rng.standard_normal((R, D)).astype(np.float32), rng.standard_normal((4, 2)).astype(np.float32),
              _slices(rng, 12)],
             [_slices(rng, 10), None, rng.standard_normal((R, D)).astype(np.float32)]]
    with pytest.warns(UserWarning):
        _check_against_reference("adamw", {"learning_rate": 0.02, "global_clipnorm": 2.0}, steps,
                                 [(R, D), (4, 2), (R, D)])
    assert len(calls) == 3


# ---------------------------------------------------------------- bad input: clear error, nothing changes
BAD = {
    "out of range": (lambda: ireeopt.IndexedSlices(np.ones((2, D), np.float32), [3, R]), IndexError),
    "negative": (lambda: ireeopt.IndexedSlices(np.ones((2, D), np.float32), [-1, 3]), IndexError),
    "huge int64": (lambda: ireeopt.IndexedSlices(np.ones((1, D), np.float32), np.array([2**40])), IndexError),
    "lengths differ": (lambda: ireeopt.IndexedSlices(np.ones((3, D), np.float32), [1, 2]), ValueError),
    "width differs": (lambda: ireeopt.IndexedSlices(np.ones((2, D + 1), np.float32), [1, 2]), ValueError),
    "float indices": (lambda: ireeopt.IndexedSlices(np.ones((2, D), np.float32), [1.0, 2.0]), TypeError),
    "2-D indices": (lambda: ireeopt.IndexedSlices(np.ones((2, D), np.float32), [[1], [2]]), ValueError),
    "dense_shape differs": (lambda: ireeopt.IndexedSlices(np.ones((2, D), np.float32), [1, 2], (R + 1, D)),
                            ValueError),
    "string values": (lambda: ireeopt.IndexedSlices(np.array([["a"] * D] * 2), [1, 2]), TypeError),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("cls", [ireeopt.Adam, ireeopt.Adamax])
def test_bad_sparse_gradient_raises_and_changes_nothing(case, cls):
    rng = np.random.default_rng(8)
    var, other = ireeopt.Variable(_table(), name="emb"), ireeopt.Variable(np.ones(4, np.float32), name="w")
    opt = cls(learning_rate=0.1, use_ema=True)
    opt.apply_gradients([(_slices(rng, 6), var), (np.ones(4, np.float32), other)])
    before = ([var.numpy(), other.numpy()] + [v.numpy() for v in opt.variables], int(opt.iterations))
    make, exc = BAD[case]
    with pytest.raises(exc, match="emb"):
        opt.apply_gradients([(np.ones(4, np.float32), other), (make(), var)])
    after = ([var.numpy(), other.numpy()] + [v.numpy() for v in opt.variables], int(opt.iterations))
    assert after[1] == before[1]
    for x, y in zip(before[0], after[0]):
        np.testing.assert_array_equal(x, y)


def test_sparse_gradient_for_a_scalar_variable():
    var = ireeopt.Variable(np.float32(1.0), name="s")
    with pytest.raises(ValueError, match="rank"):
        ireeopt.Adam().apply_gradients([(ireeopt.IndexedSlices(np.ones(1, np.float32), [0]), var)])


def test_adam_scratch_rows_are_cleared_when_indices_move_and_buckets_shrink():
    """Sparse Adam keeps last step's rows in a scratch table and clears them the next step;
    when they outnumber the new bucket (k=40 unique rows, then k=3) the table is reset."""
    rng = np.random.default_rng(9)
    steps = [[ireeopt.IndexedSlices(rng.standard_normal((R, D)).astype(np.float32), rng.permutation(R))],
             [_slices(rng, 3)], [_slices(rng, 20)], [rng.standard_normal((R, D)).astype(np.float32)],
             [_slices(rng, 9)], [_slices(rng, 9)]]
    opt, _ = _check_against_reference("adam", {"learning_rate": 0.05}, steps, [(R, D)])
    scratch = opt._scratch_buffers[0].read()
    assert set(np.nonzero(scratch.any(axis=1))[0]) <= set(steps[-1][0].indices)


@pytest.mark.parametrize("kind,driver", [("adam", "local-task"), ("adamax", "local-sync")])
def test_a_large_table_with_a_dense_neighbour_steps_on_local_task(kind, driver):
    """A step with a sparse gradient over 2^19 parameters or more runs on local-task (as a
    group step would), with the large dense neighbour's gradient bound where it lies; it
    matches the reference.  Lazy Adamax counts the rows it updates (300 x 64 here), so it
    stays on local-sync."""
    rows, width = 9000, 64                                  # 576,000 parameters
    rng = np.random.default_rng(5)
    steps = [[_slices(rng, 300, rows, (width,)), rng.standard_normal(20_000).astype(np.float32)]
             for _ in range(3)]
    opt, _ = _check_against_reference(kind, {"learning_rate": 0.01}, steps, [(rows, width), (20_000,)])
    (prepared,) = [p for key, p in opt._prepared.items() if key[0] != "groups"]
    assert prepared.module.loaded.device.driver == driver
    assert prepared.own_of == {1: next(iter(prepared.bindings.arguments))}
    assert [b.host.ctypes.data for b in prepared.bindings.bound.values()] == [steps[-1][1].ctypes.data]
