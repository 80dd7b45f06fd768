"""Steps on device "cpu" while other threads of the process are busy (runtime/cores.py):
they run on local-task as they do with the threads idle (until stop 21 such a step could
run on the calling thread instead: a twin that measured slower, README "Busy threads"), a
one-variable step with one workgroup a worker, and give the reference's values."""
import hashlib
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
def test_steps_while_other_threads_are_busy_stay_on_local_task_and_match_the_reference(tensors, clip):
    """One large variable alone (a group step with one workgroup a worker), or next to a
    small one: two (a group step), ten (a chain of length-generic steps), one clipped by its
    own norm (a step over slices): steps with the other threads idle, then busy, then idle
    again run one prepared step on local-task, and the values and slots are the reference's."""
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
    busy = _Busy()
    try:
        for _ in range(4):
            step()
    finally:
        busy.stop()
    step()
    assert list(opt._prepared.values()) == [prepared] and opt.device_calls == 6
    for v, want in zip(variables, ref.p):
        np.testing.assert_allclose(v.numpy(), want, rtol=2e-5, atol=2e-6, err_msg=v.name)
    for k, want in enumerate(ref.v):
        np.testing.assert_allclose(opt._slots["v"][k].numpy(), want, rtol=2e-5, atol=1e-9)
