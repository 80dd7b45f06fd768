"""The Keras-style optimizer front end: configuration, state, and the step path.

One ``apply_gradients`` call is: validate everything on the host, evaluate the
learning rate, compute the float32 step constants, copy the gradients into
their persistent device buffers, and make **one** call of the compiled step
module, which updates parameters, slots and EMA averages in place.
"""
import functools
import numbers
import re
import warnings

import numpy as np

import iree.runtime as rt

from ..kernels import ema as ema_kernel
from ..kernels import schedules
from ..kernels.step import StepSpec, VarSpec, slot_dtype
from .cache import step_module
from .device import is_real, numpy_dtype
from . import flat, sparse
from .groups import GroupSteps
from .module import PreparedStep
from .train import Training
from .variable import Variable

CLIP_SETTINGS = ("clipnorm", "global_clipnorm", "clipvalue")


@functools.lru_cache(maxsize=256)
def _hyper_template(scalars, weight_decay, clip, ema_momentum, overwrite):
    """For a step whose hyper vector holds ``scalars``: that vector with the values that are
    the same every step filled in (a list, copied by each step; cached: the same few settings
    every step), and (position, name) of the others: "lr" and the kernel's."""
    common = {"wd": np.float32(weight_decay), "clip": np.float32(clip),
              "sumsq": np.float32(0),     # (a chain's global norm: written by _host_norms)
              **ema_kernel.constants(ema_momentum, overwrite)}
    template = [float(common.get(name, 0.0)) for name in scalars]
    return template, tuple((k, name) for k, name in enumerate(scalars) if name not in common)


def _is_number(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_number(owner, name, value, allow_none=False):
    if value is None and allow_none:
        return
    if not _is_number(value):
        raise TypeError(f"{owner}: `{name}` must be a number{' or None' if allow_none else ''}, "
                        f"got {value!r}")


class _IterationVariable:
    """``optimizer.variables[0]``: the int64 count of completed steps, kept on the host."""

    name, shape, dtype = "iteration", (), "int64"

    def __init__(self, optimizer):
        self._optimizer = optimizer

    def numpy(self):
        return np.array(self._optimizer._iterations, np.int64)

    def assign(self, value):
        self._optimizer.iterations = value


class Optimizer(GroupSteps, Training):
    """Base class of ``Adam``, ``AdamW`` and ``Adamax``; see those for the update rules."""

    _kind = None            # kernel name in kernels.step.OPTIMIZERS
    _config_keys = ()             # per-class hyperparameter names, in get_config order
    _legacy = False

    def __init__(self, learning_rate, weight_decay, clipnorm, clipvalue, global_clipnorm, use_ema,
                 ema_momentum, ema_overwrite_frequency, jit_compile, name, mesh, kwargs):
        owner = type(self).__name__
        kwargs.pop("is_legacy_optimizer", None)
        for key in kwargs:
            if key == "decay":
                raise ValueError(f"{owner}: `decay` is deprecated in the new Keras optimizers; use a "
                                 "learning-rate schedule such as ireeopt.schedules.InverseTimeDecay")
            raise TypeError(f"{owner}: {key!r} is not a valid argument")
        if mesh is not None:
            raise NotImplementedError(f"{owner}: `mesh` (sharded optimizer state) is not supported yet")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"{owner}: `name` must be a string, got {name!r}")
        _check_number(owner, "weight_decay", weight_decay, allow_none=True)
        for key, value in (("clipnorm", clipnorm), ("clipvalue", clipvalue),
                           ("global_clipnorm", global_clipnorm)):
            _check_number(owner, key, value, allow_none=True)
            if value is not None and value < 0:
                raise ValueError(f"{owner}: `{key}` must be >= 0 (0 or None turns it off), got {value}")
        active = [k for k, v in (("clipnorm", clipnorm), ("global_clipnorm", global_clipnorm),
                                 ("clipvalue", clipvalue)) if v]
        if len(active) > 1:
            raise ValueError(f"{owner}: only one of `clipnorm`, `global_clipnorm` and `clipvalue` can be "
                             f"set, got {' and '.join(active)}")
        if not isinstance(use_ema, bool):
            raise TypeError(f"{owner}: `use_ema` must be a bool, got {use_ema!r}")
        if use_ema:
            _check_number(owner, "ema_momentum", ema_momentum)
            if not 0 <= ema_momentum <= 1:
                raise ValueError(f"{owner}: `ema_momentum` must be in [0, 1], got {ema_momentum}")
            if ema_overwrite_frequency is not None:
                if (not isinstance(ema_overwrite_frequency, numbers.Integral)
                        or isinstance(ema_overwrite_frequency, bool) or ema_overwrite_frequency < 0):
                    raise ValueError(f"{owner}: `ema_overwrite_frequency` must be an integer >= 1 or None, "
                                     f"got {ema_overwrite_frequency!r}")
                ema_overwrite_frequency = int(ema_overwrite_frequency) or None
        if not isinstance(jit_compile, bool):
            raise TypeError(f"{owner}: `jit_compile` must be a bool, got {jit_compile!r}")
        self._learning_rate = self._check_learning_rate(learning_rate)
        self.name = owner if name is None else name
        self.weight_decay = weight_decay
        self.clipnorm, self.clipvalue, self.global_clipnorm = clipnorm, clipvalue, global_clipnorm
        self.use_ema = use_ema
        self.ema_momentum = ema_momentum
        self.ema_overwrite_frequency = ema_overwrite_frequency
        self.jit_compile = jit_compile
        self._iterations = 0
        self._device_calls = 0       # compiled-module invocations (see device_calls)
        self._repeat_steps = {}
        self._artifact = None
        self.built = False
        self._vars = []
        self._index = {}
        self._exclude_ids, self._exclude_names = set(), []

    # ------------------------------------------------------------------ learning rate
    def _check_learning_rate(self, lr):
        if isinstance(lr, dict):
            lr = schedules.deserialize(lr)
        if isinstance(lr, schedules.LearningRateSchedule) or _is_number(lr) or callable(lr):
            return np.float32(lr) if _is_number(lr) else lr
        raise TypeError(f"{type(self).__name__}: `learning_rate` must be a number, a "
                        f"LearningRateSchedule or a callable, got {lr!r}")

    @property
    def learning_rate(self):
        """The float32 rate the next step uses (for a schedule: its value at ``iterations``,
        as Keras reads it); a callable learning rate reads as the callable itself, since
        calling it may have side effects.  ``get_config()`` holds the schedule."""
        if isinstance(self._learning_rate, schedules.LearningRateSchedule):
            return self._learning_rate(self._iterations)
        return self._learning_rate

    @learning_rate.setter
    def learning_rate(self, value):
        value = self._check_learning_rate(value)
        if (isinstance(self._learning_rate, schedules.LearningRateSchedule)
                and not isinstance(value, schedules.LearningRateSchedule)):
            raise TypeError("This optimizer was created with a LearningRateSchedule as its `learning_rate`; "
                            "it can only be replaced by another schedule, not by a number or callable")
        self._learning_rate = value

    def _current_learning_rate(self):
        """This step's rate (spec §7): a schedule at the 0-based iterations, a callable called."""
        lr = self._learning_rate
        if type(lr) is np.float32:          # a number (stored as float32: _check_learning_rate)
            return lr
        if isinstance(lr, schedules.LearningRateSchedule):
            lr = lr(self._iterations)
        elif callable(lr):
            lr = lr()
            if isinstance(lr, np.ndarray) and lr.shape == ():
                lr = lr[()]
            if not _is_number(lr):
                raise TypeError(f"the learning-rate callable must return a number, got {lr!r}")
        return np.float32(lr)

    # ------------------------------------------------------------------ iterations & variables
    @property
    def device_calls(self):
        """How many compiled steps this optimizer has run on the device: one per
        ``apply_gradients``, ``minimize`` or ``compute_gradients`` (a chain of calls queued
        together, for models of many large variables, counts once; ``jit_compile=False``
        makes none)."""
        return self._device_calls

    @property
    def iterations(self):
        """The int64 count of completed steps."""
        return np.int64(self._iterations)

    @iterations.setter
    def iterations(self, value):
        value = np.asarray(value)
        if value.shape != () or value.dtype.kind not in "iuf" or value != int(value) or value < 0:
            raise ValueError(f"iterations must be a non-negative integer, got {value!r}")
        self._iterations = int(value)

    @property
    def variables(self):
        """The optimizer's own state in spec §8 order: iteration, EMA averages, then per
        variable its slots (m, v or m, u), then every vhat."""
        out = [_IterationVariable(self)]
        if not self.built:
            return out
        if self.use_ema:
            out += self._averages
        base = [k for k in self._slot_names if k != "vhat"]
        for i in range(len(self._vars)):
            out += [self._slots[k][i] for k in base]
        if "vhat" in self._slot_names:
            out += self._slots["vhat"]
        return out

    # ------------------------------------------------------------------ weight decay exclusion
    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        """Exclude variables (by identity) or names (regular expressions, ``re.search``)
        from weight decay.  A second call replaces both lists.  Must precede ``build``."""
        if self.built:
            raise ValueError("exclude_from_weight_decay() can only be configured before the optimizer "
                             "is built")
        if self._artifact is not None:
            raise ValueError("this optimizer was loaded from an artifact: its weight-decay exclusions were "
                             "compiled in; compile a new artifact to change them")
        var_list = list(var_list or [])
        var_names = list(var_names or [])
        for name in var_names:
            if not isinstance(name, str):
                raise TypeError(f"var_names must be strings (regular expressions), got {name!r}")
            try:
                re.compile(name)
            except re.error as e:
                raise ValueError(f"var_names: {name!r} is not a valid regular expression: {e}") from None
        self._exclude_ids = {id(v) for v in var_list}
        self._exclude_names = var_names

    def _excluded(self, var):
        return id(var) in self._exclude_ids or any(re.search(p, var.name) for p in self._exclude_names)

    # ------------------------------------------------------------------ build
    def _structure(self, variables, decayed):
        """The StepSpec of this optimizer's current settings over ``variables`` (VarSpecs);
        ``decayed[i]``: variable ``i`` is not excluded from weight decay."""
        return StepSpec(self._kind, tuple(variables), tuple(bool(self.weight_decay) and d for d in decayed),
                        self._clip()[0], getattr(self, "amsgrad", False), self.use_ema)

    def _empty_spec(self):
        """The structure with no variables: its slot names and scalar layout."""
        return self._structure((), ())

    @property
    def _slot_names(self):
        return self._empty_spec().slot_names

    def _check_variables(self, var_list, what):
        seen = set()
        for var in var_list:
            if not isinstance(var, Variable):
                raise TypeError(f"{what}: expected ireeopt.Variable objects, got {type(var).__name__}")
            if id(var) in seen:
                raise ValueError(f"{what}: variable {var.name!r} is passed more than once")
            seen.add(id(var))
        devices = {v._device.key for v in var_list} | ({self._device.key} if self.built else set())
        if len(devices) > 1:
            raise ValueError(f"{what}: all variables of one optimizer must share a device, got "
                             f"{sorted(v.device for v in var_list)}")

    def build(self, var_list):
        """Create the slots (and EMA averages) of exactly ``var_list``; compile the step."""
        self._build(var_list, compile_step=True)

    def _build(self, var_list, compile_step):
        """``build``; ``compile_step=False`` (``minimize``) leaves the ``apply_gradients`` step
        to its first use."""
        var_list = list(var_list)
        if self.built:
            return
        self._check_variables(var_list, "build")
        if not var_list:
            raise ValueError("build: var_list is empty")
        if self._artifact is not None:
            var_list = self._match_artifact(var_list)
        device = var_list[0]._device
        excluded = [self._excluded(v) for v in var_list]
        if self._artifact is not None:
            excluded = [not v["weight_decay"] for v in self._artifact.variables]
        self._groups = self._group_buffers = None
        self._own_groups = {}        # set by _build_flat
        self._pads = {}              # a chain's padding buffers (groups._padding)
        self._grad_buffers = {}      # (variable index, None | bucket) -> staging buffer(s), made once
        fills = []                   # what the flat arenas are to hold: written while the step compiles
        if device.mappable and device.driver in flat.DRIVERS and \
                not any(isinstance(v._buffer, flat.ImportedBuffer) for v in var_list):
            slots, averages = self._build_flat(var_list, excluded, device, fills)
        else:
            slots = {k: [Variable(np.zeros(v.shape, numpy_dtype(slot_dtype(v.dtype))), name=f"{v.name}/{k}",
                                  device=v.device) for v in var_list] for k in self._slot_names}
            averages = [Variable(v.numpy().astype(numpy_dtype(slot_dtype(v.dtype))), name=f"{v.name}/average",
                                 device=v.device) for v in var_list] if self.use_ema else []
        hyper = device.allocate((len(self._empty_spec().scalars),), "float32")
        self._vars, self._index = var_list, {id(v): i for i, v in enumerate(var_list)}
        self._slots, self._averages, self._hyper_buffer = slots, averages, hyper
        self._scratch_buffers = {}   # variable index -> scratch table of sparse Adam, made once
        self._scratch_rows = {}      # variable index -> rows its scratch table holds (host copy)
        self._device, self._prepared, self._train_steps = device, {}, {}
        self._repeat_steps = {}      # variable ids -> a remembered dense flat step (_apply_repeat)
        self._decay_excluded = excluded
        self.built = True
        try:
            filling = flat.fill_meanwhile(fills)
            try:
                if self.jit_compile and compile_step:
                    everything = tuple(range(len(var_list)))
                    if self._groups_apply(everything, (None,) * len(var_list)):
                        self._prepare_groups()
                    else:
                        self._prepare(everything, (None,) * len(var_list))
            finally:
                filling.result()
        except BaseException:
            self.built = False
            raise

    def _prepared_step(self, spec, buffers, grad_buffers, device=None, tile=None):
        """A ``PreparedStep`` over ``buffers``: its module (the artifact's, the compile cache's,
        or none for ``jit_compile=False``) on ``device`` (default the optimizer's; compiled
        with workgroups of ``tile`` elements where given: compiler/tiles.py) and the VM
        argument list made once."""
        if self._artifact is not None:
            module = self._artifact.step(spec)
        else:
            module = step_module(spec, device or self._device, tile) if self.jit_compile else None
        args = module.arguments(buffers) if module else None
        return PreparedStep(spec, module, args, buffers, grad_buffers)

    # ------------------------------------------------------------------ structure and constants
    def _clip(self):
        if not (self.clipnorm or self.clipvalue or self.global_clipnorm):    # (every step: the short way)
            return None, 0.0
        active = [(k, getattr(self, k)) for k in CLIP_SETTINGS if getattr(self, k)]
        if len(active) > 1:
            raise ValueError(f"only one of {', '.join(CLIP_SETTINGS)} can be set, got "
                             f"{' and '.join(k for k, _ in active)}")
        return active[0] if active else (None, 0.0)

    def _structure_key(self):
        """What of the optimizer's settings a compiled structure depends on."""
        return (self._clip()[0], bool(self.weight_decay), getattr(self, "amsgrad", False), self.use_ema)

    def _spec_for(self, indices, buckets):
        return self._structure([VarSpec(self._vars[i].shape, self._vars[i].dtype, b) for i, b in zip(indices, buckets)],
                               [not self._decay_excluded[i] for i in indices])

    def _kernel_constants(self, lr):
        raise NotImplementedError

    def _step_lr(self):
        return self._current_learning_rate()

    def _constants(self, spec, lr):
        """The hyper vector for this step (rate ``lr``), in ``spec.scalars`` order: a list of
        floats, each a float32 value (written to the device by ``_run_prepared``)."""
        freq = self.ema_overwrite_frequency
        overwrite = bool(self.use_ema and freq and (self._iterations + 1) % freq == 0)
        template, per_step = _hyper_template(spec.scalars, self.weight_decay or 0, self._clip()[1],
                                             self.ema_momentum if self.use_ema else 0.0, overwrite)
        c = {**self._kernel_constants(lr), "lr": lr}
        values = template.copy()
        for k, name in per_step:
            values[k] = c[name]
        return values

    # ------------------------------------------------------------------ the step
    def _gradient_buffers(self, i, var_spec, spec):
        """The persistent staging buffers of variable ``i``'s gradient (one set per sparse
        bucket), including the "stale" row list of a sparse Adam variable."""
        key = (i, var_spec.sparse)
        if key not in self._grad_buffers:
            kinds = list(var_spec.gradient_arguments())
            if var_spec.sparse is not None and spec.optimizer == "adam":
                kinds.append(("stale", (var_spec.sparse,), "int32"))
            self._grad_buffers[key] = {kind: self._device.allocate(shape, dtype) for kind, shape, dtype in kinds}
        return self._grad_buffers[key]

    def _stale_rows(self, i, bucket):
        """The rows the previous sparse step left in variable ``i``'s scratch table, padded to
        this step's ``bucket``; if they do not fit, the table is zero-filled on the host instead."""
        stale = self._scratch_rows.get(i, np.zeros(0, np.int32))
        if len(stale) > bucket:
            self._scratch(i).write(np.zeros(self._vars[i].shape, np.float32))
            stale = stale[:0]
        padded = np.full(bucket, stale[0] if len(stale) else 0, np.int32)
        padded[:len(stale)] = stale
        return padded

    def _scratch(self, i):
        """Variable ``i``'s float32 scratch table (sparse Adam), made once, zero-filled."""
        if i not in self._scratch_buffers:
            var = self._vars[i]
            buffer = self._device.allocate(var.shape, "float32")
            buffer.write(np.zeros(var.shape, np.float32))
            self._scratch_buffers[i] = buffer
        return self._scratch_buffers[i]

    def _prepare(self, indices, buckets):
        """The ``PreparedStep`` updating ``indices`` (with sparse ``buckets``, None for dense).
        Looked up by a cheap key of everything ``_spec_for`` reads that can change after build."""
        key = (indices, buckets) + self._structure_key()
        if key not in self._prepared:
            spec = self._spec_for(indices, buckets)
            grad_buffers = [self._gradient_buffers(i, v, spec) for i, v in zip(indices, spec.variables)]
            buffers = self._step_buffers(spec, indices, grad_buffers)
            if self._groups is not None and self._artifact is None:
                self._prepared[key] = self._prepare_slices(spec, indices, buffers, grad_buffers)
            else:
                self._prepared[key] = self._prepared_step(spec, buffers, grad_buffers)
        return self._prepared[key]

    def _step_buffers(self, spec, indices, grad_buffers):
        """The buffers of a step ``spec`` over the variables ``indices``, in argument order:
        their persistent state, and ``grad_buffers[k]`` (variable ``k``'s staging) for inputs."""
        buffers = []
        for kind, k, _, _ in spec.arguments():
            state = self._state_buffer(kind, None if k is None else indices[k], spec.slot_names)
            buffers.append(grad_buffers[k][kind] if state is None else state)
        return buffers

    def _state_buffer(self, kind, i, slot_names):
        """The persistent buffer of argument ``kind`` of variable ``i``: its parameters, a slot,
        its EMA average or scratch table, or the hyper vector; None for an input staged per step."""
        if kind == "params":
            return self._vars[i]._buffer
        if kind in slot_names:
            return self._slots[kind][i]._buffer
        if kind == "ema":
            return self._averages[i]._buffer
        if kind == "scratch":
            return self._scratch(i)
        if kind == "hyper":
            return self._hyper_buffer
        return None

    def _validate_pairs(self, grads_and_vars):
        pairs = []
        for item in grads_and_vars:
            try:
                grad, var = item
            except (TypeError, ValueError):
                raise TypeError("apply_gradients expects (gradient, variable) pairs") from None
            pairs.append((grad, var))
        ids = [id(v) for _, v in pairs]
        known = self.built and len(set(ids)) == len(ids) and all(i in self._index for i in ids)
        if not known:    # the variables of a built optimizer were checked when it was built
            self._check_variables([v for _, v in pairs], "apply_gradients")
        if self.built and not known:
            unknown = [v.name for _, v in pairs if id(v) not in self._index]
            if unknown:
                raise ValueError(f"apply_gradients: variable(s) {unknown} were not part of the variables this "
                                 f"optimizer was built with ({[v.name for v in self._vars]})")
        checked = []
        for grad, var in pairs:
            if type(grad) is np.ndarray and grad.dtype.kind == "f" and grad.shape == var.shape:
                checked.append((grad, var))      # the common case, already a valid float array
                continue
            if grad is None:
                checked.append((None, var))
                continue
            if isinstance(grad, sparse.IndexedSlices):
                checked.append((sparse.check(grad, var), var))
                continue
            if isinstance(grad, Variable):
                # host-visible memory (CPU, lavapipe): read where it lies, no host copy first
                value = grad._buffer.host if grad._buffer.host is not None else grad.numpy()
            elif isinstance(grad, rt.DeviceArray):
                value = grad.to_host()      # host-visible (the CPU drivers): a mapping, not a copy
            else:
                value = np.asarray(grad)
            if not is_real(value.dtype):
                raise TypeError(f"gradient for {var.name!r} has dtype {value.dtype}; expected a real number type")
            if value.shape != var.shape:
                raise ValueError(f"gradient for {var.name!r} has shape {value.shape} but the variable has "
                                 f"shape {var.shape}")
            checked.append((value, var))
        return checked

    def apply_gradients(self, grads_and_vars):
        """Apply one step (spec §1) with numpy gradients; returns ``iterations``.

        Everything is checked on the host first: a failing call changes nothing."""
        grads_and_vars = grads_and_vars if type(grads_and_vars) in (list, tuple) else list(grads_and_vars)
        if self._repeat_steps and self._apply_repeat(grads_and_vars):
            return self.iterations
        pairs = self._validate_pairs(grads_and_vars)
        given = [(g, v) for g, v in pairs if g is not None]
        if not given:
            raise ValueError(f"No gradients provided for any variable: {[v.name for _, v in pairs]}")
        if len(given) < len(pairs):
            warnings.warn("Gradients do not exist for variables "
                          f"{[v.name for g, v in pairs if g is None]} when minimizing the loss.",
                          stacklevel=2)
        clip_mode, clip = self._clip()   # a conflicting clip setting raises before any state exists
        bucket_of = self._bucket_chooser([len(g[1]) for g, _ in given if isinstance(g, tuple)])
        lr = self._step_lr()              # evaluated once per step, before any state exists
        if not self.built:
            self.build([v for _, v in pairs])
        order = sorted(((sparse.reduce(*g, clip_mode, clip, bucket_of) if isinstance(g, tuple) else g, v)
                        for g, v in given), key=lambda gv: self._index[id(gv[1])])
        indices = tuple(self._index[id(v)] for _, v in order)
        buckets = tuple(g.bucket if isinstance(g, sparse.SparseGradient) else None for g, _ in order)
        groups = self._groups_apply(indices, buckets)
        prepared = self._prepare_groups() if groups else self._prepare(indices, buckets)
        hyper = self._constants(prepared.spec, lr)
        scratch_rows = {}
        copies = []                  # (staging buffer, array): written together below
        if groups:
            copies = self._stage_groups(prepared, order)
            order = ()
        sources = {}                 # a step over slices: {own group: its gradient where it lies, or None}
        for (grad, _), i, staging in zip(order, indices, prepared.grad_buffers):
            if i in prepared.own_of:
                j = prepared.own_of[i]
                sources[j] = grad if flat.in_place(grad) else None
                if sources[j] is not None:
                    continue
            arrays = grad.arrays() if isinstance(grad, sparse.SparseGradient) else {"grads": grad}
            if "stale" in staging:
                arrays["stale"] = self._stale_rows(i, grad.bucket)
                scratch_rows[i] = grad.indices[:grad.count]
            copies += [(staging[kind], array) for kind, array in arrays.items()]
        if sources:
            prepared.args = prepared.bindings.bind(sources)
        flat.copy_in(copies)
        # variables without a gradient in a group step: their state, written back after it
        saved = [(host, host.copy()) for host in self._untouched(indices)] \
            if groups and len(indices) < len(self._vars) else ()
        try:
            self._run_prepared(prepared, hyper, scratch_rows)
        finally:
            for host, value in saved:
                host[...] = value
        if groups and prepared.module is not None and len(indices) == len(pairs) == len(self._vars) and \
                all(type(g) is np.ndarray for g, _ in pairs):
            self._remember_repeat(grads_and_vars, prepared)
        return self.iterations

    def _run_prepared(self, prepared, hyper, scratch_rows=None, args=None):
        """With the inputs staged: write this step's scalars, run the prepared step (checking
        on its first call that it updated its state in place), count the step; ``args``: its
        argument lists, if not ``prepared.args`` (a chain's, made as it queues each call)."""
        if prepared.norms is not None:
            self._host_norms(prepared, hyper)
        (self._hyper_buffer if prepared.hyper is None else prepared.hyper).write(hyper)
        self._device.wait()          # staged devices: every input copy queued before has landed
        if prepared.module is None:
            self._run_eager(prepared.spec, prepared.buffers)
        else:
            results = prepared.module(prepared.args if args is None else args)
            self._device_calls += 1
            if not prepared.verified:
                self._verify_in_place(prepared, results)
                prepared.verified = True
        if scratch_rows:
            self._scratch_rows.update(scratch_rows)
        self._iterations += 1

    # ------------------------------------------------------------------ artifacts
    def _bind_artifact(self, artifact):
        """Run this optimizer on a loaded artifact's modules (``ireeopt.load``)."""
        self._artifact = artifact
        self.jit_compile = True

    def _match_artifact(self, var_list):
        """The variables in the artifact's order, after checking names, shapes, dtypes and device."""
        compiled = self._artifact.variables
        by_name = {v.name: v for v in var_list}
        expected = [v["name"] for v in compiled]
        if sorted(by_name) != sorted(expected) or len(by_name) != len(var_list):
            raise ValueError(f"this optimizer was compiled for the variables {expected}, got "
                             f"{[v.name for v in var_list]}")
        for spec in compiled:
            var = by_name[spec["name"]]
            if tuple(var.shape) != tuple(spec["shape"]) or var.dtype != spec["dtype"]:
                raise ValueError(f"variable {var.name!r} has shape {var.shape} and dtype {var.dtype}, but the "
                                 f"artifact was compiled for shape {tuple(spec['shape'])} and dtype {spec['dtype']}")
            if var._device.key != self._artifact.device.key:
                raise ValueError(f"variable {var.name!r} is on device {var.device!r} but the optimizer was loaded "
                                 f"for {self._artifact.device!r}")
        return [by_name[name] for name in expected]

    def _bucket_chooser(self, ks):
        """How sparse gradients of ``ks`` rows are padded: each to its own power of two, or,
        from an artifact, all to the smallest compiled bucket that holds the largest."""
        if self._artifact is None or not ks:
            return sparse.bucket
        size = max(self._artifact.bucket(k) for k in ks)
        return lambda k: size

    def _verify_in_place(self, prepared, results):
        if not prepared.module.in_place(results, prepared.buffers):
            raise RuntimeError("the compiled step did not update its state in place; this IREE build does "
                               "not honour buffer donation (please report it)")

    def _run_eager(self, spec, buffers):
        """``jit_compile=False``: the same kernels op by op in JAX on the host (a debugging reference)."""
        import jax.numpy as jnp

        from ..kernels.step import flat_step

        outs = flat_step(jnp, spec)(*[jnp.asarray(b.read()) for b in buffers])
        for i, out in zip(spec.donated, outs):
            buffers[i].write(np.asarray(out))

    # ------------------------------------------------------------------ EMA, config, state I/O
    def finalize_variable_values(self, var_list):
        """Assign each variable its moving average (only with ``use_ema``)."""
        var_list = list(var_list)
        if not self.use_ema or not self.built:
            return
        unknown = [getattr(v, "name", v) for v in var_list if id(v) not in self._index]
        if unknown:
            raise ValueError(f"finalize_variable_values: unknown variable(s) {unknown}")
        for var in var_list:
            var.assign(self._averages[self._index[id(var)]].numpy())

    def get_config(self):
        lr = self._learning_rate
        if isinstance(lr, schedules.LearningRateSchedule):
            lr = schedules.serialize(lr)
        elif not callable(lr):
            lr = float(lr)
        config = {"name": self.name, "weight_decay": self.weight_decay, "clipnorm": self.clipnorm,
                  "global_clipnorm": self.global_clipnorm, "clipvalue": self.clipvalue,
                  "use_ema": self.use_ema, "ema_momentum": self.ema_momentum,
                  "ema_overwrite_frequency": self.ema_overwrite_frequency, "jit_compile": self.jit_compile,
                  "is_legacy_optimizer": self._legacy, "learning_rate": lr}
        config.update({k: getattr(self, k) for k in self._config_keys})
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**dict(config))

    def save_own_variables(self, store):
        """``store[str(i)] = value`` for each of ``self.variables``."""
        for i, var in enumerate(self.variables):
            store[str(i)] = var.numpy()

    def load_own_variables(self, store):
        """Restore from ``save_own_variables``; a store of the wrong size or shapes raises
        and leaves the optimizer unchanged."""
        variables = self.variables
        keys = list(store.keys())
        if len(keys) != len(variables):
            hint = "" if self.built else " (build the optimizer with its variables first)"
            raise ValueError(f"{self.name}: the store holds {len(keys)} values but this optimizer has "
                             f"{len(variables)} variables{hint}")
        values = []
        for i, var in enumerate(variables):
            if str(i) not in store:
                raise ValueError(f"{self.name}: the store has no entry {str(i)!r} (for {var.name!r})")
            value = np.asarray(store[str(i)])
            if value.shape != tuple(var.shape):
                raise ValueError(f"{self.name}: stored value {i} for {var.name!r} has shape {value.shape}, "
                                 f"expected {tuple(var.shape)}")
            if not is_real(value.dtype):
                raise TypeError(f"{self.name}: stored value {i} for {var.name!r} has dtype {value.dtype}")
            values.append(value)
        it = values[0]
        if it != np.floor(it) or it < 0:
            raise ValueError(f"{self.name}: stored iteration {it} is not a non-negative integer")
        for var, value in zip(variables, values):
            var.assign(value)

    def __repr__(self):
        return f"<ireeopt.{type(self).__name__} name={self.name!r} iterations={self._iterations}>"

