"""The flat-storage group steps of an optimizer on the CPU drivers (runtime/flat.py).

Every variable lives in a group arena; a step that gives every variable a dense gradient
(and clips no variable by its own norm) updates all groups with one compiled call, one
dispatch per group.  A large float32 variable has a group of its own, whose gradient is
bound where it lies; the others' gradients are copied into their group's staging.  With
more than CHAIN_MIN_GROUPS such own groups the step is a chain instead: the other groups'
step, then calls of steps compiled for 1-D variables of any length, CHAIN_WIDTH own groups
a call, or WIDE_CHAIN_WIDTH where one weight-decay class has more than that many (one
dispatch per variable costs compile time, not step time).  A
call like a remembered one (same variables, same order, plain float arrays) takes a
short path that checks and stages it in one pass.
"""
from dataclasses import replace
from operator import attrgetter

import numpy as np

from ..kernels.step import CHAIN_MIN_GROUPS, VarSpec, chain_width, dynamic_spec, size_of, slot_dtype
from .cache import step_modules, twin_modules
from .cores import task_workers
from .device import Device
from . import flat
from .module import PreparedStep, StepChain
from .variable import Variable

#: on device "cpu", a flat step over at least this many parameters runs on IREE's
#: multi-threaded local-task driver (over the same memory), a smaller one on local-sync
#: (the calling thread: no worker wake-up); "local-sync"/"local-task" force one
TASK_MIN_PARAMS = 1 << 19
#: below this many parameters in all, a step that leaves some variables without a
#: gradient always runs as the group step (``_restorable``)
SUBSET_GROUPS_BELOW = 1 << 19
#: a group step of one variable of HALVES_MIN_PARAMS to HALVES_MAX_PARAMS parameters on
#: local-task has one workgroup a worker (``halves_tile``, compiler/tiles.py), each a
#: contiguous run, not IREE's 4,096-element tiles taken from a shared counter.  Measured
#: here (the raw step, one process, blocks): 1 x 2^22 1.144 against 1.377 and 1.644
#: against 2.144 ms in the host's fast spells (a C loop over static halves 1.189; over
#: dynamic tiles 1.09-1.14 against 0.79-0.86 for halves), 0.95-1.01 of the default in the
#: others; 1 x 2^24 with halves 1.01-1.20 of the default, so not there.  Alternating step by
#: step with torch fused, whose OpenMP workers spin on a core after its step, 1 x 2^22 over
#: halves took 1.00-2.08 of torch's step (median ~1.2) in the fast spells, over IREE's
#: tiles 1.24-2.50 (~1.3)
HALVES_MIN_PARAMS, HALVES_MAX_PARAMS = 1 << 21, 1 << 23


def halves_tile(params, workers):
    """The workgroup tile (elements, a multiple of 16) that gives each of ``workers`` one
    contiguous run of a ``params``-element dispatch, or None (IREE's own tiles) for a single
    worker or a size outside HALVES_MIN_PARAMS to HALVES_MAX_PARAMS."""
    if workers < 2 or not HALVES_MIN_PARAMS <= params <= HALVES_MAX_PARAMS:
        return None
    return -(-params // (16 * workers)) * 16


_NDARRAY = {np.ndarray}
_ZERO = np.zeros((), np.float32)

_shape, _dtype, _kind = attrgetter("shape"), attrgetter("dtype"), attrgetter("kind")
_FLOAT = {"f"}
_ONLY_FLOAT32 = {np.dtype(np.float32)}        # (a set of dtypes: all float32)


class GroupSteps:
    """Mixin of ``Optimizer``: its steps over flat-storage groups."""

    def _build_flat(self, var_list, excluded, device, fills):
        """Move the variables, and make their slots, EMA averages and gradient staging, into
        flat storage: one arena per group and kind of state (a kind's arenas in one allocation:
        ``flat.arenas``).  A group is the variables of one (dtype, weight-decay exclusion),
        except that a large float32 variable has a group of its own, whose gradient can then
        be passed in place (``_own_groups``; the step has one dispatch per group).  Returns
        (slots, averages) as Variables over the member slices; what the arenas are to hold
        (zeros written, the variables' values) is appended to ``fills`` (``flat.fill``), to
        be written while the step compiles."""
        groups = {}
        for i, v in enumerate(var_list):
            own = v.dtype == "float32" and 4 * size_of(v.shape) >= flat.IN_PLACE_MIN_BYTES
            groups.setdefault((v.dtype, excluded[i], i if own else None), []).append(i)
        self._groups = [(dtype, excl, members) for (dtype, excl, _), members in groups.items()]
        # the groups that can take their gradient in place: group -> its variable
        self._own_groups = {j: own for j, (_, _, own) in enumerate(groups) if own is not None}
        kinds = ["params", "grads"] + list(self._slot_names) + (["ema"] if self.use_ema else [])
        self._group_buffers = {k: [] for k in kinds}
        slots = {k: [None] * len(var_list) for k in self._slot_names}
        averages = [None] * len(var_list) if self.use_ema else []
        for kind in kinds:
            made = flat.arenas(device, [([var_list[i].shape for i in members],
                                         dtype if kind in ("params", "grads") else slot_dtype(dtype), dtype)
                                        for dtype, _, members in self._groups], fills)
            for (_, _, members), (group, parts) in zip(self._groups, made):
                self._group_buffers[kind].append(group)
                for i, part in zip(members, parts):
                    var = var_list[i]
                    if kind == "params":
                        fills.append((part.host, var._buffer.host, var._buffer))   # (the old buffer: alive till then)
                        var._buffer = part
                    elif kind == "grads":
                        self._grad_buffers[(i, None)] = {"grads": part}
                    elif kind == "ema":
                        fills.append((part.host, var._buffer.host, var._buffer))
                        averages[i] = Variable._over(part, f"{var.name}/average", var.device)
                    else:
                        slots[kind][i] = Variable._over(part, f"{var.name}/{kind}", var.device)
        return slots, averages

    def _groups_apply(self, indices, buckets):
        """Whether this step can run as one flat step over the groups: every gradient is
        dense, no clipping by each variable's own norm (but in a chain), and the variables
        without a gradient are few enough to be restored after it (``_untouched``)."""
        return (self._groups is not None and self._artifact is None and all(b is None for b in buckets)
                and (self._clip()[0] != "clipnorm" or self._chained())
                and (len(indices) == len(self._index) or self._restorable(indices)))

    def _restorable(self, indices):
        """Whether a step that gives no gradient to the variables not in ``indices`` runs the
        group step anyway, their state saved before and written back after it: in a model
        of fewer than SUBSET_GROUPS_BELOW parameters (there the dispatches of a step over
        some variables, one each, cost more than moving all), or where they hold at most a
        quarter as many parameters as the variables that have a gradient."""
        sizes = [size_of(v.shape) for v in self._vars]
        present = sum(sizes[i] for i in indices)
        return sum(sizes) < SUBSET_GROUPS_BELOW or 4 * (sum(sizes) - present) <= present

    def _untouched(self, indices):
        """The host arrays of every state (parameters, slots, EMA average) of the variables
        not in ``indices``: a group step that updates them too is undone by writing them back."""
        given = set(indices)
        hosts = []
        for i, var in enumerate(self._vars):
            if i not in given:
                hosts.append(var._buffer.host)
                hosts += [self._slots[k][i]._buffer.host for k in self._slot_names]
                if self.use_ema:
                    hosts.append(self._averages[i]._buffer.host)
        return hosts

    def _chained(self):
        """Whether the group step is a chain (``_prepare_chain``): more than CHAIN_MIN_GROUPS
        own groups (kernels/step.py), updated by calls of one step compiled for
        ``chain_width`` 1-D variables of any length (``dynamic_spec``) after the step of the
        other groups (the last call's missing variables are padding, one element each:
        ``_padding``); fewer own groups are dispatches of one step.  A static step's dispatch
        costs ~40 ms of compile time (200 tensors of 84 KB: ~10 s), each compiled step
        ~0.5-1 s of the first call.  Each call costs the caller ~24 us of IREE's VM (it
        checks 33 buffers, records 8 dispatches and queues them) with the workers idle, ~50
        while they run, ~10 us of it whatever the width: 200 x 2^22/200 in calls of 32
        variables took 0.89-1.00 of its step in calls of 8 (median 0.94 of six runs in one
        process; 200 x 2^24/200 0.92, 0.95), 16 or 24 0.94-1.05, and a step of 32 compiles in
        ~1.05 s against ~0.5, so only a weight-decay class of more than 32 large variables has
        them (``chain_width``)."""
        return self.jit_compile and len(self._own_groups) > CHAIN_MIN_GROUPS

    def _prepare_groups(self):
        """The ``PreparedStep`` that updates every variable through the group buffers (its
        own groups' gradients bound per step: ``flat.GradientBindings``), or a
        ``_prepare_chain`` one (``_chained``), on the device a step of its size runs on
        (``_group_step_device``)."""
        key = ("groups",) + self._structure_key()
        if key not in self._prepared:
            build = self._prepare_chain if self._chained() else self._prepare_group_step
            self._prepared[key] = build(self._group_step_device(sum(g.shape[0] for g in self._group_buffers["params"])))
        return self._prepared[key]

    def _all_staging(self):
        """The gradient staging of every variable, in order (what a group step fills)."""
        return [self._grad_buffers[(i, None)] for i in range(len(self._vars))]

    def _group_spec(self, groups, norms_given=False):
        """The spec of a step over ``groups``, given its norms (``norms="given"``) where
        ``norms_given`` (a chain's, clipping by a norm): for float32 groups that agree on
        weight decay and sum no norm in the step, a step of any lengths
        (``dynamic_spec``: compiled once for every model with that many such groups, and maybe
        shipped lowered: compiler/lowered.py), else of their sizes (a norm is summed by rows
        that divide the size: kernels/clipping.py)."""
        spec = self._structure([VarSpec(self._group_buffers["params"][j].shape, self._groups[j][0]) for j in groups],
                               [not self._groups[j][1] for j in groups])
        if norms_given:
            spec = replace(spec, norms="given")
        if len(set(spec.decay)) == 1 and all(v.dtype == "float32" for v in spec.variables) and \
                (norms_given or spec.clip not in ("clipnorm", "global_clipnorm")):
            return dynamic_spec(spec, len(groups))
        return spec

    def _call_buffers(self, spec, groups, device, hyper=None, norms=None):
        """The buffers of a step over ``groups`` (``spec``'s variable ``k`` is ``groups[k]``,
        or padding where that is None: ``_padding``), its scalars in ``hyper`` (default the
        optimizer's), given norms in ``norms[group]``."""
        hyper = self._hyper_buffer if hyper is None else hyper
        return [flat.on_device(hyper if kind == "hyper" else self._padding(device, k, kind) if groups[k] is None
                               else norms[groups[k]] if kind == "sumsq" else self._group_buffers[kind][groups[k]],
                               device)
                for kind, k, _, _ in spec.arguments()]

    def _padding(self, device, k, kind):
        """The ``kind`` buffer (zeros: one float32, a scalar for a given norm) of the padding
        variable ``k`` of a chain's last call on ``device``: each position has its own buffers,
        which the step updates (to zeros: a zero gradient moves nothing) and nothing reads."""
        key = (device.key, k, kind)
        if key not in self._pads:
            self._pads[key] = flat.host_buffer(device, () if kind == "sumsq" else (1,), "float32")
        return self._pads[key]

    @staticmethod
    def _own_arguments(spec, groups, own):
        """{own group: the argument index of its gradient} in a step over ``groups``."""
        return {groups[k]: a for a, (kind, k, _, _) in enumerate(spec.arguments())
                if kind == "grads" and groups[k] in own}

    def _prepare_group_step(self, device):
        """One compiled step over all groups, one dispatch each, on ``device``; a step of one
        float32 variable that runs on local-task with one workgroup a worker where
        ``halves_tile`` says so."""
        groups = list(range(len(self._groups)))
        spec = self._group_spec(groups)
        buffers = self._call_buffers(spec, groups, device)
        tile = None
        if spec.dynamic and len(groups) == 1 and device.driver == "local-task":
            tile = halves_tile(self._group_buffers["params"][0].shape[0], task_workers())
        prepared = self._prepared_step(spec, buffers, self._all_staging(), device, tile)
        if self._own_groups and prepared.module is not None:
            prepared.bindings = flat.GradientBindings(prepared.module, buffers,
                                                      self._own_arguments(spec, groups, self._own_groups))
        return prepared

    def _prepare_chain(self, device):
        """The other groups' step (if any), then the own groups, ``chain_width`` a call of
        a step compiled for 1-D float32 variables of any length, as one
        ``StepChain`` on ``device``; ``prepared.args`` is the argument list of each call.

        Clipping by a norm: the norms of the gradients, which lie in host memory, are
        computed on the host (``_host_norms``) and given to the steps (``norms="given"``):
        under global_clipnorm their total, a scalar of the chain's own hyper vector; under
        clipnorm each own group's, a scalar buffer of its own, while the other groups'
        variables are updated through their slices, each clipped by its own norm in the step."""
        clip = self._clip()[0]
        given = clip in ("clipnorm", "global_clipnorm")
        hyper = None
        if clip == "global_clipnorm":
            hyper = flat.host_buffer(device, (len(replace(self._empty_spec(), norms="given").scalars),), "float32")
        norms = {j: flat.host_buffer(device, (), "float32") for j in self._own_groups} if clip == "clipnorm" else {}
        calls = []                  # (spec, buffers, the groups of its variables: [] for slices)
        others = [j for j in range(len(self._groups)) if j not in self._own_groups]
        if others and clip == "clipnorm":
            small = tuple(i for j in others for i in self._groups[j][2])
            spec = self._spec_for(small, (None,) * len(small))
            buffers = self._step_buffers(spec, small, [self._grad_buffers[(i, None)] for i in small])
            calls.append((spec, [flat.on_device(b, device) for b in buffers], []))
            others = []
        by_decay = {}
        for j in self._own_groups:
            by_decay.setdefault(self._groups[j][1], []).append(j)
        for k, own in enumerate(by_decay.values()):
            for groups, spec in self._chain_links(others if k == 0 else [], own, given):
                calls.append((spec, self._call_buffers(spec, groups, device, hyper, norms), groups))
        chain, bindings = StepChain(device), []
        modules = step_modules([spec for spec, _, _ in calls], device)     # (compiled at the same time)
        # on local-task, chosen by device "cpu": each call's twin on the calling thread
        twins = twin_modules(modules, self._device) if device is not self._device and self._auto_device() \
            else [None] * len(modules)
        for (spec, buffers, groups), module, twin in zip(calls, modules, twins):
            own = self._own_arguments(spec, groups, self._own_groups) if groups else {}
            bindings.append(flat.GradientBindings(module, buffers, own, chain.add(module, twin), twin))
        prepared = PreparedStep(calls[0][0], chain, None, [buffers for _, buffers, _ in calls], self._all_staging())
        prepared.hyper, prepared.own_norms = hyper, norms
        prepared.norms = clip if clip in ("clipnorm", "global_clipnorm") else None
        prepared.bindings = flat.ChainBindings(bindings)
        prepared.args = prepared.bindings.bind(dict.fromkeys(self._own_groups))
        return prepared

    def _host_norms(self, prepared, scalars):
        """Before a chain step that clips by a norm (``prepared.norms``), with its gradients
        staged or bound: the squared norms of its gradients, computed where they lie
        (``flat.squared_norms``), into the own groups' scalar buffers (clipnorm:
        ``prepared.own_norms``) or, summed over every group (the staging of the others,
        padding and variables without a gradient being zeros), into the step's ``scalars``
        (global_clipnorm)."""
        bound = prepared.bindings.bound
        own = list(self._own_groups)
        arrays = [self._group_buffers["grads"][j].host if bound[j] is None else bound[j].host for j in own]
        if prepared.norms == "clipnorm":
            for j, value in zip(own, flat.squared_norms(arrays)):
                prepared.own_norms[j].host[...] = value
            return
        arrays += [self._group_buffers["grads"][j].host for j in range(len(self._groups)) if j not in self._own_groups]
        scalars[prepared.spec.scalars.index("sumsq")] = sum(flat.squared_norms(arrays))

    def _chain_links(self, others, own, norms_given):
        """(groups, spec) of each call of a chain over the groups ``others`` (one step, if
        any: ``_group_spec``) and then the own groups ``own``, ``chain_width(len(own))`` a
        call by one step of any lengths (the last call's groups padded with None:
        ``_padding``), so that a chain compiles one such step per weight-decay class;
        ``norms_given``: the steps are given their norms (``_group_spec``)."""
        links = [(others, self._group_spec(others, norms_given))] if others else []
        width = chain_width(len(own))
        for start in range(0, len(own), width):
            groups = own[start:start + width]
            spec = dynamic_spec(self._group_spec(groups, norms_given), width)
            links.append((groups + [None] * (width - len(groups)), spec))
        return links

    def _prepare_slices(self, spec, indices, buffers, grad_buffers):
        """A step over the slices of the variables ``indices`` (one over some variables, with
        sparse gradients, or clipping each variable by its own norm), run as a group step is:
        on local-task from TASK_MIN_PARAMS parameters (``_group_step_device``), and with
        the dense gradient of each variable that has a group of its own bound where it lies
        (``prepared.own_of``).  A lazy (Adamax) sparse gradient counts the rows it updates,
        not its table: 1M x 64, k = 4,096, 7.3 ms on local-sync against 8.3 on local-task."""
        own = {i: j for j, i in self._own_groups.items()}     # variable -> its own group
        arguments = {own[indices[k]]: a for a, (kind, k, _, _) in enumerate(spec.arguments())
                     if kind == "grads" and indices[k] in own}

        def build(device):
            on_device = [flat.on_device(b, device) for b in buffers]
            prepared = self._prepared_step(spec, on_device, grad_buffers, device)
            if arguments and prepared.module is not None:
                prepared.bindings = flat.GradientBindings(prepared.module, on_device, arguments)
                prepared.own_of = {i: j for i, j in own.items() if j in arguments}
            return prepared

        lazy = spec.optimizer == "adamax"
        return build(self._group_step_device(sum(v.sparse * size_of(v.shape[1:]) if lazy and v.sparse
                                                 else size_of(v.shape) for v in spec.variables)))

    def _auto_device(self):
        """Whether the variables are on device ``cpu`` (which picks a step's driver by size)."""
        return self._vars[0].device.partition(":")[0] == "cpu" and self._device.driver == "local-sync"

    def _group_step_device(self, params):
        """The device a flat step over ``params`` parameters runs on (see TASK_MIN_PARAMS)."""
        if self._auto_device() and self.jit_compile and params >= TASK_MIN_PARAMS:
            return Device.get("local-task")
        return self._device

    def _stage_groups(self, prepared, order):
        """The (staging buffer, array) copies of a group step's gradients; those of its own
        groups that can be are bound where they lie instead (``flat.in_place``).  A variable
        without a gradient gets zeros (they add nothing to a global norm; its update is
        undone after the step, see ``_untouched``)."""
        grads = {self._index[id(v)]: g for g, v in order}
        copies, sources = [], {}
        own = prepared.bindings.arguments if prepared.bindings is not None else ()
        for j, (_, _, members) in enumerate(self._groups):
            if j in own:
                grad = grads.get(members[0])
                sources[j] = grad if grad is not None and flat.in_place(grad) else None
                if sources[j] is not None:
                    continue
            copies += [(self._grad_buffers[(i, None)]["grads"], grads.get(i, _ZERO)) for i in members]
        if own:
            prepared.args = prepared.bindings.bind(sources)
        return copies

    def _remember_repeat(self, pairs, prepared):
        """After a dense flat step: what a call with the same variables in the same order
        needs (``_apply_repeat``), keyed by their ids (the entry keeps the variables alive):
        the variables' shapes; (position, staging host array) of each gradient always copied;
        (position, own group, staging host array) of each that may be bound in place instead."""
        variables = [v for _, v in pairs]
        own = {i: j for j, i in self._own_groups.items()} if prepared.bindings is not None else {}
        indices = [self._index[id(v)] for v in variables]
        hosts = [self._grad_buffers[(i, None)]["grads"].host for i in indices]
        copied = [(k, host) for k, (i, host) in enumerate(zip(indices, hosts)) if i not in own]
        bound = [(k, own[i], host) for k, (i, host) in enumerate(zip(indices, hosts)) if i in own]
        self._repeat_steps[tuple(map(id, variables))] = (
            self._structure_key(), prepared, [v.shape for v in variables], copied, bound,
            sum(host.nbytes for _, host in copied), variables)

    def _apply_repeat(self, pairs):
        """A dense flat step for the same variables, in the same order, as a remembered one,
        with plain float arrays of their shapes: checked and staged with a few passes in C
        over all pairs (the general path sorts, groups and re-checks every pair).  Returns
        False, having changed nothing, for anything else (the general path then handles, or
        rejects, the call)."""
        try:
            entry = self._repeat_steps.get(tuple([id(v) for _, v in pairs]))
        except (TypeError, ValueError):
            return False
        if entry is None or entry[0] != self._structure_key():
            return False
        _, prepared, shapes, copied, bound, nbytes, _ = entry
        grads = [pair[0] for pair in pairs]
        if set(map(type, grads)) != _NDARRAY or list(map(_shape, grads)) != shapes:
            return False
        dtypes = set(map(_dtype, grads))
        if set(map(_kind, dtypes)) != _FLOAT:
            return False
        copies = [(host, grads[k]) for k, host in copied]
        lr = self._step_lr()
        hyper = self._constants(prepared.spec, lr)
        args = None
        if isinstance(prepared.bindings, flat.ChainBindings) and dtypes == _ONLY_FLOAT32 and prepared.norms is None:
            # a chain of float32 gradients: each call's large ones bound as the chain queues
            # it (``bind_each``), so the first call runs while the others are bound.  (Others
            # are copied first, over the cores; a chain's norms are summed from them all first.)
            args = prepared.bindings.bind_each({j: (grads[k], host) for k, j, host in bound})
        elif bound:
            sources = {}
            for k, j, host in bound:
                grad = grads[k]
                if flat.in_place(grad):
                    sources[j] = grad
                else:
                    sources[j] = None
                    copies.append((host, grad))
                    nbytes += host.nbytes
            prepared.args = prepared.bindings.bind(sources)
        flat.copy_to_hosts(copies, nbytes)
        self._run_prepared(prepared, hyper, args=args)
        return True
