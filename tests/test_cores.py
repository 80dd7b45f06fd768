"""Steps on device "cpu" while other threads of the process are busy (runtime/cores.py):
a group step runs on local-task as it does with the threads idle (until stop 21 such a step
could run on the calling thread instead: a twin that measured slower, README "Busy
threads"), a one-variable step with one workgroup a worker; a chain runs its first calls
on the calling thread while another thread runs (runtime/module.py ``StepChain``); all
give the reference's values."""
import hashlib
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import ireeopt
from ireeopt.runtime import cores
from ireeopt.runtime.groups import HALVES_MIN_PARAMS

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


def _drivers(prepared):
    chain = getattr(prepared.module, "calls", None)
    modules = [module for module, _ in chain] if chain else [prepared.module]
    return {module.loaded.device.driver for module in modules}


@pytest.mark.parametrize("tensors,clip", [(1, None), (2, "global_clipnorm"), (10, "global_clipnorm"),
                                          (1, "clipnorm")])
def test_steps_while_other_threads_are_busy_match_the_reference(tensors, clip):
    """One large variable alone (a group step with one workgroup a worker), or next to a
    small one: two (a group step), ten (a chain of length-generic steps), one clipped by its
    own norm (a step over slices): steps with the other threads idle, then busy, then idle
    again run one prepared step on local-task, but for the chain's calls while the threads
    are busy, which run on its twins on the calling thread (local-sync), and the values and
    slots are the reference's."""
    rng = np.random.default_rng(5)
    shapes = [(HALVES_MIN_PARAMS // tensors + 16 * k + 3,) for k in range(tensors)]
    shapes += [(4, 3)] if tensors > 1 or clip else []       # (a second group: no halves)
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    variables = [ireeopt.Variable(x, name=f"w{i}") for i, x in enumerate(init)]
    kwargs = {clip: 50.0} if clip else {}
    opt = ireeopt.Adam(learning_rate=0.01, **kwargs)
    ref = Reference("adam", init, [v.name for v in variables], learning_rate=0.01, **kwargs)

    def step():
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        opt.apply_gradients(zip(grads, variables))
        ref.step(grads)

    step()
    (prepared,) = opt._prepared.values()
    assert _drivers(prepared) == {"local-task"}
    if tensors == 1 and clip is None and cores.task_workers() > 1:
        assert prepared.module.tile is not None          # one workgroup a worker (groups.halves_tile)
    twins = getattr(prepared.module, "twins", [])
    assert bool(twins) == (tensors == 10) and {t.loaded.device.driver for t in twins} <= {"local-sync"}
    first_ran = twins[0]._timeline.value if twins else None
    busy = _Busy()
    try:
        for _ in range(4):
            step()
    finally:
        busy.stop()
    if twins:           # the first call ran on the caller at each busy step (later ones may have)
        assert twins[0] not in twins[1:] and twins[0]._timeline.value - first_ran == 4
    step()
    assert list(opt._prepared.values()) == [prepared] and opt.device_calls == 6
    for v, want in zip(variables, ref.p):
        np.testing.assert_allclose(v.numpy(), want, rtol=2e-5, atol=2e-6, err_msg=v.name)
    for k, want in enumerate(ref.v):
        np.testing.assert_allclose(opt._slots["v"][k].numpy(), want, rtol=2e-5, atol=1e-9)


def test_others_running_sees_a_running_thread_of_the_process_but_not_the_caller():
    """``cores.others_running`` in a fresh process (here a process that has opened the
    ``vulkan`` device has its driver's polling threads running for good): False with no other
    thread running (the calling thread runs, and does not count), True while two hash (the
    GIL released), False again once they have ended."""
    script = textwrap.dedent("""
        import hashlib, threading, time
        from ireeopt.runtime import cores

        def idle_soon():
            deadline = time.perf_counter() + 5
            while cores.others_running():
                assert time.perf_counter() < deadline, "a thread kept running"
                time.sleep(0.01)

        idle_soon()
        data, stop = bytes(range(256)) * (1 << 17), threading.Event()
        threads = [threading.Thread(target=lambda: [hashlib.sha256(data) for _ in iter(stop.is_set, True)])
                   for _ in range(2)]           # (two: one may wait for the GIL between hashes)
        for thread in threads:
            thread.start()
        time.sleep(0.05)
        seen = [cores.others_running() for _ in range(5)]
        stop.set()
        for thread in threads:
            thread.join()
        idle_soon()
        print(seen)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[True,", "True,", "True,", "True,", "True]"]


@pytest.mark.parametrize("on_caller", [1, 2, 4])
def test_a_chain_splits_its_calls_with_the_calling_thread_while_others_run(monkeypatch, on_caller):
    """A chain on local-task (device "cpu") that starts while another thread runs queues its
    last calls and runs the first ``on_caller`` of its four (here set; all of them: 4) on
    their twins (local-sync) at the same time; the values and slots are bit for bit those of
    a chain that queues every call, and the reference's (weight decay, global_clipnorm: the
    norms given), and a step after them with the other threads idle queues every call."""
    from ireeopt.runtime import groups
    from ireeopt.runtime.module import StepChain

    rng = np.random.default_rng(8)
    shapes = [(groups.TASK_MIN_PARAMS // 16 + 16 * k + 5,) for k in range(20)] + [(6, 5)]
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    kwargs = dict(learning_rate=0.01, weight_decay=0.05, global_clipnorm=3.0)
    twinned = [ireeopt.Variable(x, name=f"w{i}") for i, x in enumerate(init)]
    queued = [ireeopt.Variable(x, name=f"w{i}") for i, x in enumerate(init)]
    opts = ireeopt.AdamW(**kwargs), ireeopt.AdamW(**kwargs)
    ref = Reference("adamw", init, [v.name for v in twinned], **kwargs)
    opts[0].build(twinned)
    (prepared,) = opts[0]._prepared.values()
    chain = prepared.module
    assert [len(module.spec.variables) for module, _ in chain.calls] == [1, 8, 8, 8]
    assert [t.loaded.device.driver for t in chain.twins] == ["local-sync"] * 4
    assert StepChain.caller_calls(4) == 2
    small, wide = chain.twins[0], chain.twins[1]             # (the 8-variable calls share one)
    before = small._timeline.value, wide._timeline.value
    answers = []
    monkeypatch.setattr(cores, "others_running", lambda: answers.pop(0) if answers else False)
    monkeypatch.setattr(StepChain, "caller_calls", staticmethod(lambda n: on_caller))
    for step in range(4):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        opts[1].apply_gradients(zip(grads, queued))
        answers[:] = [step < 3, "unasked"]
        opts[0].apply_gradients(zip(grads, twinned))
        assert answers == ["unasked"]                       # (asked once, as the step starts)
        answers.clear()
        ref.step(grads)
    assert (small._timeline.value - before[0], wide._timeline.value - before[1]) == (3, 3 * (on_caller - 1))
    assert [s.query() for s in chain._timeline.semaphores] == [4] * 4
    for a, b, want in zip(twinned, queued, ref.p):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)
        np.testing.assert_allclose(a.numpy(), want, rtol=2e-5, atol=2e-6, err_msg=a.name)
    for name in ("m", "v"):
        for a, b in zip(opts[0]._slots[name], opts[1]._slots[name]):
            np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_a_split_chain_whose_caller_part_fails_waits_for_the_queued_part(monkeypatch):
    """When a call that a split chain runs on the calling thread fails, the step raises
    once the calls queued on the workers are done (none still runs when a later step
    starts), and the next step runs every call."""
    from ireeopt.runtime import groups, module

    settled, settle = [], module._Timeline.settle
    monkeypatch.setattr(module._Timeline, "settle", lambda self, count: (settled.append(count), settle(self, count)))
    rng = np.random.default_rng(9)
    shapes = [(groups.TASK_MIN_PARAMS // 16 + 16 * k + 3,) for k in range(20)] + [(7,)]
    variables = [ireeopt.Variable(rng.standard_normal(s).astype(np.float32), name=f"w{i}")
                 for i, s in enumerate(shapes)]
    opt = ireeopt.Adam(learning_rate=0.01)
    opt.build(variables)
    (prepared,) = opt._prepared.values()
    chain = prepared.module
    assert len(chain.calls) == 4 and len(chain.twins) == 4
    small = chain.twins[0]

    class Failing:                                  # (a VM context whose invoke fails)
        def invoke(self, *args):
            raise RuntimeError("the call on the caller failed")

    monkeypatch.setattr(cores, "others_running", lambda: True)
    grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    context, small.context = small.context, Failing()
    try:
        with pytest.raises(RuntimeError, match="on the caller failed"):
            opt.apply_gradients(zip(grads, variables))
    finally:
        small.context = context
    timeline = chain._timeline
    assert settled == [4]                           # waited for the last call queued
    assert [s.query() for s in timeline.semaphores] == [0, 0, 1, 1]      # (calls 2 and 3 were queued)
    assert opt.iterations == 0
    monkeypatch.setattr(cores, "others_running", lambda: False)
    opt.apply_gradients(zip(grads, variables))
    assert [s.query() for s in timeline.semaphores] == [2] * 4
    assert opt.iterations == 1
