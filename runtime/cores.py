"""Whether other threads of this process take the cores, and which form of a step runs then.

On device ``cpu`` a step over TASK_MIN_PARAMS parameters or more runs on IREE's local-task
workers, one per core (runtime/groups.py; from TWIN_MIN_PARAMS to TWIN_MAX_PARAMS with a
twin).  When other threads of the process are busy as the step starts, a core is taken:
torch's OpenMP workers spin for several milliseconds after each operation, numpy's BLAS
threads after a product, a data loader works.  The workers then share it with them and the
step waits for the one that is descheduled; running it on the calling thread alone (its
twin on local-sync, over the same memory) can be faster.
Measured here (2 cores), 1 x 2^22 Adam alternating step by step with torch fused: 7.1 ms on
local-task, 4.4-4.6 ms on the calling thread (1 x 2^20 and 1 x 2^24 gained nothing: they
have no twin).  Which form runs such a step is measured (``FormChoice``); a step that starts
with the other threads idle stays on local-task.

"Busy" is read from each thread's CPU clock (Linux's per-thread CPU-time clock: exact,
running or not, ~1-2 us a read) over the caller's own work on the call before the step
(``sample`` at its start, ``cores_taken`` before the step runs: tens of microseconds): a
spinning thread used all of it.  IREE's own threads (named "iree-..."), ireeopt's
(``own_thread``) and the caller are left out.
"""
import math
import os
import threading
import time

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
#: the cores are taken when the other threads used at least this fraction of all cores but
#: one (on 2 cores: half a core) while the call prepared its step
TAKEN_FRACTION = 0.5
#: the process's threads are listed again after this long (s): threads come and go
RELIST_S = 1.0

_TASKS = "/proc/self/task"
#: native ids of ireeopt's own threads, left out (``own_thread``)
_own = set()


def own_thread():
    """Leave the calling thread out from now on: one of ireeopt's own (flat's copy pool,
    which copies a step's large gradients between ``sample`` and ``cores_taken``; Python
    does not give the OS a thread's name, so it is known by its id)."""
    _own.add(threading.get_native_id())


def _cpu_clock(tid):
    """The clock id of thread ``tid``'s CPU time (glibc's MAKE_THREAD_CPUCLOCK)."""
    return ((~tid) << 3) | 6


class _Threads:
    """The threads of this process followed (all but IREE's), listed from /proc (none
    without it) at most every RELIST_S."""

    def __init__(self):
        self.clocks = ()            # ((thread id, its CPU clock id), ...): replaced, never changed
        self._listed = -math.inf    # time.monotonic() of the last listing

    def current(self):
        if time.monotonic() - self._listed >= RELIST_S:
            self._list()
        return self.clocks

    def _list(self):
        self._listed = time.monotonic()
        try:
            tids = {int(t) for t in os.listdir(_TASKS)}
        except OSError:
            tids = set()
        known = {tid for tid, _ in self.clocks}
        clocks = [(tid, clock) for tid, clock in self.clocks if tid in tids]
        for tid in tids - known:
            try:
                with open(f"{_TASKS}/{tid}/comm") as f:
                    if f.read().startswith("iree-"):
                        continue
            except OSError:
                continue
            clocks.append((tid, _cpu_clock(tid)))
        self.clocks = tuple(clocks)


_threads = _Threads()


def task_workers():
    """How many workers IREE's local-task executor has (its threads are named
    "iree-worker-N"), read from /proc once the executor exists; 0 where that cannot be read
    or before."""
    if _workers:
        return _workers[0]
    count = 0
    try:
        for tid in os.listdir(_TASKS):
            try:
                with open(f"{_TASKS}/{tid}/comm") as f:
                    name = f.read().strip()
            except OSError:
                continue
            if name.startswith("iree-worker-") and name[12:].isdigit():
                count = max(count, int(name[12:]) + 1)
    except OSError:
        return 0
    if count:
        _workers.append(count)
    return count


_workers = []


def _cpu(clocks):
    seconds = []
    for _, clock in clocks:
        try:
            seconds.append(time.clock_gettime(clock))
        except OSError:             # the thread has ended
            seconds.append(math.nan)
    return seconds


def sample():
    """The other threads' CPU time now, for ``cores_taken`` (in the same thread)."""
    me = threading.get_native_id()
    clocks = tuple(c for c in _threads.current() if c[0] != me and c[0] not in _own)
    return clocks, time.perf_counter(), _cpu(clocks)


def cores_taken(since):
    """Whether the threads of this process other than the caller (and IREE's) used
    TAKEN_FRACTION or more of all cores but one (on 2 cores: half a core) on average since
    ``since`` (a ``sample``): a step on every core would likely share one with them."""
    clocks, start, before = since
    now = _cpu(clocks)
    wall = time.perf_counter() - start
    used = sum(b - a for a, b in zip(before, now) if b == b and a == a)      # (nan: the thread ended)
    return wall > 0 and used >= TAKEN_FRACTION * max(CORES - 1, 1) * wall


def _median(values):
    return sorted(values)[len(values) // 2]


class FormChoice:
    """Which of a step's two forms runs it when ``cores_taken``: 0, the step itself (on
    local-task), or 1, its twin on the calling thread.  Each form is tried TRIES times (the
    twin first), then the one with the lower median of its last KEEP durations runs, and
    the other again every RETRY-th such step, so that a change of conditions is seen."""

    TRIES, KEEP, RETRY = 2, 5, 10

    def __init__(self):
        self.times = ([], [])        # recent durations (s) of each form when the cores were taken
        self._count = 0

    def pick(self):
        task, alone = self.times
        if len(task) < self.TRIES or len(alone) < self.TRIES:
            return 1 if len(alone) <= len(task) else 0
        self._count += 1
        best = 0 if _median(task) <= _median(alone) else 1
        return 1 - best if self._count % self.RETRY == 0 else best

    def record(self, form, seconds):
        times = self.times[form]
        times.append(seconds)
        del times[:-self.KEEP]
