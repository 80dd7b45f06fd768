"""Ahead-of-time artifacts: every step an optimizer needs, compiled for several targets.

An artifact directory holds ``manifest.json`` (the contract: optimizer class and
config, variables, each exported function's argument and result layout, the scalar
layout of the ``hyper`` input, and per target the module file, its exact
iree-compile flags and sha256), ``step.mlir`` (the StableHLO source, so a newer IREE
can recompile it: ``ireeopt recompile DIR``) and one ``<target>.vmfb`` per target.

Functions: ``step`` (every variable gets a dense gradient) and, when some variables
are marked sparse, ``step_sparse_<K>`` for each bucket K (those variables get
IndexedSlices padded to K rows, the others dense gradients); with a loss, also
``train_step`` (``opt.minimize``: forward, backward and update in one call; its
``TrainSpec`` is the manifest's ``train`` entry).
"""
import datetime
import hashlib
import importlib.metadata
import json
import os
import pathlib
import re
import shutil
import tempfile


from ..kernels.step import StepSpec, VarSpec
from .iree import compile_mlir
from .merge import merge_modules
from .targets import TARGETS, target_flags
from .trace import lower_step

SCHEMA = "ireeopt.artifact/1"
DEFAULT_SPARSE_BUCKETS = (64, 512, 4096, 32768)
MANIFEST, SOURCE = "manifest.json", "step.mlir"


def module_file(target):
    return target.replace(":", "-") + ".vmfb"


def _variable_specs(optimizer, variables, sparse):
    """[(name, shape, dtype, sparse, decayed)] from ireeopt.Variables or {name: spec}."""
    from ..runtime.variable import Variable

    out = []
    if isinstance(variables, dict):
        items = []
        for name, spec in variables.items():
            if not isinstance(spec, dict) or "shape" not in spec:
                raise ValueError(f"variable {name!r}: expected {{'shape': [...], 'dtype': ..., 'sparse': ...}}, "
                                 f"got {spec!r}")
            unknown = set(spec) - {"shape", "dtype", "sparse"}
            if unknown:
                raise ValueError(f"variable {name!r}: unknown keys {sorted(unknown)}")
            items.append((name, tuple(int(d) for d in spec["shape"]), spec.get("dtype", "float32"),
                          bool(spec.get("sparse", False)), None))
    else:
        items = []
        for var in variables:
            if not isinstance(var, Variable):
                raise TypeError(f"variables must be ireeopt.Variable objects or a {{name: spec}} dict, got {var!r}")
            items.append((var.name, var.shape, var.dtype, var.name in set(sparse or ()), var))
    names = [item[0] for item in items]
    if len(set(names)) != len(names):
        raise ValueError(f"variable names must be unique in an artifact, got {names}")
    for name in sparse or ():
        if name not in names:
            raise ValueError(f"sparse={name!r} names no variable ({names})")
    for name, shape, dtype, is_sparse, var in items:
        if is_sparse and not shape:
            raise ValueError(f"variable {name!r}: a scalar cannot take sparse gradients")
        excluded = optimizer._excluded(var) if var is not None else any(
            re.search(p, name) for p in optimizer._exclude_names)
        out.append((name, shape, str(dtype), is_sparse, bool(optimizer.weight_decay) and not excluded))
    return out


def _function_entry(name, spec, names):
    args = [{"kind": kind, "variable": None if i is None else names[i], "shape": list(shape), "dtype": dtype}
            for kind, i, shape, dtype in spec.arguments()]
    return {"name": name, "spec": spec.to_json(), "arguments": args, "results_alias_arguments": spec.donated}


class Artifact:
    """A compiled optimizer: ``manifest`` (dict), ``source`` (StableHLO text) and
    ``modules`` ({target: vmfb bytes}).  ``save(path)`` writes the directory."""

    def __init__(self, manifest, source, modules):
        self.manifest, self.source, self.modules = manifest, source, modules

    def save(self, path):
        """Write the artifact directory atomically (a temporary directory, then a rename)."""
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
        try:
            (tmp / SOURCE).write_text(self.source)
            for target, vmfb in self.modules.items():
                (tmp / module_file(target)).write_bytes(vmfb)
            (tmp / MANIFEST).write_text(json.dumps(self.manifest, indent=1))
            old = None
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
            os.replace(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path


def compile_modules(source, targets):
    """``{target: (vmfb, flags)}`` for a merged module source (sparse-safe flags)."""
    return {t: (compile_mlir(source, target_flags(t)), target_flags(t)) for t in targets}


def target_entry(target, vmfb, flags):
    return {"module": module_file(target), "flags": flags, "sha256": hashlib.sha256(vmfb).hexdigest(),
            "bytes": len(vmfb)}


def _train_entry(optimizer, specs, loss, batch, chunked):
    """(TrainSpec, StableHLO text) of ``loss`` over the artifact's variables and ``batch``
    (example arrays: only their shapes and dtypes are compiled in)."""
    from ..runtime.train import batch_arrays
    from .train import analyze, lower_train_step

    leaves, tree = batch_arrays(batch)
    decay = [s[4] for s in specs]

    def make_step(trained, varspecs):
        return StepSpec(optimizer._kind, tuple(varspecs), tuple(decay[i] for i in trained), optimizer._clip()[0],
                        getattr(optimizer, "amsgrad", False), optimizer.use_ema)

    tspec, untrained = analyze(loss, [(s[1], s[2]) for s in specs], [(a.shape, a.dtype.name) for a in leaves],
                               tree, make_step, chunked)
    if untrained:
        raise ValueError(f"the loss does not read the variable(s) {[specs[i][0] for i in untrained]}; leave them "
                         "out of the artifact's variables")
    return tspec, lower_train_step(tspec, loss)


def compile_artifact(optimizer, variables, targets=("llvm-cpu",), sparse=None,
                     sparse_buckets=DEFAULT_SPARSE_BUCKETS, loss=None, batch=None):
    """Compile every step ``optimizer`` needs for ``variables`` for each of ``targets``.

    ``variables``: ireeopt.Variables, or ``{name: {"shape": [...], "dtype": "float32",
    "sparse": bool}}``.  ``sparse``: names of Variables that take IndexedSlices gradients.
    ``loss`` and ``batch`` (an example batch): also compile the train step of
    ``opt.minimize(loss, variables, batch)`` as the function ``train_step``.
    """
    if (loss is None) != (batch is None):
        raise ValueError("give both `loss` and an example `batch` to compile a train step, or neither")

    targets = list(dict.fromkeys(targets))
    for t in targets:
        if t not in TARGETS:
            raise ValueError(f"unknown target {t!r}; available: {sorted(TARGETS)}")
    if not targets:
        raise ValueError("give at least one target")
    if callable(optimizer._learning_rate) and not hasattr(optimizer._learning_rate, "get_config"):
        raise ValueError("an artifact needs a number or a schedule as learning rate, not a callable "
                         "(a callable cannot be saved in the manifest)")
    buckets = sorted({int(k) for k in sparse_buckets})
    specs = _variable_specs(optimizer, variables, sparse)
    if any(s[3] for s in specs) and (not buckets or buckets[0] < 1):
        raise ValueError(f"sparse_buckets must be positive sizes, got {sparse_buckets}")
    names = [s[0] for s in specs]
    clip = optimizer._clip()[0]
    amsgrad = getattr(optimizer, "amsgrad", False)
    decay = tuple(s[4] for s in specs)

    def step_spec(bucket):
        return StepSpec(optimizer._kind, tuple(VarSpec(shape, dtype, bucket if is_sparse else None)
                                               for _, shape, dtype, is_sparse, _ in specs),
                        decay, clip, amsgrad, optimizer.use_ema)

    functions = {"step": step_spec(None)}
    if any(s[3] for s in specs):
        functions.update({f"step_sparse_{k}": step_spec(k) for k in buckets})
    texts = {name: lower_step(spec) for name, spec in functions.items()}
    train = None
    if loss is not None:
        train, texts["train_step"] = _train_entry(optimizer, specs, loss, batch,
                                                  chunked=any(t.startswith("vulkan") for t in targets))
    source = merge_modules(texts)
    compiled = compile_modules(source, targets)
    config = optimizer.get_config()
    json.dumps(config)   # must be serialisable (a schedule serialises as a dict)
    manifest = {
        "schema": SCHEMA,
        "ireeopt_version": importlib.metadata.version("ireeopt"),
        "iree_version": importlib.metadata.version("iree-base-compiler"),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "optimizer": {"class": type(optimizer).__name__, "config": config},
        "variables": [{"name": n, "shape": list(shape), "dtype": dtype, "sparse": is_sparse, "weight_decay": d}
                      for n, shape, dtype, is_sparse, d in specs],
        "slots": list(functions["step"].slot_names),
        "ema": optimizer.use_ema,
        "scalars": list(functions["step"].scalars),
        "sparse_buckets": buckets if len(functions) > 1 else [],
        "functions": [_function_entry(name, spec, names) for name, spec in functions.items()],
        "train": None if train is None else {
            "name": "train_step", "spec": train.to_json(),
            "arguments": [{"kind": kind, **({"batch": k} if kind == "batch" else
                                            {"variable": None if k is None else names[train.trained[k]]}),
                           "shape": list(shape), "dtype": dtype} for kind, k, shape, dtype in train.arguments()],
            "results_alias_arguments": train.donated},
        "source": SOURCE,
        "targets": {t: target_entry(t, vmfb, flags) for t, (vmfb, flags) in compiled.items()},
    }
    return Artifact(manifest, source, {t: vmfb for t, (vmfb, _) in compiled.items()})


