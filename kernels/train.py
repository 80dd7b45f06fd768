"""A whole training step (forward, backward, optimizer update) as one pure function.

The user's ``loss(values, batch)`` is a JAX-traceable function of the variables'
values (a list in ``var_list`` order) and a batch (an array, or a tuple/list/dict of
arrays).  Embedding tables are read with ``ireeopt.lookup(table, ids)``; when a
table is read *only* that way, its gradient is sparse (the rows of the occurrences,
as TensorFlow's ``IndexedSlices`` from a gather) and takes the optimizer's sparse
rule, inside the compiled step::

    occurrence rows  = d loss / d (table[ids])        one row per id, duplicates separate
    clipvalue        -> on the occurrence rows          (spec §1: clip before summing)
    sumsq            =  sum of their squares            (for clipnorm / global_clipnorm)
    rows[inverse[j]] += occurrence row j                (duplicates summed in occurrence order)
    -> kernels.step.step with {"rows", "indices", "count", "sumsq"}

``ids`` must be one of the batch arrays as passed in: the host range-checks them and
computes ``indices`` (the unique ids, first-occurrence order, padded by repeating the
first) and ``inverse`` (the slot of each occurrence) before any device work.  A table
that the loss also reads another way gets a dense gradient, as in TensorFlow when a
gather gradient meets a dense one.  A variable the loss does not read gets no
gradient (the Keras warning) and is not updated.

Flat layout (``TrainSpec.arguments``): the optimizer step's arguments with the
gradients taken out (a sparse variable keeps "indices" and "count" and adds
"inverse"), then the batch arrays, then a donated float32 "loss" scalar.
"""
import hashlib
import json
from dataclasses import dataclass

from .step import StepSpec, size_of, step

GRADIENT_KINDS = ("grads", "rows", "sumsq")    # computed inside the train step


# ---------------------------------------------------------------------- batches
def flatten_batch(batch):
    """``(leaves, tree)``: an array, or a tuple/list/dict (sorted keys) of arrays, one level."""
    if isinstance(batch, dict):
        keys = sorted(batch)
        if not all(isinstance(k, str) for k in keys):
            raise TypeError("batch dict keys must be strings")
        return [batch[k] for k in keys], {"dict": keys}
    if isinstance(batch, (tuple, list)):
        return list(batch), {type(batch).__name__: len(batch)}
    return [batch], {"array": 1}


def unflatten_batch(tree, leaves):
    kind, value = next(iter(tree.items()))
    if kind == "dict":
        return dict(zip(value, leaves))
    if kind == "tuple":
        return tuple(leaves)
    if kind == "list":
        return list(leaves)
    return leaves[0]


# ---------------------------------------------------------------------- lookups
class _Tracing:
    """What ``lookup`` does while a train step is being traced (None: plain gather)."""

    active = None


def lookup(table, ids):
    """``table[ids]``: rows of an embedding table (axis 0), one per id, shape
    ``ids.shape + table.shape[1:]``.  Inside ``minimize``/``compute_gradients`` the
    table gets a sparse gradient; ``ids`` must be a batch array, unchanged."""
    if _Tracing.active is not None:
        return _Tracing.active.lookup(table, ids)
    import jax.numpy as jnp

    return jnp.take(table, ids, axis=0)


class Recorder:
    """Tracing context: maps the traced values of variables and batch arrays back to
    their positions, and records or serves each ``lookup`` call."""

    def __init__(self, tables, leaves, serve=None):
        self.tables = {id(t): i for i, t in enumerate(tables)}
        self.leaves = {id(x): j for j, x in enumerate(leaves)}
        self.calls = []          # (variable index, batch leaf index) per lookup, in call order
        self.serve = serve       # callable(variable index, table, ids, call number) -> rows, or None

    def lookup(self, table, ids):
        var = self.tables.get(id(table))
        leaf = self.leaves.get(id(ids))
        if var is None:
            raise ValueError("ireeopt.lookup(table, ids): `table` must be one of the variable values the loss "
                             "receives, unchanged")
        if leaf is None:
            raise ValueError("ireeopt.lookup(table, ids): `ids` must be one of the batch arrays, unchanged "
                             "(ireeopt range-checks ids on the host before the device reads them; compute "
                             "or reshape them on the host)")
        if ids.dtype.kind not in "iu":
            raise TypeError(f"ireeopt.lookup: ids must be integers, got {ids.dtype}")
        self.calls.append((var, leaf))
        return self.serve(var, table, ids, len(self.calls) - 1)

    def __enter__(self):
        if _Tracing.active is not None:
            raise RuntimeError("nested ireeopt train-step tracing")
        _Tracing.active = self
        return self

    def __exit__(self, *exc):
        _Tracing.active = None


# ---------------------------------------------------------------------- structure
@dataclass(frozen=True)
class TrainSpec:
    """The structure of a compiled train step.

    ``step``: the optimizer step over the variables that get a gradient (a sparse one
    has ``sparse = K``, its number of looked-up ids); ``trained``: their indices in
    ``var_list``; ``values``: (shape, dtype) of every variable of ``var_list``;
    ``batch``: (shape, dtype) of each batch array; ``tree``: the batch structure;
    ``lookups``: (variable index, batch array index) of each ``lookup`` call, in order.
    """
    step: StepSpec
    trained: tuple
    values: tuple
    batch: tuple
    tree: tuple
    lookups: tuple
    chunked: bool = False      # sum duplicates in bounded serial chunks (Vulkan; see sum_in_order)

    @property
    def tree_dict(self):
        return {self.tree[0]: list(self.tree[1]) if isinstance(self.tree[1], tuple) else self.tree[1]}

    def sparse_leaves(self, k):
        """Batch array indices whose ids feed step variable ``k`` (sparse), in call order."""
        i = self.trained[k]
        return [leaf for var, leaf in self.lookups if var == i]

    def arguments(self):
        """``[(kind, index, shape, dtype)]`` of the flat train-step signature."""
        args = []
        for kind, k, shape, dtype in self.step.arguments():
            if kind in GRADIENT_KINDS:
                continue
            args.append((kind, k, shape, dtype))
            if kind == "count":
                args.append(("inverse", k, (self.step.variables[k].sparse,), "int32"))
        args += [("batch", j, tuple(shape), dtype) for j, (shape, dtype) in enumerate(self.batch)]
        return args + [("loss", None, (), "float32")]

    @property
    def donated(self):
        kinds = self.step.state_names + ("scratch", "loss")
        return [i for i, a in enumerate(self.arguments()) if a[0] in kinds]

    def gradient_arguments(self):
        """The signature of the gradient function (``compute_gradients``): values, batch."""
        return ([("params", k, self.values[i][0], self.values[i][1]) for k, i in enumerate(self.trained)]
                + [("batch", j, tuple(shape), dtype) for j, (shape, dtype) in enumerate(self.batch)])

    def to_json(self):
        return {"step": self.step.to_json(), "trained": list(self.trained),
                "values": [[list(s), d] for s, d in self.values], "batch": [[list(s), d] for s, d in self.batch],
                "tree": self.tree_dict, "lookups": [list(x) for x in self.lookups], "chunked": self.chunked}

    @classmethod
    def from_json(cls, d):
        kind, value = next(iter(d["tree"].items()))
        return cls(StepSpec.from_json(d["step"]), tuple(d["trained"]),
                   tuple((tuple(s), t) for s, t in d["values"]), tuple((tuple(s), t) for s, t in d["batch"]),
                   (kind, tuple(value) if isinstance(value, list) else value),
                   tuple(tuple(x) for x in d["lookups"]), d.get("chunked", False))

    def digest(self):
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------- the traced functions
def _loss_and_occurrence_grads(jax, tspec, loss, params, leaves, unique=None):
    """(loss, gradients per step variable): dense arrays, or the occurrence rows
    [n, *row] of a sparse table.

    ``unique`` (the train step): step variable -> (indices, inverse).  Then a sparse
    table is read once, at its unique ids, and each lookup picks its rows from those:
    the same single gather the sparse update reads.  (IREE 3.13 computes wrong values
    when a donated table is gathered at other ids as well before the in-place scatter.)"""
    jnp = jax.numpy
    spec = tspec.step
    batch = unflatten_batch(tspec.tree_dict, leaves)
    position = {i: k for k, i in enumerate(tspec.trained)}
    sparse = [k for k, v in enumerate(spec.variables) if v.sparse is not None]
    offsets = {}                 # call number -> (step variable, first occurrence)
    used = {k: 0 for k in sparse}
    for call, (i, leaf) in enumerate(tspec.lookups):
        k = position.get(i)
        if k in used:
            offsets[call] = (k, used[k])
            used[k] += size_of(tspec.batch[leaf][0])

    def values_of(dense, tables):
        values = [jnp.zeros(shape, dtype) for shape, dtype in tspec.values]   # unread by the loss
        for k, i in enumerate(tspec.trained):
            values[i] = tables[k] if k in tables else dense[k]
        return values

    tables = {k: jax.lax.stop_gradient(params[k]) for k in sparse}
    gathered = {}                # step variable -> its table's rows at the unique ids (train step)

    def objective(dense, deltas):
        values = values_of(dense, tables)

        def serve(i, table, ids, call):
            if call not in offsets:
                return table.at[ids].get(mode="promise_in_bounds")
            k, start = offsets[call]
            n = size_of(ids.shape)
            if unique is None:
                rows = table.at[ids].get(mode="promise_in_bounds")
            else:
                indices, inverse = unique[k]
                if k not in gathered:
                    gathered[k] = table.at[indices].get(mode="promise_in_bounds")
                rows = gathered[k][inverse[start:start + n]]
                rows = rows.reshape(tuple(ids.shape) + rows.shape[1:])
            return rows + deltas[k][start:start + n].reshape(rows.shape)

        with Recorder(values, leaves, serve):
            value = loss(values, batch)
        return jnp.asarray(value, jnp.float32).reshape(())

    dense = {k: params[k] for k in range(len(spec.variables)) if k not in tables}
    deltas = {k: jnp.zeros((spec.variables[k].sparse,) + tuple(spec.variables[k].shape[1:]),
                           params[k].dtype) for k in sparse}
    value, (g_dense, g_sparse) = jax.value_and_grad(objective, argnums=(0, 1))(dense, deltas)
    grads = [g_sparse[k] if k in g_sparse else g_dense[k] for k in range(len(spec.variables))]
    if unique is None:
        return value, grads
    return value, grads, {k: jax.lax.stop_gradient(r) for k, r in gathered.items()}


#: Mesa's lavapipe stops a shader after 65,535 loop iterations in one invocation, silently
#: (field notes §2); IREE runs a scatter with duplicate indices as such a loop
LAVAPIPE_LOOP_LIMIT = 65535


def sum_in_order(jnp, occurrences, inverse, chunked):
    """``rows[inverse[j]] += occurrences[j]`` for j in order (each row's duplicates summed in
    order of occurrence): one serial scatter, or with ``chunked`` a chain of scatters of at
    most half of lavapipe's loop limit each, every one continuing from the last (the same
    order and rounding, in bounded loops)."""
    rows = jnp.zeros_like(occurrences)
    n = occurrences.shape[0]
    width = size_of(occurrences.shape[1:])
    chunk = max(1, LAVAPIPE_LOOP_LIMIT // (width + 2) // 2) if chunked else n
    for start in range(0, n, chunk):
        rows = rows.at[inverse[start:start + chunk]].add(occurrences[start:start + chunk], mode="promise_in_bounds")
    return rows


def _named(layout, args):
    named = {}
    for (kind, i, _, _), value in zip(layout, args):
        named.setdefault(kind, {})[i] = value
    return named


def flat_train_step(jax, tspec, loss):
    """The train step over ``tspec.arguments()``: returns the donated state (parameters,
    slots, EMA averages, sparse-Adam scratch tables), then the loss."""
    jnp = jax.numpy
    spec = tspec.step
    layout = tspec.arguments()

    def fn(*args):
        named = _named(layout, args)
        n = len(spec.variables)
        params = [named["params"][k] for k in range(n)]
        leaves = [named["batch"][j] for j in range(len(tspec.batch))]
        unique = {k: (named["indices"][k], named["inverse"][k]) for k in named.get("inverse", {})}
        value, raw, gathered = _loss_and_occurrence_grads(jax, tspec, loss, params, leaves, unique)
        # Every read of a parameter by the forward and backward passes must finish before the
        # in-place update writes it; IREE 3.13 does not order that write after the other reads
        # of a donated buffer (it updated a weight before the backward pass read it), so the
        # update takes the parameters through a barrier that waits for every gradient.
        # Sparse tables go in as the rows the forward pass gathered (a barrier on a whole table
        # makes IREE copy it onto itself before the in-place scatter, which it rejects).
        dense = {k: params[k] for k, v in enumerate(spec.variables) if v.sparse is None}
        dense, raw, value, _ = jax.lax.optimization_barrier((dense, raw, value, gathered))
        params = [dense.get(k, p) for k, p in enumerate(params)]
        grads = []
        for k, v in enumerate(spec.variables):
            if v.sparse is None:
                grads.append(raw[k])
                continue
            occurrences = raw[k].astype(jnp.float32)
            sumsq = jnp.zeros((), jnp.float32)
            if spec.clip == "clipvalue":
                c = named["hyper"][None][spec.scalars.index("clip")]
                occurrences = jnp.clip(occurrences, -c, c)
            elif spec.clip in ("clipnorm", "global_clipnorm"):
                sumsq = jnp.sum(occurrences * occurrences)
            rows = sum_in_order(jnp, occurrences, named["inverse"][k], tspec.chunked)
            # padding slots repeat slot 0's id, so they must carry slot 0's row (kernels/sparse.py)
            real = jnp.arange(v.sparse).reshape((-1,) + (1,) * (rows.ndim - 1)) < named["count"][k]
            rows = jnp.where(real, rows, rows[:1])
            g = {"rows": rows, "indices": named["indices"][k], "count": named["count"][k], "sumsq": sumsq}
            if k in named.get("stale", {}):
                g["stale"] = named["stale"][k]
            grads.append(g)
        slots = {kind: [named[kind][k] for k in range(n)] for kind in spec.slot_names}
        averages = [named["ema"][k] for k in range(n)] if spec.use_ema else []
        p, s, a, z = step(jnp, spec, params, grads, slots, averages, named.get("scratch", {}), named["hyper"][None])
        out = list(p)
        for kind in spec.slot_names:
            out += s[kind]
        return tuple(out + a + [z[k] for k in spec.scratch_variables] + [value])

    return fn


def flat_gradients(jax, tspec, loss):
    """The gradient function over ``tspec.gradient_arguments()``: returns the loss, then
    per step variable its dense gradient or its occurrence rows."""
    layout = tspec.gradient_arguments()

    def fn(*args):
        named = _named(layout, args)
        params = [named["params"][k] for k in range(len(tspec.trained))]
        value, grads = _loss_and_occurrence_grads(jax, tspec, loss, params,
                                                  [named["batch"][j] for j in range(len(tspec.batch))])
        return (value, *[g.astype(jax.numpy.float32) for g in grads])

    return fn
