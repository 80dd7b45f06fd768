"""Compiled step modules loaded on a device, invoked through the VM directly.

The argument list is built once per set of buffers and reused: because every
state argument is donated (``iree.abi.output``), the results are written into
the very buffers passed in, so the next step passes the same list again.  The
high-level ``FunctionInvoker`` is bypassed (it costs ~1 ms per call for
hundreds of arguments).

The runtime's own llvm-cpu steps take a wait and a signal fence (compiler/targets.py
``FENCED``): the call returns once the step is queued, and ``__call__`` waits for it by
sleeping until shortly before its expected end (the last step's duration), then polling
with the core yielded between polls (``_Timeline.wait``).  IREE's own wait spins the calling
thread for much of the step, on a core the local-task workers need: measured here, ~1 ms of
the caller's CPU per 3 ms step at 2^22 parameters (0.1 ms with the sleeping wait) and 2.6 ms
per 4 ms step of 200 x 2^22/200 (0.5 ms).

A ``StepChain`` runs several fenced calls as one step: each waits for the one before, all
are queued before the caller waits (the same way) for the last.  Each call signals a
semaphore of its own, once a step, so a call that fails to queue leaves no value unsignalled
that a later step would wait for: the chain waits for the calls queued before it and raises.
"""
import os
import threading
import time

import iree.runtime as rt
import numpy as np

from . import cores

#: a fenced step is waited for by sleeping until SPIN_S (s) before its expected end, then
#: polling with the core yielded between polls (``os.sched_yield``: a busy worker keeps its
#: core, and the caller runs again as soon as one goes idle) for up to 2 * SPIN_S, then
#: polling POLL_S or ~1% of the time waited apart (a step much slower than the last)
SPIN_S = 300e-6
LATE_WAKE_S = 500e-6
POLL_S = 20e-6
_yield = getattr(os, "sched_yield", None) or (lambda: time.sleep(0))


class LoadedModule:
    """One .vmfb loaded into a VM context on a device."""

    def __init__(self, device, vmfb):
        self.device, self.vmfb = device, vmfb
        self.vm_module = rt.VmModule.copy_buffer(device.vm_instance, vmfb)
        self.context = rt.VmContext(device.vm_instance, modules=[device.hal_module, self.vm_module])

    def step(self, name, spec, n_results=None):
        return StepModule(self, name, spec, n_results)


class PreparedStep:
    """Everything one structure of step needs, made once: the module, its VM argument
    list over persistent buffers, and the gradient staging buffers to fill each step.  The
    module may be a ``StepChain``: ``args`` and ``buffers`` then hold one list per call."""

    def __init__(self, spec, module, args, buffers, grad_buffers):
        self.spec, self.module, self.args = spec, module, args
        self.buffers, self.grad_buffers = buffers, grad_buffers
        self.verified = False
        self.hyper = None              # the buffer its scalars go to, if not the optimizer's own
        self.norms = None              # a chain that is given its gradients' norms: the clip mode
        self.own_norms = {}            # its scalar buffer of each own group's norm (clipnorm)
        self.bindings = None           # group steps with own groups: flat.GradientBindings/ChainBindings
        self.own_of = {}               # a step over slices: {variable index: the own group bound in place}


class _Timeline:
    """The semaphores the fenced calls of one module (one) or of one chain (one a call, each
    call after the one before) signal at ``value``, once each a step, and the wait for the
    last (see the module docstring)."""

    def __init__(self, device, count=1):
        self._device = device
        self.semaphores = [device.hal_device.create_semaphore(0) for _ in range(count)]
        self.value, self._expected = 0, 0.0
        self.lock = threading.Lock()        # (a module, its fences and timeline are shared)

    @property
    def semaphore(self):
        """The semaphore of a single module's calls."""
        (semaphore,) = self.semaphores
        return semaphore

    def add(self):
        """A semaphore for one more call (of a chain)."""
        self.semaphores.append(self._device.hal_device.create_semaphore(0))

    def done(self, count=None):
        """Whether the first ``count`` calls (default all) are done this step: the last of
        them has signalled ``value`` (each ran after the one before)."""
        count = len(self.semaphores) if count is None else count
        return count == 0 or self.semaphores[count - 1].query() >= self.value

    def wait(self, start, learn=True):
        """Wait until the last call's semaphore is signalled at ``value`` by work queued at
        ``start`` (see SPIN_S), which the expectation is kept for; with ``learn`` False, poll
        for it without the expectation, neither used nor changed (a chain split with the
        calling thread, which ran its own part meanwhile).  Not IREE's wait, which spins the
        caller, nor polls by short sleeps alone: on this VM a 20 us sleep took ~105 us
        (README, "A waiting caller")."""
        overslept = False
        if not self.done():
            planned = (self._expected if learn else 0.0) - SPIN_S      # the wake-up, from the start
            rest = planned - (time.perf_counter() - start)
            if rest > 0:
                time.sleep(rest)
                # done at a wake-up on time: overslept; at a late one (the workers held
                # both cores until the step ended) it says nothing about the step
                on_time = time.perf_counter() - start < planned + LATE_WAKE_S
                overslept = on_time and self.done()
            spin_until = time.perf_counter() + 2 * SPIN_S
            while not self.done():
                if time.perf_counter() < spin_until:
                    _yield()
                else:                               # polls ~1% of the time waited apart
                    time.sleep(max(POLL_S, (time.perf_counter() - start) / 100))
        # done before the sleep ended: the step may have got shorter (after a slow first
        # one, say), and the time measured is the sleep's, so the next expectation is halved
        if learn:
            self._expected = (time.perf_counter() - start) * (0.5 if overslept else 1.0)

    def settle(self, count):
        """After a call failed to queue: wait for the ``count`` calls queued before it."""
        while not self.done(count):
            time.sleep(POLL_S)


class StepModule:
    """One exported function (``name``) of a loaded module, for structure ``spec`` (a
    ``StepSpec`` or ``TrainSpec``: its results are its ``donated`` arguments), or with
    ``n_results`` fresh results (the gradient function)."""

    def __init__(self, loaded, name, spec, n_results=None):
        self.loaded, self.spec = loaded, spec
        self.tile = None               # its workgroup tile (compiler/tiles.py), None for IREE's: runtime/cache.py
        self.function = loaded.vm_module.lookup_function(name)
        if self.function is None:
            raise RuntimeError(f"the compiled module has no function {name!r}; recompile it")
        self.context = loaded.context
        self.n_results = len(spec.donated) if n_results is None else n_results
        self.fenced = self.function.reflection.get("iree.abi.model") == "coarse-fences"
        # a step of any lengths: the argument index of each variable's parameters, and an
        # int32 scalar buffer per length passed (made once)
        self._params = [a for a, (kind, *_) in enumerate(spec.arguments()) if kind == "params"] \
            if getattr(spec, "dynamic", False) else None
        self._lengths = {}
        if self.fenced:         # one (empty, so met) wait fence; the signal fence moves along a timeline
            self._wait, self._signal = rt.HalFence(1), rt.HalFence(1)
            self._timeline = _Timeline(loaded.device)

    def arguments(self, buffers, fences=None):
        """A reusable VM argument list for ``buffers`` (DeviceBuffers, in ``spec.arguments()``
        order), after the length of each variable of a step of any lengths (``spec.dynamic``:
        compiler/trace.py); a fenced step's fences are its own, or ``fences`` (wait, signal:
        in a ``StepChain``)."""
        lengths = [self._length(buffers[a].shape[0]) for a in self._params] if self._params else []
        args = rt.VmVariantList(len(lengths) + len(buffers) + 2 * self.fenced)
        for b in lengths + buffers:
            args.push_ref(b.view)
        if self.fenced:
            for fence in fences or (self._wait, self._signal):
                args.push_ref(fence)
        return args

    def _length(self, n):
        if n not in self._lengths:
            buffer = self.loaded.device.allocate((), "int32")
            buffer.write(np.int32(n))
            self.loaded.device.wait()
            self._lengths[n] = buffer
        return self._lengths[n]

    def __call__(self, args):
        """Run the step and return once it is done (its results)."""
        results = rt.VmVariantList(self.n_results)
        if not self.fenced:
            self.context.invoke(self.function, args, results)
            return results
        timeline = self._timeline
        with timeline.lock:
            timeline.value += 1
            self._signal.insert(timeline.semaphore, timeline.value)
            start = time.perf_counter()
            self.context.invoke(self.function, args, results)
            timeline.wait(start)
        return results

    def result_buffers(self, results):
        return [results.get_as_object(i, rt.HalBufferView).get_buffer() for i in range(self.n_results)]

    def in_place(self, results, buffers):
        """Whether the step wrote its results into its donated ``buffers``."""
        return self.result_buffers(results) == [buffers[i].buffer for i in self.spec.donated]


class StepChain:
    """Fenced steps (``StepModule``s of one device) run one after another as one step: each
    call waits on the previous one's signal, all are queued before the caller waits, once,
    for the last (so the workers go from one to the next without the caller in between).

    With ``twins`` (the same steps on local-sync, for a chain on local-task that device
    ``cpu`` chose): when another thread of the process is running as the step starts
    (``cores.others_running``: torch's OpenMP workers spin on a core for ~7 ms after its
    step), the last calls (all but ``caller_calls(n)`` of the ``n``) are queued first, and the
    calling thread runs the first ones on their twins, one by one, while the workers run the
    rest; the calls update separate variables, so nothing orders the two.  Measured here,
    alternating step by step with torch fused in one process, as ratios to torch's step
    (README, "Busy threads"): 200 x 2^22/200 0.95-0.99 with the calls split so, against
    1.04-1.06 with every call on the caller (until stop 23: the calls on the caller for as
    long as the other thread ran, the rest queued after them); 200 x 2^24/200 1.01-1.02
    against 1.04-1.11."""

    def __init__(self, device):
        self._timeline = _Timeline(device, 0)
        self.calls = []                     # (StepModule, (wait fence, signal fence))
        self.twins = []                     # the twin of each call, if all have one

    @staticmethod
    def caller_calls(n):
        """How many of a chain's ``n`` calls the calling thread runs (the first ones) while
        another thread runs: half (3 of 7 measured best of 2, 3, 4 and 7 at 200 x 2^22/200 and
        200 x 2^24/200; the workers, two threads, take the other half)."""
        return n // 2

    def add(self, module, twin=None):
        """Append a call of ``module`` (with its ``twin`` on the calling thread, if any; all
        calls or none have one); returns the fences its argument lists must pass
        (``StepModule.arguments(buffers, fences)``)."""
        if not module.fenced:
            raise ValueError("only fenced steps can be chained")
        if self.calls and (twin is None) != (not self.twins):
            raise ValueError("every call of a chain or none has a twin")
        self._timeline.add()
        fences = (rt.HalFence(1), rt.HalFence(1))     # (the first call's wait stays empty: met)
        self.calls.append((module, fences))
        if twin is not None:
            self.twins.append(twin)
        return fences

    def __call__(self, arg_lists):
        """Run every call (``arg_lists``: a sequence of one argument list per call, which may
        bind each as it is asked for; with twins, a pair (its list, its twin's list) per
        call) and return once all are done (their result lists, in the calls' order)."""
        timeline, n = self._timeline, len(self.calls)
        on_caller = self.caller_calls(n) if self.twins and cores.others_running() else 0
        out = [None] * n
        with timeline.lock:
            timeline.value += 1
            queued = 0
            try:
                start = time.perf_counter()
                for k in range(on_caller, n):
                    args = arg_lists[k]
                    out[k] = self._queue(k, args[0] if self.twins else args, k > on_caller)
                    queued += 1
                for k in range(on_caller):
                    out[k] = self.twins[k](arg_lists[k][1])      # (done on return)
                    timeline.semaphores[k].signal(timeline.value)
            except BaseException:
                if queued:      # (no call of a later step may overtake them)
                    timeline.settle(on_caller + queued)
                raise
            if queued:
                # (split: the workers' part ran while the caller ran its own, so its time says
                # nothing of a step queued whole, which the expectation is for)
                timeline.wait(start, learn=not on_caller)
        return out

    def _queue(self, k, args, after_previous):
        """Queue call ``k`` (after call ``k - 1`` if ``after_previous``; otherwise its wait
        fence holds nothing or a value of an earlier step, met); returns its result list."""
        module, (wait, signal) = self.calls[k]
        value, semaphores = self._timeline.value, self._timeline.semaphores
        if after_previous:
            wait.insert(semaphores[k - 1], value)      # (the values only grow)
        signal.insert(semaphores[k], value)
        results = rt.VmVariantList(module.n_results)
        with module._timeline.lock:     # (a module's context is shared: one invoke at a time)
            module.context.invoke(module.function, args, results)
        return results

    def in_place(self, results, buffer_lists):
        return all(module.in_place(r, b) for (module, _), r, b in zip(self.calls, results, buffer_lists))
