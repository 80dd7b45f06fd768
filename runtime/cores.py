"""The cores this process may run on, IREE's local-task workers, and the process's other
running threads.

``CORES`` is what flat's copies split over; ``task_workers()`` is how many workers IREE's
local-task executor has, which a one-variable step's workgroup tile follows
(runtime/groups.py ``halves_tile``); ``others_running()`` says whether a thread of this
process that is neither the caller nor IREE's holds a core now, which a chain step on
device ``cpu`` runs its calls on the calling thread for (runtime/module.py ``StepChain``).

Until stop 21 a step of 2^21 to 2^23 parameters on device ``cpu`` also had a twin on the
calling thread (local-sync), run instead of local-task while other threads of the process
were busy (read from their CPU clocks), chosen by the two forms' measured times.  On this
VM it lost: alternating step by step with torch fused (whose OpenMP workers spin on a core
after its step), 1 x 2^22 with the twin took 1.67-2.00 of torch's step in the host's fast
spells, without it 1.00-1.96; in 14 of 16 pairs of optimizers (two pairs a process) the
one without was faster (README, "Busy threads").  A chain of calls (many large variables)
is different: its first calls run on the calling thread while another thread runs, the rest
on local-task, which measured faster (runtime/module.py ``StepChain``).
"""
import os
import threading

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


_stat_files = {}        # thread id -> an open fd of its /proc stat file
_stat_lock = threading.Lock()


def others_running():
    """Whether a thread of this process other than the calling thread and IREE's own
    ("iree-*") is running or runnable now (state R in /proc: torch's OpenMP workers, say,
    which spin on a core for ~7 ms after each torch step); False where /proc cannot be read.

    Read through stat files kept open (a pread: ~3 us a thread, against ~18 us to open one),
    the thread list read again each call (~5 us)."""
    with _stat_lock:
        return _others_running(str(threading.get_native_id()))


def _others_running(caller):
    try:
        tids = os.listdir(_TASKS)
    except OSError:
        return False
    if len(tids) != len(_stat_files) or any(tid not in _stat_files for tid in tids):
        _reopen(tids)
    for tid, fd in list(_stat_files.items()):
        if tid == caller:
            continue
        try:
            stat = os.pread(fd, 512, 0)
        except OSError:             # (the thread has ended: its id may come back, for another)
            os.close(_stat_files.pop(tid))
            continue
        end = stat.rfind(b")")
        if stat[end + 2:end + 3] == b"R" and not stat[stat.find(b"(") + 1:end].startswith(b"iree-"):
            return True
    return False


def _reopen(tids):
    """Keep a stat fd open for each of the threads ``tids`` (and none for those gone)."""
    for tid in [t for t in _stat_files if t not in tids]:
        os.close(_stat_files.pop(tid))
    for tid in tids:
        if tid not in _stat_files:
            try:
                _stat_files[tid] = os.open(f"{_TASKS}/{tid}/stat", os.O_RDONLY)
            except OSError:
                pass
