"""Trace a user's loss into a ``TrainSpec`` and StableHLO (train step, gradient function).

``analyze`` traces the loss once with ``jax.make_jaxpr`` while every
``ireeopt.lookup`` returns a placeholder that does not read the table: a variable
whose value then still appears in the graph is read some other way (dense
gradient), one that appears only through lookups is a sparse table, and one that
does not appear at all gets no gradient.
"""
from ..kernels.step import size_of
from ..kernels.train import Recorder, TrainSpec, flat_gradients, flat_train_step, unflatten_batch


#: Adam without clipping takes a dense gradient for a looked-up table when ids per step
#: >= rows / DENSE_FROM (the same update, and faster there: bench/train_step.py measured
#: the two equal at rows/16 and the dense one 1.8x faster at rows/4)
DENSE_FROM = 8


def _structs(specs):
    import jax
    import jax.numpy as jnp

    return [jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype)) for shape, dtype in specs]


def analyze(loss, values, batch, tree, make_step, chunked=False):
    """The ``TrainSpec`` of ``loss`` over variables ``values`` [(shape, dtype)] and batch
    arrays ``batch`` [(shape, dtype)] with structure ``tree``.  ``make_step(trained,
    varspecs)`` gives the optimizer's ``StepSpec`` for the trained variable indices.
    ``chunked`` (a Vulkan target): duplicate ids are summed in bounded serial chunks, and
    looked-up tables always keep the sparse rule (a dense gather's gradient is one long
    serial loop, which lavapipe cuts short).
    Returns (tspec, indices of the variables without a gradient)."""
    import jax
    import jax.numpy as jnp

    recorded = {}

    def probe(vals, leaves):
        def serve(i, table, ids, call):
            return jnp.zeros(tuple(ids.shape) + tuple(table.shape[1:]), table.dtype)

        with Recorder(vals, leaves, serve) as recorder:
            out = loss(vals, unflatten_batch(tree, leaves))
        recorded["calls"] = list(recorder.calls)
        return out

    closed = jax.make_jaxpr(probe)(_structs(values), _structs(batch))
    out = closed.out_avals
    if len(out) != 1 or out[0].shape not in ((), (1,)) or not jnp.issubdtype(out[0].dtype, jnp.floating):
        raise TypeError(f"the loss must return one floating-point scalar, got {[str(a) for a in out]}")
    invars = closed.jaxpr.invars[:len(values)]
    read = {id(v) for eqn in closed.jaxpr.eqns for v in eqn.invars}
    read |= {id(v) for v in closed.jaxpr.outvars}
    dense = [id(v) in read for v in invars]
    calls = tuple(recorded["calls"])
    occurrences = {}
    for i, leaf in calls:
        occurrences[i] = occurrences.get(i, 0) + size_of(batch[leaf][0])
    trained = [i for i in range(len(values)) if dense[i] or i in occurrences]
    sparse = {i: occurrences[i] for i in occurrences if not dense[i]}
    for i, n in sparse.items():
        if n == 0:
            raise ValueError(f"variable {i} is looked up with empty ids; give lookups at least one id")
    from ..kernels.step import VarSpec

    def specs():
        return [VarSpec(tuple(values[i][0]), values[i][1], sparse.get(i)) for i in trained]

    probe_step = make_step(trained, specs())
    if probe_step.optimizer == "adam" and probe_step.clip is None and not chunked:
        # Adam's sparse rule is dense-equivalent, so without clipping (where a sparse norm
        # counts duplicates separately) the dense gradient gives the same update; it is the
        # faster one once a step looks up an eighth of the table's rows or more (measured in
        # bench/train_step.py).  Adamax's lazy rule always stays sparse: it is the semantics.
        sparse = {i: n for i, n in sparse.items() if DENSE_FROM * n < values[i][0][0]}
    varspecs = specs()
    kind, layout = next(iter(tree.items()))
    tspec = TrainSpec(make_step(trained, varspecs), tuple(trained), tuple((tuple(s), d) for s, d in values),
                      tuple((tuple(s), d) for s, d in batch),
                      (kind, tuple(layout) if isinstance(layout, list) else layout), calls, chunked)
    return tspec, [i for i in range(len(values)) if i not in trained]


def _lower(fn, specs, donated=()):
    import jax

    jitted = jax.jit(fn, donate_argnums=tuple(donated), keep_unused=True)
    return jitted.lower(*_structs(specs)).as_text().replace("module @jit_fn", "module @ireeopt_train", 1)


def lower_train_step(tspec, loss):
    """StableHLO of the whole train step; every state argument (and the loss) donated."""
    import jax

    return _lower(flat_train_step(jax, tspec, loss), [a[2:] for a in tspec.arguments()], tspec.donated)


def lower_gradients(tspec, loss):
    """StableHLO of the gradient function (loss and gradients as fresh results)."""
    import jax

    return _lower(flat_gradients(jax, tspec, loss), [a[2:] for a in tspec.gradient_arguments()])
