"""The cores this process may run on, and IREE's local-task workers.

``CORES`` is what flat's copies split over; ``task_workers()`` is how many workers IREE's
local-task executor has, which a one-variable step's workgroup tile follows
(runtime/groups.py ``halves_tile``).

Until stop 21 a step of 2^21 to 2^23 parameters on device ``cpu`` also had a twin on the
calling thread (local-sync), run instead of local-task while other threads of the process
were busy (read from their CPU clocks), chosen by the two forms' measured times.  On this
VM it lost: alternating step by step with torch fused (whose OpenMP workers spin on a core
after its step), 1 x 2^22 with the twin took 1.67-2.00 of torch's step in the host's fast
spells, without it 1.00-1.96; in 14 of 16 pairs of optimizers (two pairs a process) the
one without was faster (README, "Busy threads").
"""
import os

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

_TASKS = "/proc/self/task"
_workers = []


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
