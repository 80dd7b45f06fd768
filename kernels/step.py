"""One whole-model optimizer step as a single pure function over flat arrays.

``StepSpec`` is the *structure* of a step (what is baked into a compiled module):
the optimizer kind, the variables that receive a gradient (shapes and dtypes),
which of them are weight-decayed, the clipping mode, amsgrad and EMA.
Everything users may change between steps travels in one float32 vector
``hyper`` (layout ``spec.scalars``), so changing it never recompiles.

Flat layout of the compiled function (``spec.arguments``)::

    params[k], grads[k], <slot kind>[k] for each slot kind, ema[k] (if use_ema), hyper
    -> params[k], <slot kind>[k]..., ema[k]

Every state argument is donated: output ``i`` is written into the buffer of
argument ``spec.donated[i]``.
"""
import hashlib
import json
from dataclasses import dataclass

from . import adam, adamax, clipping, ema, weight_decay

OPTIMIZERS = {"adam": adam, "adamax": adamax}
COMMON_SCALARS = ("lr", "wd", "clip") + ("ema_momentum", "ema_one_minus", "ema_overwrite")
LOW_PRECISION = ("float16", "bfloat16")
SUPPORTED_DTYPES = ("float32",) + LOW_PRECISION


def slot_dtype(dtype):
    """Slots and math are float32 for float16/bfloat16 variables (spec §9)."""
    return "float32" if dtype in LOW_PRECISION else dtype


@dataclass(frozen=True)
class VarSpec:
    shape: tuple
    dtype: str


@dataclass(frozen=True)
class StepSpec:
    optimizer: str                 # "adam" | "adamax"
    variables: tuple               # VarSpec of each variable that gets a gradient
    decay: tuple                   # bool per variable: weight decay applies
    clip: str = None               # None | "clipnorm" | "global_clipnorm" | "clipvalue"
    amsgrad: bool = False
    use_ema: bool = False

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer kind {self.optimizer!r}")
        if len(self.decay) != len(self.variables):
            raise ValueError("decay mask and variables differ in length")
        for v in self.variables:
            if v.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"unsupported variable dtype {v.dtype}; supported: {SUPPORTED_DTYPES}")

    @property
    def kernel(self):
        return OPTIMIZERS[self.optimizer]

    @property
    def slot_names(self):
        names = self.kernel.SLOTS
        return names + (adam.AMSGRAD_SLOT,) if self.amsgrad else names

    @property
    def scalars(self):
        return COMMON_SCALARS + self.kernel.CONSTANTS

    @property
    def state_names(self):
        """The donated state kinds, in argument and result order."""
        return ("params",) + self.slot_names + (("ema",) if self.use_ema else ())

    def arguments(self):
        """``[(kind, variable index, shape, dtype)]`` of the flat signature."""
        args = []
        for kind in ("params", "grads") + self.state_names[1:]:
            dtype_of = (lambda v: v.dtype) if kind in ("params", "grads") else (lambda v: slot_dtype(v.dtype))
            args += [(kind, i, v.shape, dtype_of(v)) for i, v in enumerate(self.variables)]
        return args + [("hyper", None, (len(self.scalars),), "float32")]

    def results(self):
        return [a for a in self.arguments() if a[0] in self.state_names]

    @property
    def donated(self):
        """Argument index aliased by each result, in result order."""
        return [i for i, a in enumerate(self.arguments()) if a[0] in self.state_names]

    def to_json(self):
        return {"optimizer": self.optimizer, "clip": self.clip, "amsgrad": self.amsgrad,
                "use_ema": self.use_ema, "decay": list(self.decay),
                "variables": [{"shape": list(v.shape), "dtype": v.dtype} for v in self.variables]}

    @classmethod
    def from_json(cls, d):
        return cls(d["optimizer"], tuple(VarSpec(tuple(v["shape"]), v["dtype"]) for v in d["variables"]),
                   tuple(d["decay"]), d["clip"], d["amsgrad"], d["use_ema"])

    def digest(self):
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()


def step(xp, spec, params, grads, slots, averages, hyper):
    """The whole-model step in spec §1 order: clip, weight decay, update, EMA.

    ``slots`` maps slot kind -> list per variable; ``hyper`` is indexable by the
    position of each name in ``spec.scalars``.  Returns (params, slots, averages).
    """
    c = {name: hyper[i] for i, name in enumerate(spec.scalars)}
    f32 = "float32"
    grads = clipping.clip(xp, spec.clip, [g.astype(f32) for g in grads], c["clip"])
    new_params, new_slots, new_avgs = [], {k: [] for k in spec.slot_names}, []
    for i, v in enumerate(spec.variables):
        p = params[i].astype(f32)
        if spec.decay[i]:
            p = weight_decay.apply(p, c["wd"], c["lr"])
        p, s = spec.kernel.update(xp, p, grads[i], {k: slots[k][i] for k in spec.slot_names}, c)
        p = p.astype(v.dtype)
        if spec.use_ema:
            avg = ema.update(averages[i], p.astype(slot_dtype(v.dtype)), c)
            new_avgs.append(avg)
            p = ema.overwrite(xp, p, avg.astype(v.dtype), c)
        new_params.append(p)
        for k in spec.slot_names:
            new_slots[k].append(s[k])
    return new_params, new_slots, new_avgs


def flat_step(xp, spec):
    """``step`` over the flat argument list of ``spec.arguments()``."""
    n = len(spec.variables)

    def fn(*args):
        params, grads = list(args[:n]), list(args[n:2 * n])
        rest = args[2 * n:]
        slots = {k: list(rest[j * n:(j + 1) * n]) for j, k in enumerate(spec.slot_names)}
        averages = list(rest[len(spec.slot_names) * n:len(spec.slot_names) * n + (n if spec.use_ema else 0)])
        p, s, a = step(xp, spec, params, grads, slots, averages, args[-1])
        out = list(p)
        for k in spec.slot_names:
            out += s[k]
        return tuple(out + a)

    return fn
