"""``minimize`` and ``compute_gradients``: a whole training step in one compiled call.

``opt.minimize(loss, var_list, batch)`` runs forward, backward and the optimizer update
as **one** call of one compiled IREE module: the gradients never leave the device,
and parameters, slots, EMA averages (and the loss, a donated scalar) are updated in
place.  Per call the host only copies the batch into persistent staging buffers and,
for sparse tables, range-checks the looked-up ids and computes their unique rows.

``opt.compute_gradients(loss, var_list, batch)`` runs the compiled gradient function
and returns Keras-style ``[(gradient, variable)]`` pairs (numpy arrays, and
``IndexedSlices`` for tables read only through ``ireeopt.lookup``), for
``apply_gradients``.

Tracing the loss needs jax (imported lazily).  An optimizer loaded from an artifact
compiled with a loss runs its compiled train step with ``loss=None``, without jax.
"""
import warnings

import numpy as np

import iree.runtime as rt

from ..compiler.targets import target_flags
from ..kernels.train import flatten_batch
from .cache import traced_module
from .device import is_real
from .module import PreparedStep
from .sparse import IndexedSlices

INT32 = np.iinfo(np.int32)


_READY = (np.dtype(np.float32), np.dtype(np.int32))


def batch_arrays(batch):
    """(leaves as numpy arrays in the dtypes the device takes, tree).  float64 becomes
    float32 and integers int32 (as JAX does without x64); booleans are refused."""
    leaves, tree = flatten_batch(batch)
    out = []
    for j, leaf in enumerate(leaves):
        array = leaf if type(leaf) is np.ndarray else np.asarray(leaf)
        if array.dtype in _READY:        # the common case: nothing to convert or range-check
            out.append(array)
            continue
        kind = array.dtype.kind
        if kind == "b" or not is_real(array.dtype):
            raise TypeError(f"batch array {j} has dtype {array.dtype}; give numbers (floats or integers)")
        if kind in "iu":
            if array.size and (array.min() < INT32.min or array.max() > INT32.max):
                raise ValueError(f"batch array {j}: integers must fit in int32")
            array = array.astype(np.int32, copy=False)
        elif array.dtype == np.float64:
            array = array.astype(np.float32)
        out.append(array)
    return out, tree


def signature(leaves, tree):
    """A hashable (shapes, dtypes, structure) of a batch."""
    (kind, layout), = tree.items()
    return (tuple((a.shape, a.dtype) for a in leaves), kind, tuple(layout) if kind == "dict" else layout)


def unique_in_order(ids, size):
    """(indices padded to ``size`` by repeating the first, count, inverse) of the ids in
    first-occurrence order (spec §1 step 4)."""
    unique, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    indices = np.full(size, unique[order[0]], np.int32)
    indices[:len(unique)] = unique[order]
    return indices, len(unique), rank[inverse.reshape(-1)].astype(np.int32)


class _PreparedTrain(PreparedStep):
    """One compiled train step (or gradient function) over persistent buffers: a
    ``PreparedStep`` (``spec.donated``: the in-place check of its first call) whose inputs
    are staged from the batch (``staging``)."""

    def __init__(self, tspec, module, buffers, staging, order, gradients=False):
        super().__init__(tspec, module, module.arguments(buffers), buffers, None)
        self.tspec, self.staging = tspec, staging
        self.order = order                 # optimizer index of each var_list entry
        self.gradients = gradients


class Training:
    """The ``minimize``/``compute_gradients`` half of ``Optimizer``."""

    def minimize(self, loss, var_list, batch):
        """One training step on ``batch``: ``loss(values, batch)`` (a JAX-traceable scalar
        function of the values of ``var_list``, a list in that order) is differentiated and
        every variable it reads is updated, all in one compiled device call.  Returns the
        loss of ``batch`` before the update (float32).

        The first call for a structure (loss, variables, batch shapes and dtypes, clip mode,
        ...) traces and compiles it; the learning rate and every other hyperparameter stay
        runtime inputs.  ``loss=None`` on an optimizer loaded from an artifact compiled with a
        loss runs that compiled step (no jax needed)."""
        prepared, leaves = self._train_inputs(loss, var_list, batch, gradients=False)
        lr = self._step_lr()
        tspec = prepared.tspec
        hyper = self._constants(tspec.step, lr)
        staging, scratch_rows = prepared.staging, {}
        for k, v in enumerate(tspec.step.variables):
            if v.sparse is None:
                continue
            ids = np.concatenate([leaves[j].reshape(-1) for j in tspec.sparse_leaves(k)])
            indices, count, inverse = unique_in_order(ids, v.sparse)
            staging[("indices", k)].write(indices)
            staging[("count", k)].write(np.int32(count))
            staging[("inverse", k)].write(inverse)
            if ("stale", k) in staging:
                i = prepared.order[tspec.trained[k]]
                staging[("stale", k)].write(self._stale_rows(i, v.sparse))
                scratch_rows[i] = indices[:count]
        for j, leaf in enumerate(leaves):
            staging[("batch", j)].write(leaf)
        self._run_prepared(prepared, hyper, scratch_rows)
        return np.float32(staging["loss"].read())

    def compute_gradients(self, loss, var_list, batch):
        """``[(gradient, variable)]`` of ``loss`` (see ``minimize``) on ``batch``, computed by one
        compiled call: numpy arrays in each variable's dtype, ``IndexedSlices`` for a table
        read only through ``ireeopt.lookup`` (duplicates not summed), None for a variable the
        loss does not read.  Ready for ``apply_gradients``."""
        prepared, leaves = self._train_inputs(loss, var_list, batch, gradients=True)
        tspec = prepared.tspec
        for j, leaf in enumerate(leaves):
            prepared.staging[("batch", j)].write(leaf)
        self._device.wait()
        results = prepared.module(prepared.args)
        self._device_calls += 1
        var_list = list(var_list)
        out = [[None, v] for v in var_list]
        for k, i in enumerate(tspec.trained):
            view = results.get_as_object(k + 1, rt.HalBufferView)
            value = rt.DeviceArray(self._device.hal_device, view, implicit_host_transfer=True).to_host()
            var = var_list[i]
            value = np.array(value, dtype=var.numpy_dtype)
            if tspec.step.variables[k].sparse is not None:
                ids = np.concatenate([leaves[j].reshape(-1) for j in tspec.sparse_leaves(k)])
                value = IndexedSlices(value, ids, var.shape)
            out[i][0] = value
        return [tuple(pair) for pair in out]

    # ------------------------------------------------------------------ preparation
    def _train_inputs(self, loss, var_list, batch, gradients):
        """Validate everything on the host; returns (the prepared step, batch arrays)."""
        var_list = list(var_list)
        leaves, tree = batch_arrays(batch)
        # fast path: a call like an earlier one (same loss, the same variables in the same
        # order, batch shapes and dtypes, settings) was fully checked and prepared then
        key = (loss, tuple(map(id, var_list)), signature(leaves, tree), gradients, self._structure_key())
        prepared = self._train_steps.get(key) if self.built else None
        if prepared is not None:
            self._check_batch(prepared.tspec, prepared.variables, leaves)
            return prepared, leaves
        if self._artifact is not None:
            self._check_variables(var_list, "minimize")
            var_list = self._match_artifact(var_list)     # the compiled order
            if loss is not None:
                raise ValueError("this optimizer was loaded from an artifact: pass loss=None to run the train "
                                 "step compiled into it (a new loss needs ireeopt.compile)")
            if gradients:
                raise ValueError("an artifact holds the train step, not a separate gradient function")
        elif not callable(loss):
            raise TypeError(f"loss must be a function loss(values, batch) -> scalar, got {loss!r}")
        if not var_list:
            raise ValueError("var_list is empty")
        self._check_variables(var_list, "minimize")
        if self.built:
            unknown = [v.name for v in var_list if id(v) not in self._index]
            if unknown:
                raise ValueError(f"minimize: variable(s) {unknown} were not part of the variables this optimizer "
                                 f"was built with ({[v.name for v in self._vars]})")
        self._clip()
        if not self.built:
            self._build(var_list, compile_step=False)
        order = tuple(self._index[id(v)] for v in var_list)
        prepared = self._prepare_train(loss, var_list, order, leaves, tree, gradients)
        self._check_batch(prepared.tspec, var_list, leaves)
        prepared.variables = var_list      # keeps the variables, and so the ids in `key`, alive
        self._train_steps[key] = prepared
        return prepared, leaves

    def _check_batch(self, tspec, var_list, leaves):
        for i, j in tspec.lookups:
            ids, rows = leaves[j], var_list[i].shape[0]
            if ids.size and (ids.min() < 0 or ids.max() >= rows):
                bad = ids.min() if ids.min() < 0 else ids.max()
                raise IndexError(f"batch array {j}: id {bad} is out of range for {var_list[i].name!r} "
                                 f"({rows} rows)")

    def _prepare_train(self, loss, var_list, order, leaves, tree, gradients):
        if self._artifact is not None:
            tspec = self._artifact.train_spec(leaves, tree)
            module = self._artifact.train_step()
        else:
            from ..compiler.train import analyze, lower_gradients, lower_train_step

            values = [(v.shape, v.dtype) for v in var_list]
            batch = [(a.shape, a.dtype.name) for a in leaves]

            def make_step(trained, varspecs):
                return self._structure(varspecs, [not self._decay_excluded[order[i]] for i in trained])

            tspec, untrained = analyze(loss, values, batch, tree, make_step,
                                       chunked=self._device.driver == "vulkan")
            if untrained:
                warnings.warn("Gradients do not exist for variables "
                              f"{[var_list[i].name for i in untrained]} when minimizing the loss.", stacklevel=3)
            target = self._device.target
            what = f"{'gradients' if gradients else 'train step'} of {getattr(loss, '__name__', 'loss')} " \
                   f"for {len(var_list)} variable(s) ({target})"
            def flags(text):
                return target_flags(target, tspec.step, text)

            if gradients:
                module = traced_module(("gradients", tspec, loss), lambda: lower_gradients(tspec, loss), flags,
                                       self._device, what)
                module = module.step("main", tspec, n_results=1 + len(tspec.trained))
            else:
                module = traced_module(("train", tspec, loss), lambda: lower_train_step(tspec, loss), flags,
                                       self._device, what)
                module = module.step("main", tspec)
        staging = {("batch", j): self._device.allocate(a.shape, a.dtype.name) for j, a in enumerate(leaves)}
        arguments = tspec.gradient_arguments() if gradients else tspec.arguments()
        buffers = []
        for kind, k, shape, dtype in arguments:
            state = self._state_buffer(kind, None if k is None else order[tspec.trained[k]], tspec.step.slot_names)
            if state is not None:
                buffers.append(state)
            elif kind == "loss":
                staging["loss"] = self._device.allocate(shape, dtype)
                buffers.append(staging["loss"])
            else:       # batch, and the sparse tables' indices, count, inverse, stale
                if (kind, k) not in staging:
                    staging[(kind, k)] = self._device.allocate(shape, dtype)
                buffers.append(staging[(kind, k)])
        return _PreparedTrain(tspec, module, buffers, staging, order, gradients)
