"""One whole-model optimizer step as a single pure function over flat arrays.

``StepSpec`` is the *structure* of a step (what is baked into a compiled module):
the optimizer kind, the variables that receive a gradient (shapes and dtypes),
which of them are weight-decayed, the clipping mode, amsgrad and EMA.
Everything users may change between steps travels in one float32 vector
``hyper`` (layout ``spec.scalars``), so changing it never recompiles.

Flat layout of the compiled function (``spec.arguments``)::

    params[k], <gradient of each variable>, <slot kind>[k] for each slot kind,
    ema[k] (if use_ema), hyper  ->  params[k], <slot kind>[k]..., ema[k]

A dense gradient is one argument ("grads", the variable's shape and dtype).  A sparse
one (``VarSpec.sparse = K``, a bucket size) is four: "rows" [K, *row shape] float32,
"indices" [K] int32, "count" int32 and "sumsq" float32 (see kernels/sparse.py).
A sparse Adam variable also has a donated float32 "scratch" table after the EMA
averages (argument and result), and, before "hyper", a "stale" [K] int32 list of the
rows the previous sparse step left in it.

Every state argument is donated: output ``i`` is written into the buffer of
argument ``spec.donated[i]``.

With ``norms="given"`` (a chain of steps on the host's memory, runtime/groups.py) the
squared norms that clipping needs come in rather than being computed: under clipnorm a
"sumsq" scalar (float32) after each gradient; under global_clipnorm the total, as one more
scalar of ``hyper``, "sumsq".
"""
import functools
import hashlib
import json
from dataclasses import dataclass

from . import adam, adamax, clipping, ema, sparse, weight_decay

OPTIMIZERS = {"adam": adam, "adamax": adamax}
COMMON_SCALARS = ("lr", "wd", "clip", "ema_momentum", "ema_one_minus", "ema_overwrite")
LOW_PRECISION = ("float16", "bfloat16")
SUPPORTED_DTYPES = ("float32",) + LOW_PRECISION


def size_of(shape):
    """The number of elements of ``shape``."""
    n = 1
    for d in shape:
        n *= int(d)
    return n


def slot_dtype(dtype):
    """Slots and math are float32 for float16/bfloat16 variables (spec §9)."""
    return "float32" if dtype in LOW_PRECISION else dtype


@dataclass(frozen=True)
class VarSpec:
    shape: tuple
    dtype: str
    sparse: int = None             # bucket size K of a sparse (IndexedSlices) gradient, or None

    def gradient_arguments(self):
        """``[(kind, shape, dtype)]`` of this variable's gradient inputs."""
        if self.sparse is None:
            return [("grads", self.shape, self.dtype)]
        k = self.sparse
        return [("rows", (k,) + tuple(self.shape[1:]), "float32"), ("indices", (k,), "int32"),
                ("count", (), "int32"), ("sumsq", (), "float32")]


@dataclass(frozen=True)
class StepSpec:
    optimizer: str                 # "adam" | "adamax"
    variables: tuple               # VarSpec of each variable that gets a gradient
    decay: tuple                   # bool per variable: weight decay applies
    clip: str = None               # None | "clipnorm" | "global_clipnorm" | "clipvalue"
    amsgrad: bool = False
    use_ema: bool = False
    norms: str = None              # None (computed) | "given": see the module docstring

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer kind {self.optimizer!r}")
        if len(self.decay) != len(self.variables):
            raise ValueError("decay mask and variables differ in length")
        for v in self.variables:
            if v.sparse is not None and not v.shape:
                raise ValueError("a sparse gradient needs a variable of rank >= 1")
            if v.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"unsupported variable dtype {v.dtype}; supported: {SUPPORTED_DTYPES}")
        if self.norms not in (None, "given"):
            raise ValueError(f"unknown norms {self.norms!r}")
        if self.norms and (self.clip not in ("clipnorm", "global_clipnorm")
                           or any(v.sparse is not None for v in self.variables)):
            raise ValueError("given norms need clipping by a norm and dense gradients")

    @property
    def dynamic(self):
        """Whether the variables are 1-D of lengths fixed only when it runs (``dynamic_spec``)."""
        return any(v.shape == (None,) for v in self.variables)

    @property
    def kernel(self):
        return OPTIMIZERS[self.optimizer]

    @property
    def slot_names(self):
        names = self.kernel.SLOTS
        return names + (adam.AMSGRAD_SLOT,) if self.amsgrad else names

    @functools.cached_property
    def scalars(self):
        """The names of the ``hyper`` vector's entries, in order (cached: read every step)."""
        total = self.norms and self.clip == "global_clipnorm"
        return COMMON_SCALARS + self.kernel.CONSTANTS + (("sumsq",) if total else ())

    @property
    def state_names(self):
        """The donated state kinds, in argument and result order."""
        return ("params",) + self.slot_names + (("ema",) if self.use_ema else ())

    def arguments(self):
        """``[(kind, variable index, shape, dtype)]`` of the flat signature."""
        args = [("params", i, v.shape, v.dtype) for i, v in enumerate(self.variables)]
        for i, v in enumerate(self.variables):
            args += [(kind, i, shape, dtype) for kind, shape, dtype in v.gradient_arguments()]
            if self.norms and self.clip == "clipnorm":
                args.append(("sumsq", i, (), "float32"))
        for kind in self.state_names[1:]:
            args += [(kind, i, v.shape, slot_dtype(v.dtype)) for i, v in enumerate(self.variables)]
        args += [("scratch", i, self.variables[i].shape, "float32") for i in self.scratch_variables]
        args += [("stale", i, (self.variables[i].sparse,), "int32") for i in self.scratch_variables]
        return args + [("hyper", None, (len(self.scalars),), "float32")]

    @property
    def scratch_variables(self):
        """Indices of the variables with a scratch table (sparse gradients under Adam)."""
        if self.optimizer != "adam":
            return []
        return [i for i, v in enumerate(self.variables) if v.sparse is not None]

    @property
    def donated(self):
        """Argument index aliased by each result, in result order."""
        kinds = self.state_names + ("scratch",)
        return [i for i, a in enumerate(self.arguments()) if a[0] in kinds]

    def results(self):
        """``[(kind, variable index, shape, dtype)]`` of the results: the donated arguments."""
        args = self.arguments()
        return [args[i] for i in self.donated]

    def to_json(self):
        out = {"optimizer": self.optimizer, "clip": self.clip, "amsgrad": self.amsgrad,
               "use_ema": self.use_ema, "decay": list(self.decay),
               "variables": [{"shape": list(v.shape), "dtype": v.dtype, "sparse": v.sparse}
                             for v in self.variables]}
        if self.norms:                  # (absent otherwise: the other specs' digests are unchanged)
            out["norms"] = self.norms
        return out

    @classmethod
    def from_json(cls, d):
        return cls(d["optimizer"], tuple(VarSpec(tuple(v["shape"]), v["dtype"], v.get("sparse"))
                                         for v in d["variables"]),
                   tuple(d["decay"]), d["clip"], d["amsgrad"], d["use_ema"], d.get("norms"))

    def digest(self):
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()


#: the steps of any lengths (``dynamic_spec``) that chain a model's large variables
#: (runtime/groups.py, which says why): a model with more than CHAIN_MIN_GROUPS of them
#: updates them CHAIN_WIDTH a call, or WIDE_CHAIN_WIDTH a call where one weight-decay class
#: has more than WIDE_CHAIN_WIDTH (``chain_width``); the steps shipped lowered follow
#: (compiler/lowered.py)
CHAIN_MIN_GROUPS = 8
CHAIN_WIDTH = 8
WIDE_CHAIN_WIDTH = 32


def chain_width(count):
    """How many of ``count`` large variables (of one weight-decay class) a chain's call updates."""
    return WIDE_CHAIN_WIDTH if count > WIDE_CHAIN_WIDTH else CHAIN_WIDTH


def dynamic_spec(spec, count):
    """A spec like ``spec`` (its settings; its variables' decay, which must agree) over
    ``count`` dense float32 1-D variables of any lengths: compiled once, it updates any such
    variables, of any sizes (``lower_step`` exports it with symbolic lengths)."""
    if len(set(spec.decay)) > 1:
        raise ValueError("the variables of a dynamic step must agree on weight decay")
    decay = spec.decay[0] if spec.decay else False
    return StepSpec(spec.optimizer, (VarSpec((None,), "float32"),) * count, (decay,) * count, spec.clip,
                    spec.amsgrad, spec.use_ema, spec.norms)


def step(xp, spec, params, grads, slots, averages, scratch, hyper, sumsqs=None):
    """The whole-model step in spec §1 order: clip, weight decay, update, EMA (a sparse
    gradient's duplicates were summed on the host, after its clipvalue).

    ``grads[i]`` is an array (dense) or a dict with "rows", "indices", "count", "sumsq"
    (and "stale" under Adam) (sparse); ``slots`` maps slot kind -> list per variable; ``hyper`` is indexable
    by the position of each name in ``spec.scalars``; ``scratch`` maps variable index ->
    scratch table; ``sumsqs``: each dense gradient's given squared norm (``norms="given"``
    under clipnorm).  Returns (params, slots, averages, scratch).
    """
    c = {name: hyper[i] for i, name in enumerate(spec.scalars)}
    f32 = "float32"
    sparse_vars = [v.sparse is not None for v in spec.variables]
    dense = [g["rows"] if s else g.astype(f32) for g, s in zip(grads, sparse_vars)]
    if spec.norms and spec.clip == "global_clipnorm":
        clipped = clipping.clip_by_global_norm(xp, dense, c["clip"], [c["sumsq"]])
    else:
        given = sumsqs or [None] * len(grads)
        clipped = clipping.clip(xp, spec.clip, dense, c["clip"],
                                sumsqs=[g["sumsq"] if s else n for g, s, n in zip(grads, sparse_vars, given)],
                                host_clipped=sparse_vars)
    new_params, new_slots, new_avgs, new_scratch = [], {k: [] for k in spec.slot_names}, [], {}
    for i, v in enumerate(spec.variables):
        var_slots = {k: slots[k][i] for k in spec.slot_names}
        if v.sparse is None:
            p = params[i].astype(f32)
            if spec.decay[i]:
                p = weight_decay.apply(p, c["wd"], c["lr"])
            p, s = spec.kernel.update(xp, p, clipped[i], var_slots, c)
        else:
            g, rows = grads[i], clipped[i]
            if spec.optimizer == "adamax":
                decay = (c["wd"], c["lr"]) if spec.decay[i] else None
                p, s = sparse.adamax_lazy(xp, params[i], rows, g["indices"], g["count"], var_slots, c, decay)
            else:
                p = params[i].astype(f32)
                if spec.decay[i]:
                    p = weight_decay.apply(p, c["wd"], c["lr"])
                p, s, new_scratch[i] = sparse.adam_dense_equivalent(xp, p, rows, g["indices"], g["stale"],
                                                                    var_slots, scratch[i], c)
        p = p.astype(v.dtype)
        if spec.use_ema:
            avg = ema.update(averages[i], p.astype(slot_dtype(v.dtype)), c)
            new_avgs.append(avg)
            p = ema.overwrite(xp, p, avg.astype(v.dtype), c)
        new_params.append(p)
        for k in spec.slot_names:
            new_slots[k].append(s[k])
    return new_params, new_slots, new_avgs, new_scratch


def flat_step(xp, spec):
    """``step`` over the flat argument list of ``spec.arguments()``."""
    layout = spec.arguments()

    def fn(*args):
        named = {}
        for (kind, i, _, _), value in zip(layout, args):
            named.setdefault(kind, {})[i] = value
        n = len(spec.variables)
        grads = [named["grads"][i] if v.sparse is None else
                 {k: named[k][i] for k in ("rows", "indices", "count", "sumsq", "stale") if i in named.get(k, {})}
                 for i, v in enumerate(spec.variables)]
        slots = {k: [named[k][i] for i in range(n)] for k in spec.slot_names}
        averages = [named["ema"][i] for i in range(n)] if spec.use_ema else []
        sumsqs = [named["sumsq"][i] for i in range(n)] if spec.norms and spec.clip == "clipnorm" else None
        p, s, a, z = step(xp, spec, [named["params"][i] for i in range(n)], grads, slots, averages,
                          named.get("scratch", {}), args[-1], sumsqs)
        out = list(p)
        for k in spec.slot_names:
            out += s[k]
        return tuple(out + a + [z[i] for i in spec.scratch_variables])

    return fn
