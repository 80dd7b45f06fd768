"""Steps on device "cpu" while other threads of the process are busy (runtime/cores.py):
such a step may run on the calling thread (its twin on local-sync) instead of local-task,
whichever has been faster then, and either form gives the reference's values."""
import hashlib
import threading
import time

import numpy as np
import pytest

import ireeopt
from ireeopt.runtime import cores
from ireeopt.runtime.groups import TASK_MIN_PARAMS, TWIN_MAX_PARAMS, TWIN_MIN_PARAMS

from .reference import Reference

_DATA = bytes(range(256)) * (1 << 17)          # 32 MiB: hashing it takes tens of ms, GIL released


class _Busy:
    """Threads that keep the cores busy (hashing releases the GIL) until ``stop``: two a
    core, so that they get their share next to any other busy thread of the process."""

    def __init__(self):
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, daemon=True) for _ in range(2 * cores.CORES)]
        for t in self._threads:
            t.start()
        time.sleep(0.05)

    def _work(self):
        while not self._stop.is_set():
            hashlib.sha256(_DATA).digest()

    def stop(self):
        self._stop.set()
        for t in self._threads:
            t.join()


@pytest.fixture
def relisted(monkeypatch):
    """The process's threads are listed at every sample, not once a second (those of
    earlier tests are left out: conftest._own_threads_followed)."""
    monkeypatch.setattr(cores, "RELIST_S", 0.0)


def test_cores_taken_follows_the_other_threads(relisted):
    since = cores.sample()
    time.sleep(0.02)
    assert not cores.cores_taken(since)
    busy = _Busy()
    try:
        since = cores.sample()
        time.sleep(0.02)
        assert cores.cores_taken(since)
        since = cores.sample()
        x = 0
        for i in range(200_000):           # the caller's own work is not counted, the others' is
            x += i
        assert cores.cores_taken(since)
    finally:
        busy.stop()
    since = cores.sample()
    time.sleep(0.02)
    assert not cores.cores_taken(since)


def test_ireeopts_own_threads_do_not_take_the_cores(relisted, monkeypatch):
    """Busy threads of ireeopt's own (flat's copy pool, copying a step's large gradients:
    ``cores.own_thread``) are not other threads taking the cores; others are.  The pool is
    made in the test (conftest leaves out threads that were there before it) and its every
    worker kept busy, one a core but the caller's; the others are two a core, so that they
    get their share next to any thread still running from earlier tests."""
    from ireeopt.runtime import flat

    if cores.CORES < 2:
        pytest.skip("one core: flat copies on the calling thread alone, it has no pool")
    monkeypatch.setattr(flat, "_pool", [])
    try:
        for own, taken in ((True, False), (False, True)):
            stop = threading.Event()

            def work():
                while not stop.is_set():
                    hashlib.sha256(_DATA).digest()

            if own:
                running = [flat._the_pool().submit(work) for _ in range(cores.CORES - 1)]
            else:
                running = [threading.Thread(target=work, daemon=True) for _ in range(2 * cores.CORES)]
                for thread in running:
                    thread.start()
            try:
                time.sleep(0.02)
                since = cores.sample()
                time.sleep(0.1)
                assert cores.cores_taken(since) == taken, own
            finally:
                stop.set()
                for r in running:
                    r.result() if own else r.join()
    finally:                    # the test's own pool, also when an assertion failed
        for pool in flat._pool:
            pool.shutdown()


def test_form_choice_tries_both_then_keeps_the_faster_and_looks_again():
    choice = cores.FormChoice()
    tried = []
    for _ in range(2 * choice.TRIES):               # the twin first, then by turns
        form = choice.pick()
        tried.append(form)
        choice.record(form, 0.004 if form == 1 else 0.007)
    assert tried == [1, 0] * choice.TRIES
    picks = [choice.pick() for _ in range(2 * choice.RETRY)]
    assert picks.count(0) == 2 and picks[choice.RETRY - 1] == picks[-1] == 0 and set(picks) == {0, 1}
    for _ in range(choice.KEEP):                   # conditions change: local-task is faster now
        choice.record(0, 0.003)
    assert choice.pick() == 0
    assert len(choice.times[0]) == choice.KEEP


@pytest.mark.skipif(cores.CORES < 2, reason="one core: while the caller prepares a step no other thread runs")
@pytest.mark.parametrize("tensors,clip", [(2, "global_clipnorm"), (10, "global_clipnorm"), (1, "clipnorm")])
def test_steps_while_other_threads_are_busy_run_either_form_and_match_the_reference(relisted, tensors, clip):
    """Two large variables (one group step), ten (a chain of length-generic steps), or one
    clipped by its own norm (a step over slices): with the other threads busy, each form
    runs (the twin on local-sync first) and the values are the reference's; with them idle
    the step is back on local-task."""
    rng = np.random.default_rng(5)
    shapes = [(TWIN_MIN_PARAMS // tensors + 16 * k + 3,) for k in range(tensors)] + [(4, 3)]
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    variables = [ireeopt.Variable(x, name=f"w{i}") for i, x in enumerate(init)]
    opt = ireeopt.Adam(learning_rate=0.01, **{clip: 50.0})
    ref = Reference("adam", init, [v.name for v in variables], learning_rate=0.01, **{clip: 50.0})

    def step():
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        opt.apply_gradients(zip(grads, variables))
        ref.step(grads)

    step()
    (prepared,) = opt._prepared.values()
    twin = prepared.twin
    assert _drivers(prepared) == {"local-task"} and _drivers(twin) == {"local-sync"}
    _steps_until_both_forms_ran(prepared, step)
    for _ in range(2):
        step()
    assert [len(t) for t in prepared.choice.times] == [cores.FormChoice.TRIES] * 2
    for v, want in zip(variables, ref.p):
        np.testing.assert_allclose(v.numpy(), want, rtol=2e-5, atol=2e-6, err_msg=v.name)
    for k, want in enumerate(ref.v):
        np.testing.assert_allclose(opt._slots["v"][k].numpy(), want, rtol=2e-5, atol=1e-9)


@pytest.mark.skipif(cores.CORES < 2, reason="one core: while the caller prepares a step no other thread runs")
def test_a_step_with_one_workgroup_a_worker_runs_with_iree_tiles_while_other_threads_are_busy(relisted):
    """One variable in the twin's range: its step has one workgroup a local-task worker
    (groups.halves_tile) while the other threads are idle; while they are busy the form
    tried against the twin is the same step with IREE's own tiles (``prepared.contended``:
    a worker that shares its core with a busy thread then takes fewer tiles instead of
    holding up the step), and every form gives the reference's values."""
    rng = np.random.default_rng(6)
    shape = (TWIN_MIN_PARAMS + 3,)
    init = [rng.standard_normal(shape).astype(np.float32)]
    variables = [ireeopt.Variable(init[0], name="w0")]
    opt, ref = ireeopt.Adam(learning_rate=0.01), Reference("adam", init, ["w0"], learning_rate=0.01)

    def step():
        grads = [rng.standard_normal(shape).astype(np.float32)]
        opt.apply_gradients(zip(grads, variables))
        ref.step(grads)

    step()
    (prepared,) = opt._prepared.values()
    if prepared.module.tile is None:
        pytest.skip("local-task has one worker here: no workgroup a worker to replace")
    contended = prepared.contended
    assert contended.module.tile is None and _drivers(contended) == {"local-task"} and not contended.verified
    assert prepared.twin.module.tile == prepared.module.tile and _drivers(prepared.twin) == {"local-sync"}
    _steps_until_both_forms_ran(prepared, step)
    assert contended.verified and prepared.twin.verified           # (each ran, in place)
    np.testing.assert_allclose(variables[0].numpy(), ref.p[0], rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(opt._slots["v"][0].numpy(), ref.v[0], rtol=2e-5, atol=1e-9)


def _steps_until_both_forms_ran(prepared, step):
    """``step()`` while other threads are busy until each form of ``prepared`` ran its
    FormChoice.TRIES (at most 40 steps: a step sees them busy when one runs as it starts,
    most steps, not every one)."""
    busy = _Busy()
    try:
        for _ in range(40):
            step()
            if min(map(len, prepared.choice.times)) == cores.FormChoice.TRIES:
                break
    finally:
        busy.stop()
    assert [len(t) for t in prepared.choice.times] == [cores.FormChoice.TRIES] * 2

def _drivers(prepared):
    chain = getattr(prepared.module, "calls", None)
    modules = [module for module, _ in chain] if chain else [prepared.module]
    return {module.loaded.device.driver for module in modules}


@pytest.mark.parametrize("params", [TASK_MIN_PARAMS, TWIN_MAX_PARAMS + 1])
def test_smaller_and_larger_local_task_steps_have_no_twin(params):
    """Below TWIN_MIN_PARAMS and above TWIN_MAX_PARAMS a step on local-task stays there,
    busy threads or not (measured: no gain there; runtime/groups.py)."""
    var = ireeopt.Variable(np.zeros(params, np.float32))
    opt = ireeopt.Adam()
    opt.apply_gradients([(np.ones(params, np.float32), var)])
    (prepared,) = opt._prepared.values()
    assert prepared.module.loaded.device.driver == "local-task" and prepared.twin is None
    assert not opt._twinned
