"""The CPU fast paths, each against the float64 reference: large float32 gradients are
passed to the compiled step where they lie, at any 4-byte-aligned address, not copied (the
step reads exactly the caller's elements and never writes them); large flat steps on
device "cpu" run on local-task; large gradient copies are split over the cores."""
import numpy as np
import pytest

import ireeopt
from ireeopt.kernels.step import CHAIN_WIDTH, WIDE_CHAIN_WIDTH, chain_width, size_of
from ireeopt.compiler.tiles import tuning_spec
from ireeopt.runtime import cores, flat
from ireeopt.runtime.groups import HALVES_MAX_PARAMS, HALVES_MIN_PARAMS, halves_tile
from ireeopt.runtime import module as step_module
from ireeopt.runtime.module import SPIN_S, StepChain

from .reference import Reference

N = (flat.IN_PLACE_MIN_BYTES // 4) + 5          # not a multiple of 16


def _in_place(opt):
    """(address, size) of the memory the optimizer's group steps bind as gradients now."""
    return sorted((b.host.ctypes.data, b.host.nbytes) for p in opt._prepared.values() if p.bindings
                  for b in p.bindings.bound.values() if b is not None)


def _where(*arrays):
    return sorted((a.ctypes.data, a.nbytes) for a in arrays)


def _poisoned(values, offset):
    """``values`` as a C-contiguous slice of a larger array whose other elements are huge:
    a step that read one element outside the slice would blow up."""
    backing = np.full(len(values) + offset + 40, 1e30, np.float32)
    backing[offset:offset + len(values)] = values
    return backing, backing[offset:offset + len(values)]


@pytest.mark.parametrize("device", ["local-sync", "local-task"])
@pytest.mark.parametrize("kwargs", [{}, {"global_clipnorm": 1.0}, {"clipvalue": 0.01, "weight_decay": 0.1},
                                    {"amsgrad": True}, {"use_ema": True, "ema_overwrite_frequency": 2},
                                    {"clipnorm": 0.5}])
def test_in_place_gradients_match_the_reference(device, kwargs):
    """(Under clipnorm the step is one over the variables' slices, which binds large
    gradients where they lie as the group step does.)"""
    rng = np.random.default_rng(0)
    init = rng.standard_normal(N).astype(np.float32)
    var = ireeopt.Variable(init, name="w", device=device)
    opt = ireeopt.Adam(learning_rate=0.01, **kwargs)
    ref = Reference("adam", [init], ["w"], learning_rate=0.01, **kwargs)
    for step, offset in enumerate([0, 1, 3, 7, 13]):
        backing, grad = _poisoned(rng.standard_normal(N).astype(np.float32), offset)
        before = backing.copy()
        opt.apply_gradients([(grad, var)])
        ref.step([grad])
        np.testing.assert_array_equal(backing, before)       # nothing of the caller's memory was written
        assert _in_place(opt) == _where(grad)
        np.testing.assert_allclose(var.numpy(), ref.p[0], rtol=2e-5, atol=2e-6, err_msg=f"step {step}")
    np.testing.assert_allclose(opt._slots["m"][0].numpy(), ref.m[0], rtol=2e-5, atol=2e-6)
    assert len(opt._prepared) == 1             # one compiled step, whatever the gradients' addresses


def _one_variable(seed):
    """(rng, a Variable of N elements, Adam(0.01) and its reference)."""
    rng = np.random.default_rng(seed)
    init = rng.standard_normal(N).astype(np.float32)
    return (rng, ireeopt.Variable(init, name="w"), ireeopt.Adam(learning_rate=0.01),
            Reference("adam", [init], ["w"], learning_rate=0.01))


def test_a_reused_gradient_array_is_read_again_each_step():
    rng, var, opt, ref = _one_variable(1)
    grad = np.empty(N, np.float32)
    for _ in range(3):
        grad[:] = rng.standard_normal(N)                      # the caller refills the same array
        opt.apply_gradients([(grad, var)])                    # (repeats take the short path, in place)
        ref.step([grad.copy()])
        assert _in_place(opt) == _where(grad)
    np.testing.assert_allclose(var.numpy(), ref.p[0], rtol=2e-5, atol=2e-6)
    assert len(opt._repeat_steps) == 1 and opt.device_calls == 3


def test_small_other_dtype_and_strided_gradients_are_copied():
    rng, var, opt, ref = _one_variable(2)
    for grad in (rng.standard_normal(2 * N).astype(np.float32)[::2],    # strided
                 rng.standard_normal(N)):                               # float64
        opt.apply_gradients([(grad, var)])
        ref.step([np.asarray(grad, np.float32)])
        assert _in_place(opt) == []
    grad = rng.standard_normal(N).astype(np.float32)                    # in place
    opt.apply_gradients([(grad, var)])
    ref.step([grad])
    assert _in_place(opt) == _where(grad)
    np.testing.assert_allclose(var.numpy(), ref.p[0], rtol=2e-5, atol=2e-6)
    small = ireeopt.Variable(np.ones(1000, np.float32), name="small")
    opt2 = ireeopt.Adam()
    opt2.apply_gradients([(np.ones(1000, np.float32), small)])
    (prepared,) = opt2._prepared.values()
    assert prepared.bindings is None


@pytest.mark.parametrize("device,driver", [("cpu", "local-task"), ("local-sync", "local-sync")])
def test_cpu_runs_large_flat_steps_on_local_task(device, driver):
    """Device "cpu": a flat step over >= TASK_MIN_PARAMS parameters runs on the
    multi-threaded local-task driver over the same memory; "local-sync" forces the
    calling thread.  Both match the reference, and the variables read the updated memory."""
    from ireeopt.runtime.groups import TASK_MIN_PARAMS

    rng = np.random.default_rng(3)
    shapes = [(TASK_MIN_PARAMS // 2,), (TASK_MIN_PARAMS // 2 + 7,), (3, 5)]
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    variables = [ireeopt.Variable(x, name=f"w{i}", device=device) for i, x in enumerate(init)]
    opt = ireeopt.AdamW(learning_rate=0.01, weight_decay=0.1, global_clipnorm=5.0)
    opt.exclude_from_weight_decay(var_names=["w2"])
    ref = Reference("adamw", init, ["w0", "w1", "w2"], learning_rate=0.01, weight_decay=0.1, global_clipnorm=5.0,
                    exclude_names=["w2"])
    for _ in range(3):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        opt.apply_gradients(zip(grads, variables))
        ref.step(grads)
    assert {p.module.loaded.device.driver for p in opt._prepared.values()} == {driver}
    for v, expected in zip(variables, ref.p):
        np.testing.assert_allclose(v.numpy(), expected, rtol=2e-5, atol=2e-6, err_msg=v.name)
    small = ireeopt.Variable(np.ones(10, np.float32), name="small", device=device)
    opt2 = ireeopt.Adam()
    opt2.apply_gradients([(np.ones(10, np.float32), small)])
    (prepared,) = opt2._prepared.values()
    assert prepared.module.loaded.device.driver == "local-sync"


def _model(seed, shapes):
    """(rng, Variables of ``shapes``, Adam(0.01) and its reference)."""
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    variables = [ireeopt.Variable(x, name=f"w{i}") for i, x in enumerate(init)]
    return rng, variables, ireeopt.Adam(learning_rate=0.01), Reference("adam", init, [v.name for v in variables],
                                                                      learning_rate=0.01)


def test_parallel_copies_of_only_unsplittable_arrays():
    """Above the parallel threshold with nothing to split (a Fortran-ordered source): copied whole."""
    src = np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4))
    dst = np.zeros((3, 4), np.float32)
    flat.copy_to_hosts([(dst, src)], flat.PARALLEL_MIN_BYTES)
    np.testing.assert_array_equal(dst, src)


@pytest.mark.parametrize("parallel", [False, True])
def test_host_squared_norms(monkeypatch, parallel):
    """The squared norms a chain is given (``flat.squared_norms``): of the float32 values the
    steps see, each within float32 rounding of the exact sum, over the cores from
    PARALLEL_MIN_BYTES on (one array split between them, others whole)."""
    rng = np.random.default_rng(3)
    arrays = [rng.standard_normal(n).astype(np.float32) * 3 for n in (5, 70_001, 300_000)]
    arrays += [rng.standard_normal((40, 7)).astype(np.float16), np.zeros(0, np.float32)]
    monkeypatch.setattr(flat, "PARALLEL_MIN_BYTES", 1 << 10 if parallel else 1 << 40)
    monkeypatch.setattr(flat, "_CORES", 2)
    got = flat.squared_norms(arrays)
    for a, value in zip(arrays, got):
        exact = float(np.sum(a.astype(np.float64) ** 2))
        assert value == pytest.approx(exact, rel=1e-6, abs=1e-30)


def test_parallel_gradient_copies(monkeypatch):
    """Gradient staging split over the cores (forced for a small model here): mixed sizes,
    a float64 and a strided gradient (copied whole), every element lands where it belongs."""
    monkeypatch.setattr(flat, "PARALLEL_MIN_BYTES", 1)
    shapes = [(37, 11), (1000,), (5,), (64, 3)]
    rng, variables, opt, ref = _model(4, shapes)
    for _ in range(3):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        grads[1] = grads[1].astype(np.float64)
        grads[3] = np.asfortranarray(grads[3])
        opt.apply_gradients(zip(grads, variables))
        ref.step(grads)
    for v, expected in zip(variables, ref.p):
        np.testing.assert_allclose(v.numpy(), expected, rtol=2e-5, atol=2e-6, err_msg=v.name)


@pytest.mark.parametrize("parallel", [False, True])
def test_a_value_read_is_a_copy_of_it_whole(monkeypatch, parallel):
    """``Variable.numpy`` of a variable and a slot in flat storage (split over the cores from
    PARALLEL_MIN_BYTES on: forced here): the exact current value, which later steps and
    writes to the copy leave apart."""
    monkeypatch.setattr(flat, "PARALLEL_MIN_BYTES", 1 << 10 if parallel else 1 << 40)
    monkeypatch.setattr(flat, "_CORES", 2)
    shapes = [(301, 7), (40_001,)]
    rng, variables, opt, ref = _model(5, shapes)
    grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    opt.apply_gradients(zip(grads, variables))
    ref.step(grads)
    values = [v.numpy() for v in variables]
    slot = opt.variables[3]                 # (iterations, then m and v of each variable)
    assert slot.name == "w1/m"
    m = slot.numpy()
    for value, v, expected in zip(values, variables, ref.p):
        assert value.shape == v.shape and value.dtype == np.float32
        np.testing.assert_allclose(value, expected, rtol=2e-5, atol=2e-6, err_msg=v.name)
    np.testing.assert_allclose(m, ref.m[1], rtol=2e-5, atol=2e-7)
    kept = [value.copy() for value in values]
    opt.apply_gradients(zip(grads, variables))
    for value, before in zip(values, kept):
        np.testing.assert_array_equal(value, before)             # the step left the copies alone
    values[1][:] = 0.0
    assert np.count_nonzero(variables[1].numpy()) == shapes[1][0]  # the copy is not the variable


def test_repeated_dense_steps_take_the_short_path_and_stay_exact():
    """A call like the previous one (same variables, same order, plain arrays) is staged in
    one pass; anything else (new settings, a bad gradient, another order, a generator)
    goes through the general path, which checks it and changes nothing when it fails."""
    shapes = [(7, 3), (300,), (2, 2, 2)]
    rng, variables, opt, ref = _model(5, shapes)
    for step in range(6):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        if step == 2:
            opt.global_clipnorm = ref.global_clipnorm = 0.5        # a new structure: the general path
        if step == 3:
            bad = list(grads)
            bad[1] = np.ones(301, np.float32)
            before = [v.numpy() for v in variables], int(opt.iterations)
            with pytest.raises(ValueError, match="has shape"):
                opt.apply_gradients(zip(bad, variables))
            assert [v.numpy().tolist() for v in variables] == [b.tolist() for b in before[0]]
            assert opt.iterations == before[1]
        if step == 4:
            grads[0] = grads[0].astype(np.float64)
            opt.apply_gradients(((g, v) for g, v in zip(grads, variables)))
        elif step == 5:
            opt.apply_gradients(list(zip(grads, variables))[::-1])
        else:
            opt.apply_gradients(list(zip(grads, variables)))
        ref.step(grads)
        for v, expected in zip(variables, ref.p):
            np.testing.assert_allclose(v.numpy(), expected, rtol=2e-5, atol=2e-6, err_msg=f"{v.name} {step}")
    assert len(opt._repeat_steps) == 2 and opt.device_calls == 6 and opt.iterations == 6
    before = [v.numpy() for v in variables]
    with pytest.raises(TypeError, match="pairs"):            # not pairs: rejected, nothing changes
        opt.apply_gradients([(g, v, None) for g, v in zip(grads, variables)])
    assert all(np.array_equal(v.numpy(), b) for v, b in zip(variables, before)) and opt.iterations == 6


def test_large_variables_of_a_model_take_their_gradients_in_place():
    """In a model of large and small variables, each large float32 variable has a group
    (and a dispatch) of its own, whose gradient is bound where it lies; the small ones share
    one group, copied.  A large gradient that cannot be bound (float64, strided) is copied
    into its group's staging, and the next one is bound again; nothing outside the callers'
    arrays is read, and they are never written."""
    shapes = [(N,), (7, 3), (N + 11,), (300,), (N // 2 + 1, 2)]
    rng, variables, opt, ref = _model(7, shapes)
    opt.exclude_from_weight_decay(var_names=["w3"])
    large = [0, 2, 4]
    for step in range(5):
        grads, backings = [], []
        for k, s in enumerate(shapes):
            backing, g = _poisoned(rng.standard_normal(s).astype(np.float32).reshape(-1), 2 * step + k)
            grads.append(g.reshape(s))
            backings.append((backing, backing.copy()))
        if step == 2:
            grads[2] = grads[2].astype(np.float64)
        if step == 3:
            grads[4] = np.asfortranarray(grads[4])
        opt.apply_gradients(zip(grads, variables))
        ref.step([np.asarray(g, np.float32) for g in grads])
        expected = [grads[k] for k in large if grads[k].dtype == np.float32 and grads[k].flags.c_contiguous]
        assert _in_place(opt) == _where(*expected), step
        for backing, before in backings:
            np.testing.assert_array_equal(backing, before)
        for v, want in zip(variables, ref.p):
            np.testing.assert_allclose(v.numpy(), want, rtol=2e-5, atol=2e-6, err_msg=f"{v.name} {step}")
    assert len(opt._groups) == 5 and len(opt._prepared) == 1 and opt.device_calls == 5   # 3 own + 2 small


def test_variable_gradients_are_read_where_they_lie():
    """A gradient that is an ireeopt.Variable (say, accumulated on the device) is read from
    its buffer (no host copy first); a large one is passed in place like a numpy array."""
    rng, var, opt, ref = _one_variable(6)
    for _ in range(2):
        g = rng.standard_normal(N).astype(np.float32)
        accumulated = ireeopt.Variable(g, name="grad")
        (checked, _), = opt._validate_pairs([(accumulated, var)])
        assert np.shares_memory(checked, accumulated._buffer.host)     # its buffer, not a host copy
        opt.apply_gradients([(accumulated, var)])
        ref.step([g])
        np.testing.assert_array_equal(accumulated.numpy(), g)
    np.testing.assert_allclose(var.numpy(), ref.p[0], rtol=2e-5, atol=2e-6)


def test_halves_tile_gives_each_worker_one_run():
    """A tile of a multiple of 16 elements that covers a step in exactly ``workers`` runs
    (the last one shorter), from HALVES_MIN_PARAMS to HALVES_MAX_PARAMS, for 2 or more workers."""
    for params in (HALVES_MIN_PARAMS, HALVES_MIN_PARAMS + 5, 3_000_001, HALVES_MAX_PARAMS):
        for workers in (2, 3, 16):
            tile = halves_tile(params, workers)
            assert tile % 16 == 0 and -(-params // tile) == workers, (params, workers)
    assert halves_tile(HALVES_MIN_PARAMS - 1, 2) is None and halves_tile(HALVES_MAX_PARAMS + 1, 2) is None
    assert halves_tile(HALVES_MIN_PARAMS, 1) is None
    with pytest.raises(ValueError, match="multiple of 16"):
        tuning_spec(1000)


@pytest.mark.parametrize("kind, kwargs", [("adam", {}), ("adamw", {"weight_decay": 0.1}), ("adamax", {}),
                                          ("adam", {"use_ema": True, "clipvalue": 0.5, "amsgrad": True})])
def test_a_one_variable_step_of_millions_of_parameters_has_one_workgroup_a_worker(kind, kwargs):
    """A model of one float32 variable of HALVES_MIN_PARAMS + 5 parameters: its step on
    local-task is compiled with ``halves_tile`` (one workgroup a local-task worker, the last one peeled: not a multiple
    of 16), and every step matches the reference (values, slots, EMA average)."""
    n = HALVES_MIN_PARAMS + 5
    rng = np.random.default_rng(31)
    init = [rng.standard_normal(n).astype(np.float32)]
    variables = [ireeopt.Variable(init[0], name="w0")]
    opt = {"adam": ireeopt.Adam, "adamw": ireeopt.AdamW, "adamax": ireeopt.Adamax}[kind](learning_rate=0.01, **kwargs)
    ref = Reference(kind, init, ["w0"], learning_rate=0.01, **kwargs)
    opt.build(variables)
    (prepared,) = opt._prepared.values()
    assert prepared.module.loaded.device.driver == "local-task"
    workers = cores.task_workers()
    assert workers >= 1 and prepared.module.tile == halves_tile(n, workers)
    for _ in range(3):
        grads = [rng.standard_normal(n).astype(np.float32)]
        opt.apply_gradients(zip(grads, variables))
        ref.step(grads)
    np.testing.assert_allclose(variables[0].numpy(), ref.p[0], rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(opt._slots["m"][0].numpy(), ref.m[0], rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(opt._slots["v" if kind != "adamax" else "u"][0].numpy(), ref.v[0], rtol=2e-5, atol=1e-7)
    if kwargs.get("use_ema"):
        np.testing.assert_allclose(opt._averages[0].numpy(), ref.avg[0], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("spin_s", [None, 0.0])
def test_fenced_steps_return_when_done(monkeypatch, spin_s):
    """The runtime's llvm-cpu steps are queued with a signal fence and waited for by the
    runtime (runtime/module.py): by sleeping until shortly before the expected end, then
    polling with the core yielded (a short step: only that), or, with no such margin
    (``SPIN_S`` 0, forced here), by sleeping for all of it and then polling with short sleeps;
    every step has finished when the call returns, so the values read right after match the
    reference."""
    from ireeopt.runtime import module

    if spin_s is not None:
        monkeypatch.setattr(module, "SPIN_S", spin_s)
    rng, variables, opt, ref = _model(8, [(1 << 19,), (33,)])
    opt.build(variables)
    (prepared,) = opt._prepared.values()
    assert prepared.module.fenced and prepared.module.loaded.device.driver == "local-task"
    before = prepared.module._timeline.value          # (the module is shared by every optimizer of this structure)
    for _ in range(4):
        grads = [rng.standard_normal(v.shape).astype(np.float32) for v in variables]
        opt.apply_gradients(zip(grads, variables))
        assert prepared.module._timeline.semaphore.query() == prepared.module._timeline.value    # signalled: done
        ref.step(grads)
        for v, want in zip(variables, ref.p):
            np.testing.assert_allclose(v.numpy(), want, rtol=2e-5, atol=2e-6, err_msg=v.name)
    assert prepared.module._timeline.semaphore.query() == prepared.module._timeline.value == before + 4   # one signal per step


class _Clock:
    """A clock that only sleeps and yields move, and a step that is done at ``end``."""

    def __init__(self, end, late=0.0):
        self.now, self.end, self.late = 0.0, end, late

    def perf_counter(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds + (self.late if seconds > 1e-3 else 0.0)    # the long sleep wakes late

    def tick(self):
        self.now += 5e-6


class _Semaphore:
    def __init__(self, clock, timeline):
        self.clock, self.timeline = clock, timeline

    def query(self):
        return self.timeline.value - (self.clock.now < self.clock.end)


@pytest.mark.parametrize("expected, end, late, want", [
    (0.2, 0.003, 0.0, 0.5 * (0.2 - SPIN_S)),      # done at an on-time wake: overslept, halved
    (0.2, 0.003, 0.003, 0.2 - SPIN_S + 0.003),     # done at a late wake: says nothing, kept
    (0.002, 0.010, 0.0, 0.010),                     # not done at the wake: the time it took
    (0.0, 0.004, 0.0, 0.004),                       # no expectation yet (a first step)
])
def test_the_fenced_wait_expects_what_the_last_step_took_or_half_after_an_oversleep(
        monkeypatch, expected, end, late, want):
    """The rule of ``_Timeline.wait`` on a clock of its own (no timing of this machine): the
    next expectation is the time waited, halved when the step was found done at a wake-up
    on time (it overslept), not at a late one (the workers may have held the cores)."""
    clock = _Clock(end, late)
    monkeypatch.setattr(step_module, "time", clock)
    monkeypatch.setattr(step_module, "_yield", clock.tick)
    timeline = object.__new__(step_module._Timeline)
    timeline.value, timeline._expected = 1, expected
    timeline.semaphores = [_Semaphore(clock, timeline)]
    timeline.wait(0.0)
    assert clock.now >= end and timeline.done()
    assert timeline._expected == pytest.approx(want, rel=0.02)


def test_a_fenced_wait_that_overslept_expects_less_next_time():
    """After a slow step (a first one, say) the sleeping wait would oversleep every later
    step by its expectation; finding the step done when it wakes on time, it halves the
    expectation, so it is back near the real duration within a few steps.  A wake-up that
    was late (another process had the core) keeps the expectation that step, so this allows
    twelve steps for what takes four on an idle machine."""
    rng, variables, opt, ref = _model(9, [(1 << 22,)])
    opt.build(variables)
    (prepared,) = opt._prepared.values()
    prepared.module._timeline._expected = 0.2                        # 200 ms, for a step of a few ms
    expected = []
    for _ in range(12):
        grads = [rng.standard_normal(v.shape).astype(np.float32) for v in variables]
        opt.apply_gradients(zip(grads, variables))
        ref.step(grads)
        expected.append(prepared.module._timeline._expected)
    assert min(expected[:6]) < 0.15 and expected[-1] < 0.05, expected    # (without the cut: ~200 ms)
    np.testing.assert_allclose(variables[0].numpy(), ref.p[0], rtol=2e-5, atol=2e-6)


def test_iree_array_gradients_are_read_where_they_lie():
    """A gradient that is an IREE DeviceArray (of a CPU driver, host-visible) is mapped, not
    copied to the host, and a large one is then bound where it lies like a numpy array."""
    import iree.runtime as rt

    from ireeopt.runtime.device import Device

    rng, var, opt, ref = _one_variable(10)
    device = Device.get("local-sync").hal_device
    for _ in range(2):
        g = rng.standard_normal(N).astype(np.float32)
        array = rt.asdevicearray(device, g)
        (checked, _), = opt._validate_pairs([(array, var)])
        assert not checked.flags.owndata                          # a mapping of the device buffer
        opt.apply_gradients([(array, var)])
        ref.step([g])
        assert _in_place(opt) == _where(checked)
    np.testing.assert_allclose(var.numpy(), ref.p[0], rtol=2e-5, atol=2e-6)


def test_gradient_imports_are_kept_by_address_and_do_not_keep_arrays_alive():
    """A new array object over memory an earlier gradient used (as fresh gradients often
    reuse freed memory) is bound through the import already made, and reads its current
    contents; the optimizer does not keep a caller's gradient array alive."""
    import gc
    import weakref

    rng, var, opt, ref = _one_variable(11)
    backing = np.empty(N, np.float32)
    imports = set()
    for _ in range(3):
        grad = backing[:]                                     # a new object, the same memory
        grad[:] = rng.standard_normal(N)
        opt.apply_gradients([(grad, var)])
        ref.step([grad.copy()])
        (prepared,) = opt._prepared.values()
        imports.add(id(prepared.bindings.bound[0]))
        assert _in_place(opt) == _where(backing)
    assert len(imports) == 1                                  # one import, found by address
    np.testing.assert_allclose(var.numpy(), ref.p[0], rtol=2e-5, atol=2e-6)
    lone = rng.standard_normal(N).astype(np.float32)
    opt.apply_gradients([(lone, var)])
    ref.step([lone])
    alive = weakref.ref(lone)
    del lone
    gc.collect()
    assert alive() is None


@pytest.mark.parametrize("kwargs", [{"weight_decay": 0.1}, {"clipvalue": 0.01, "amsgrad": True},
                                    {"use_ema": True, "ema_overwrite_frequency": 2}, {"clipnorm": 0.5},
                                    {"global_clipnorm": 1.0, "weight_decay": 0.1}])
def test_many_large_variables_are_updated_by_a_chain_of_length_generic_steps(kwargs):
    """With more than CHAIN_MIN_GROUPS large variables, they are updated CHAIN_WIDTH a call
    (the last call padded) by one step compiled for 1-D variables of any length per
    weight-decay setting, chained after the small variables' step (runtime/groups.py), and the
    padding stays zeros: the values match the reference, every gradient is read where it
    lies and nothing next to it, each weight-decay setting gets calls of its own, and every
    call signals a semaphore of its own once a step.  Under clipnorm the small variables
    are updated through their slices (each clipped by its own norm), not their group; under
    both clippings by a norm the norms of the large ones' gradients are computed on the host
    and given to the steps (the first steps' gradients are large, so that the clipping is
    felt, in the first moments: Adam's update is blind to a scale common to all steps)."""
    from ireeopt.runtime import groups

    sizes = [N + 3 * k for k in range(12)]          # 12 own groups, of 12 different lengths
    shapes = [(s,) for s in sizes] + [(7, 3), (300,)]
    rng, variables, opt, _ = _model(11, shapes)
    init = [v.numpy() for v in variables]
    opt = ireeopt.AdamW(learning_rate=0.01, **kwargs) if "weight_decay" in kwargs else \
        ireeopt.Adam(learning_rate=0.01, **kwargs)
    ref = Reference("adamw" if "weight_decay" in kwargs else "adam", init, [v.name for v in variables],
                    learning_rate=0.01, exclude_names=("w3",), **kwargs)
    opt.exclude_from_weight_decay(var_names=["w3"])
    for step in range(4):
        grads, backings = [], []
        for k, s in enumerate(shapes):
            backing, g = _poisoned(rng.standard_normal(size_of(s)).astype(np.float32) * (50 if step < 2 else 0.01),
                                   k + step)
            grads.append(g.reshape(s))
            backings.append((backing, backing.copy()))
        opt.apply_gradients(zip(grads, variables))
        ref.step(grads)
        assert _in_place(opt) == _where(*grads[:12])
        for backing, before in backings:
            np.testing.assert_array_equal(backing, before)
        for v, want in zip(variables, ref.p):
            np.testing.assert_allclose(v.numpy(), want, rtol=2e-5, atol=2e-6, err_msg=f"{v.name} {step}")
        for k, want in enumerate(ref.m):           # (scaled by a clipping that Adam's update is blind to)
            np.testing.assert_allclose(opt._slots["m"][k].numpy(), want, rtol=2e-5, atol=2e-6 * np.abs(want).max())
    (prepared,) = opt._prepared.values()
    chain = prepared.module
    widths = [len(module.spec.variables) for module, _ in chain.calls]
    # the small variables' step (one group, or under clipnorm their two slices), then the
    # other large ones (8, then 3 and 5 padding) and, excluded from weight decay, w3 (and 7)
    assert widths == [2 if "clipnorm" in kwargs else 1, 8, 8, 8], widths
    # every step is one of any lengths, but that over the small variables' slices (clipnorm)
    assert all(module.spec.dynamic for module, _ in chain.calls[1:])
    assert chain.calls[0][0].spec.dynamic == ("clipnorm" not in kwargs)
    steps = {id(module) for module, _ in chain.calls[1:]}
    assert len(steps) == (2 if "weight_decay" in kwargs else 1)
    # padding positions 1-7, each with its own parameters, gradient, slots, average, norm
    kinds = 2 + len(opt._slot_names) + opt.use_ema + ("clipnorm" in kwargs)
    assert sorted({k for _, k, _ in opt._pads}) == list(range(1, 8)) and len(opt._pads) == 7 * kinds
    for pad in opt._pads.values():
        np.testing.assert_array_equal(pad.host, 0)
    # clipping by a norm: the large ones' norms are given (computed on the host); the small
    # ones' slices compute theirs under clipnorm, their group's is given under global_clipnorm
    given = [module.spec.norms for module, _ in chain.calls]
    if "clipnorm" in kwargs:
        assert given == [None] + ["given"] * 3
    else:
        assert given == ["given" if "global_clipnorm" in kwargs else None] * 4
    # every call signals a semaphore of its own, once a step
    assert [s.query() for s in chain._timeline.semaphores] == [chain._timeline.value] * len(widths) == [4] * 4
    assert groups.CHAIN_MIN_GROUPS < 12 and chain_width(11) == CHAIN_WIDTH == 8


@pytest.mark.parametrize("kwargs", [{}, {"global_clipnorm": 1.0}])
def test_a_chain_of_more_than_32_large_variables_updates_them_32_a_call(kwargs):
    """A weight-decay class of more than WIDE_CHAIN_WIDTH large variables is updated
    WIDE_CHAIN_WIDTH a call (fewer calls, each of which costs the caller ~10 us whatever its
    width: runtime/groups.py ``_chained``), the last call padded: 35 large variables in two
    calls of 32, after the small variables' step; the values match the reference, every
    gradient is read where it lies, and the padding stays zeros.  (The large gradients of
    the first steps are large, so that global_clipnorm is felt in the first moments.)"""
    assert chain_width(WIDE_CHAIN_WIDTH) == CHAIN_WIDTH and chain_width(WIDE_CHAIN_WIDTH + 1) == WIDE_CHAIN_WIDTH
    large = WIDE_CHAIN_WIDTH + 3
    shapes = [(N + 7 * k,) for k in range(large)] + [(5, 3)]
    rng = np.random.default_rng(14)
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    variables = [ireeopt.Variable(x, name=f"w{i}") for i, x in enumerate(init)]
    opt = ireeopt.Adam(learning_rate=0.01, **kwargs)
    ref = Reference("adam", init, [v.name for v in variables], learning_rate=0.01, **kwargs)
    for step in range(3):
        grads = [rng.standard_normal(s).astype(np.float32) * (50 if step < 2 else 0.01) for s in shapes]
        opt.apply_gradients(zip(grads, variables))
        ref.step(grads)
        assert _in_place(opt) == _where(*grads[:large])
        for v, want in zip(variables, ref.p):
            np.testing.assert_allclose(v.numpy(), want, rtol=2e-5, atol=2e-6, err_msg=f"{v.name} {step}")
        for k, want in enumerate(ref.m):
            np.testing.assert_allclose(opt._slots["m"][k].numpy(), want, rtol=2e-5, atol=2e-6 * np.abs(want).max())
    (prepared,) = opt._prepared.values()
    chain = prepared.module
    assert [len(module.spec.variables) for module, _ in chain.calls] == [1, WIDE_CHAIN_WIDTH, WIDE_CHAIN_WIDTH]
    assert chain.calls[1][0] is chain.calls[2][0]          # (one compiled step of 32)
    assert sorted({k for _, k, _ in opt._pads}) == list(range(large - WIDE_CHAIN_WIDTH, WIDE_CHAIN_WIDTH))
    for pad in opt._pads.values():
        np.testing.assert_array_equal(pad.host, 0)
    assert [s.query() for s in chain._timeline.semaphores] == [3] * 3


def test_a_repeated_chain_step_binds_or_copies_each_large_gradient_as_it_goes(monkeypatch):
    """A repeated step of a chain of float32 gradients binds each call's large gradients just
    before that call is queued (``flat.ChainBindings.bind_each``): C-contiguous ones where
    they lie, strided ones copied into their staging first; with a float64 gradient among
    them all are staged and bound first (the copies over the cores).  Mixes that change from
    step to step: the values match the reference and only the float32 contiguous ones are bound."""
    shapes = [(N + 5 * k,) for k in range(11)] + [(6, 4)]
    rng, variables, opt, ref = _model(12, shapes)

    def gradients(step):
        grads = []
        for k, s in enumerate(shapes):
            g = rng.standard_normal(s).astype(np.float32)
            if k < 11 and (k + step) % 3 == 0 and step % 3 == 1:
                wide = np.zeros(2 * g.size, np.float32)
                wide[::2] = g
                g = wide[::2]                                       # a strided view
                assert not g.flags.c_contiguous
            elif k < 11 and (k + step) % 3 == 0 and step % 3 == 2:
                g = g.astype(np.float64)
            grads.append(g)
        return grads

    for step in range(6):
        grads = gradients(step)
        opt.apply_gradients(zip(grads, variables))
        ref.step(grads)
        if step:        # (the first step takes the general path; the rest the repeated one)
            assert opt._repeat_steps
        assert _in_place(opt) == _where(*[g for g in grads[:11] if flat.in_place(g)])
        for v, want in zip(variables, ref.p):
            np.testing.assert_allclose(v.numpy(), want, rtol=2e-5, atol=2e-6, err_msg=f"{v.name} {step}")
    (prepared,) = opt._prepared.values()
    assert isinstance(prepared.module, StepChain) and isinstance(prepared.bindings, flat.ChainBindings)
    # two more steps, recorded: float32 (strided ones among them), each call bound, then
    # queued, before the next is bound; with float64 ones, all bound first
    events, bind = [], flat.GradientBindings.bind
    monkeypatch.setattr(flat.GradientBindings, "bind", lambda self, sources: events.append("bind") or bind(self, sources))

    class Recorded:
        def __init__(self, context):
            self.context = context

        def invoke(self, *args):
            events.append("invoke")
            return self.context.invoke(*args)

    for module in {id(m): m for m, _ in prepared.module.calls}.values():
        monkeypatch.setattr(module, "context", Recorded(module.context))
    calls = len(prepared.module.calls)
    for step, order in ((7, ["bind", "invoke"] * calls), (8, ["bind"] * calls + ["invoke"] * calls)):
        grads = gradients(step)
        events.clear()
        opt.apply_gradients(zip(grads, variables))
        ref.step(grads)
        assert events == order, step
        for v, want in zip(variables, ref.p):
            np.testing.assert_allclose(v.numpy(), want, rtol=2e-5, atol=2e-6, err_msg=f"{v.name} {step}")


def test_a_chain_call_that_fails_to_queue_waits_for_those_queued_before_it(monkeypatch):
    """When a call of a chain fails to queue, the step raises once the calls queued before it
    are done (none of them still runs when a later step starts), and the next step runs:
    each call signals a semaphore of its own (runtime/module.py), so none waits for a value
    the failed call never signalled."""
    from ireeopt.runtime import module

    settled, settle = [], module._Timeline.settle
    monkeypatch.setattr(module._Timeline, "settle", lambda self, count: (settled.append(count), settle(self, count)))
    rng, variables, opt, _ = _model(15, [(N + k,) for k in range(17)] + [(5,)])
    opt.build(variables)
    (prepared,) = opt._prepared.values()
    chain = prepared.module
    assert [len(module.spec.variables) for module, _ in chain.calls] == [1, 8, 8, 8]
    wide = chain.calls[1][0]                        # (the 8-variable calls' module, shared by all three)

    class Failing:                                  # (a VM context whose invoke fails)
        def invoke(self, *args):
            raise RuntimeError("could not queue the call")

    grads = [rng.standard_normal(v.shape).astype(np.float32) for v in variables]
    context, wide.context = wide.context, Failing()
    try:
        with pytest.raises(RuntimeError, match="could not queue"):
            opt.apply_gradients(zip(grads, variables))
        timeline = chain._timeline
        assert settled == [1]                       # waited for the one call queued before
        assert timeline.semaphores[0].query() == timeline.value        # the small variables' call: done
        assert all(s.query() == timeline.value - 1 for s in timeline.semaphores[1:])
        assert opt.iterations == 0
    finally:
        wide.context = context
    opt.apply_gradients(zip(grads, variables))
    assert [s.query() for s in chain._timeline.semaphores] == [chain._timeline.value] * 4
    assert opt.iterations == 1


def test_length_generic_steps_are_shared_by_models_of_other_sizes():
    """The chain's steps depend on the optimizer's settings and the number of variables a
    call, not on their lengths: a model of other sizes reuses the compiled steps."""
    def chain_modules(sizes):
        _, variables, opt, _ = _model(12, [(s,) for s in sizes])
        opt.build(variables)
        (prepared,) = opt._prepared.values()
        return [module for module, _ in prepared.module.calls]

    first = chain_modules([N + k for k in range(9)])
    second = chain_modules([2 * N + 5 * k for k in range(9)])
    assert [len(m.spec.variables) for m in first] == [8, 8] and first[0] is first[1]
    assert all(a is b for a, b in zip(first, second))


def test_chains_sharing_compiled_steps_run_from_two_threads():
    """Two optimizers of the same structure share the chain's compiled steps (and their VM
    contexts); stepping both at once from two threads gives each its reference values."""
    import threading

    runs = []
    for seed in (13, 14):
        rng, variables, opt, ref = _model(seed, [(N + k,) for k in range(9)])
        opt.build(variables)
        runs.append((rng, variables, opt, ref, [[rng.standard_normal(v.shape).astype(np.float32)
                                                  for v in variables] for _ in range(6)]))
    first, second = ([m for m, _ in r[2]._prepared[next(iter(r[2]._prepared))].module.calls] for r in runs)
    assert all(a is b for a, b in zip(first, second))

    def train(run):
        _, variables, opt, _, steps = run
        for grads in steps:
            opt.apply_gradients(zip(grads, variables))

    threads = [threading.Thread(target=train, args=(run,)) for run in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for _, variables, opt, ref, steps in runs:
        for grads in steps:
            ref.step(grads)
        assert opt.iterations == 6
        for v, want in zip(variables, ref.p):
            np.testing.assert_allclose(v.numpy(), want, rtol=2e-5, atol=2e-6, err_msg=v.name)


@pytest.mark.parametrize("large", [3, 12])
@pytest.mark.parametrize("kwargs", [{"global_clipnorm": 1.0}, {"use_ema": True, "ema_overwrite_frequency": 2,
                                                               "amsgrad": True}, {"clipnorm": 0.5}])
def test_a_step_without_some_gradients_runs_the_group_step_and_leaves_those_untouched(large, kwargs):
    """Variables that get no gradient in a step are not moved to the one-dispatch-per-variable
    path: the group step (or chain) runs with zero gradients for them, and their state is
    written back after it, bit for bit.  Their stale staging would otherwise leak into a
    global norm: the gradients of the steps before are made large to show it."""
    from ireeopt.runtime import groups

    shapes = [(N + 3 * k,) for k in range(large)] + [(7, 3), (300,), (40,)]
    rng, variables, _, _ = _model(21, shapes)
    init = [v.numpy() for v in variables]
    opt = ireeopt.Adam(learning_rate=0.01, **kwargs)
    ref = Reference("adam", init, [v.name for v in variables], learning_rate=0.01, **kwargs)
    # step -> variables without a gradient (None; from step 5 on left out of the list)
    missing = {2: {1, large}, 3: {0, large + 2}, 4: {1, large}, 5: {2}, 6: {2}, 7: {2}}
    for step in range(9):
        grads = [rng.standard_normal(s).astype(np.float32) * (100 if step < 2 else 1) for s in shapes]
        gone = missing.get(step, set())
        grads = [None if k in gone else g for k, g in enumerate(grads)]
        state = {k: [variables[k].numpy()] + [opt._slots[s][k].numpy() for s in opt._slot_names] +
                 ([opt._averages[k].numpy()] if opt.use_ema else []) for k in gone}
        calls = opt.device_calls
        if step >= 5:
            opt.apply_gradients([(g, v) for g, v in zip(grads, variables) if g is not None])
        else:
            with pytest.warns(UserWarning, match="Gradients do not exist") if gone else _no_warning():
                opt.apply_gradients(zip(grads, variables))
        ref.step(grads)
        assert opt.device_calls == calls + 1
        for k, before in state.items():
            after = [variables[k].numpy()] + [opt._slots[s][k].numpy() for s in opt._slot_names] + \
                ([opt._averages[k].numpy()] if opt.use_ema else [])
            for b, a in zip(before, after):
                np.testing.assert_array_equal(a, b, err_msg=f"{variables[k].name} at step {step}")
        for v, want in zip(variables, ref.p):
            np.testing.assert_allclose(v.numpy(), want, rtol=2e-5, atol=2e-6, err_msg=f"{v.name} {step}")
    if "clipnorm" in kwargs and large <= groups.CHAIN_MIN_GROUPS:
        assert "groups" not in [key[0] for key in opt._prepared]   # clipnorm: every step per variable
    else:
        assert [key[0] for key in opt._prepared] == ["groups"]  # no step over some variables was made


def _no_warning():
    import contextlib
    return contextlib.nullcontext()


@pytest.mark.parametrize("n", [1 << 21, (1 << 21) + 3, (1 << 22) + 5])
@pytest.mark.parametrize("kwargs", [{"clipnorm": 1.0}, {"global_clipnorm": 1.0}])
def test_the_norm_of_a_large_gradient_is_summed_to_float32_rounding(kwargs, n):
    """Clipping's squared norm in the compiled step, summed by rows (kernels/clipping.py) of
    4,096, of 295 (which divides 2^21 + 3), and of 4,096 over all but the last 5 elements
    (2^22 + 5 has no divisor to sum by): the first moment, which carries the clipped
    gradient as it is, matches the float64 reference to 1e-6.  Summed along the one axis it
    was 0.2% off at 2^22."""
    from ireeopt.kernels.clipping import norm_row

    assert norm_row(n) == {1 << 21: 4096, (1 << 21) + 3: 295}.get(n)
    rng, (var,), _, _ = _model(31, [(n,)])
    opt = ireeopt.Adam(learning_rate=0.01, **kwargs)
    ref = Reference("adam", [var.numpy()], ["w0"], learning_rate=0.01, **kwargs)
    grad = (rng.standard_normal(n) + 3).astype(np.float32)
    opt.apply_gradients([(grad, var)])
    ref.step([grad])
    np.testing.assert_allclose(opt._slots["m"][0].numpy(), ref.m[0], rtol=1e-6, atol=0)


def test_a_chain_follows_its_clipping_when_it_changes_between_steps():
    """Each clipping setting has its own chain (compiled once, kept); switching back and forth
    between them, each chain is given the norms of this step's gradients."""
    shapes = [(N + 3 * k,) for k in range(10)] + [(7, 3)]
    rng, variables, _, _ = _model(41, shapes)
    opt = ireeopt.Adam(learning_rate=0.01, clipnorm=1.0)
    ref = Reference("adam", [v.numpy() for v in variables], [v.name for v in variables], learning_rate=0.01,
                    clipnorm=1.0)
    for step, (clipnorm, global_clipnorm) in enumerate([(1.0, None), (None, 2.0), (0.5, None), (None, None),
                                                        (None, 1.0), (1.0, None)]):
        opt.clipnorm, opt.global_clipnorm = clipnorm, global_clipnorm
        ref.clipnorm, ref.global_clipnorm = clipnorm, global_clipnorm
        grads = [rng.standard_normal(s).astype(np.float32) * (1 + 20 * (step % 2)) for s in shapes]
        opt.apply_gradients(zip(grads, variables))
        ref.step(grads)
        for k, want in enumerate(ref.m):
            np.testing.assert_allclose(opt._slots["m"][k].numpy(), want, rtol=2e-5, atol=2e-6 * np.abs(want).max(),
                                       err_msg=f"{variables[k].name} at step {step}")
    assert len(opt._prepared) == 3 and all(isinstance(p.module, StepChain) for p in opt._prepared.values())


@pytest.mark.parametrize("fails", [False, True])
def test_a_large_model_is_moved_into_its_arenas_while_its_step_compiles(fails, monkeypatch):
    """From flat.PARALLEL_MIN_BYTES on, the arenas are written (zeros, the variables' values)
    on a thread while the step compiles, and that is done when ``build`` returns, also when
    the compile fails: values, slots and averages are as they should be, and the first step
    matches the reference."""
    import time
    from ireeopt.runtime import cache

    fill = flat.fill

    def slow_fill(fills):               # (still writing when a compile that fails has failed)
        time.sleep(0.3)
        fill(fills)

    monkeypatch.setattr(flat, "fill", slow_fill)
    shapes = [(1 << 19,), (1 << 19,), (300,)]             # 4 MiB of parameters and more
    rng, variables, _, _ = _model(21, shapes)
    init = [v.numpy() for v in variables]
    opt = ireeopt.Adam(learning_rate=0.01, use_ema=True, amsgrad=fails)     # (failing: not compiled yet)
    if fails:
        def no_compiler(specs, target, tiles):
            raise RuntimeError("no compiler here")
        monkeypatch.setattr(cache, "_compile_all", no_compiler)
        with pytest.raises(RuntimeError, match="no compiler here"):
            opt.build(variables)
        assert not opt.built
    else:
        opt.build(variables)
    for v, want in zip(variables, init):
        np.testing.assert_array_equal(v.numpy(), want)
    if fails:
        return
    for k in opt._slot_names:
        assert all(not s.numpy().any() for s in opt._slots[k])
    for a, want in zip(opt._averages, init):
        np.testing.assert_array_equal(a.numpy(), want)
    grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    ref = Reference("adam", init, [v.name for v in variables], learning_rate=0.01, use_ema=True)
    opt.apply_gradients(zip(grads, variables))
    ref.step(grads)
    for v, want in zip(variables, ref.p):
        np.testing.assert_allclose(v.numpy(), want, rtol=2e-5, atol=2e-6)


def test_a_fill_that_fails_on_its_thread_fails_the_build(monkeypatch):
    """What the arenas' fill raises on its thread is raised by ``build`` (not lost with the
    thread), which leaves the optimizer unbuilt."""
    def broken(fills):
        raise MemoryError("no pages left")

    monkeypatch.setattr(flat, "fill", broken)
    _, variables, opt, _ = _model(22, [(1 << 19,), (1 << 19,)])
    with pytest.raises(MemoryError, match="no pages left"):
        opt.build(variables)
    assert not opt.built


def _allocation(array):
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


def test_the_arenas_of_a_kind_lie_in_one_allocation():
    """Every group's arena of one kind of state is carved from one allocation (numpy asks
    for huge pages for it from 4 MiB on; separate arenas of the large variables were too
    small to get them), each on a 64-byte boundary, 2 MiB from 2 MiB on, none overlapping,
    and the model steps exactly as the reference does."""
    sizes = [10, N, 3 << 19, 7, N + 3]
    rng = np.random.default_rng(4)
    values = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    variables = [ireeopt.Variable(v, name=f"v{k}") for k, v in enumerate(values)]
    opt = ireeopt.Adam(0.01)
    ref = Reference("adam", values, [v.name for v in variables], learning_rate=0.01)
    for _ in range(2):
        grads = [rng.standard_normal(n).astype(np.float32) for n in sizes]
        opt.apply_gradients(list(zip(grads, variables)))
        ref.step(grads)
    for k, v in enumerate(variables):
        np.testing.assert_allclose(v.numpy(), ref.p[k], rtol=2e-5, atol=2e-6)
    assert len(opt._group_buffers["params"]) == 4          # the small ones together, three own
    for kind, buffers in opt._group_buffers.items():
        hosts = sorted((b.host for b in buffers), key=lambda h: h.ctypes.data)
        assert len({id(_allocation(h)) for h in hosts}) == 1, kind
        for h in hosts:
            assert h.ctypes.data % (flat.HUGE_PAGE if h.nbytes >= flat.HUGE_PAGE else flat.ALIGN) == 0, kind
        for a, b in zip(hosts, hosts[1:]):
            assert a.ctypes.data + a.nbytes <= b.ctypes.data, kind
