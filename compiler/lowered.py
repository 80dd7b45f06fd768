"""Steps shipped lowered: the StableHLO of the most common steps, made by ``lower_step``
ahead of time and kept in ``lowered.json.gz``, so that a first call that needs one of them
compiles it without importing jax (~0.9 s of a cold first call here; a process that finds
every step it needs here or in the compile cache never imports jax).

Which (``shipped_specs``): steps of any lengths (``kernels.step.dynamic_spec``) over float32
groups, the runtime's group steps and chain calls on the CPU (runtime/groups.py), for Adam,
AdamW (Adam with weight decay) and Adamax without amsgrad or EMA.  A text is used only with
the kernel sources and the lowering (compiler/trace.py) it was made from (their hashes are
part of its key): after either changes, the steps are lowered by jax again until the file
is rewritten::

    python -m ireeopt.compiler.lowered          # (tests/test_runtime.py checks it is current)
"""
import gzip
import hashlib
import json
import pathlib

from ..kernels import sources_hash
from ..kernels.step import CHAIN_MIN_GROUPS, CHAIN_WIDTH, WIDE_CHAIN_WIDTH, StepSpec, VarSpec, dynamic_spec
from .trace import lowering_hash

FILE = pathlib.Path(__file__).with_name("lowered.json.gz")
#: group steps over up to this many groups are shipped (more make a chain)
MAX_GROUPS = CHAIN_MIN_GROUPS + 1
_loaded = {}            # "steps": {key: text}, "sources": this process's (``_sources``)


def shipped_specs():
    """The specs of ``lowered.json.gz``: for Adam, AdamW and Adamax, steps over 1 to
    MAX_GROUPS groups and over WIDE_CHAIN_WIDTH (a wide chain's calls) without clipping or
    under clipvalue, and the steps a chain calls when it clips by a norm, which it is given
    (``norms="given"``: its CHAIN_WIDTH or WIDE_CHAIN_WIDTH variables, and under
    global_clipnorm the other groups', mostly one)."""
    plain = (*range(1, MAX_GROUPS + 1), WIDE_CHAIN_WIDTH)
    forms = [(None, None, plain), ("clipvalue", None, plain),
             ("clipnorm", "given", (CHAIN_WIDTH, WIDE_CHAIN_WIDTH)),
             ("global_clipnorm", "given", (1, CHAIN_WIDTH, WIDE_CHAIN_WIDTH))]
    return [dynamic_spec(StepSpec(kind, (VarSpec((1,), "float32"),), (decay,), clip, norms=norms), count)
            for kind, decay in (("adam", False), ("adam", True), ("adamax", False))
            for clip, norms, counts in forms for count in counts]


def _key(spec, sources):
    return hashlib.sha256(json.dumps({"spec": spec.to_json(), "sources": sources}, sort_keys=True).encode()).hexdigest()


def _sources():
    """What a shipped text was lowered from: the kernel sources and the lowering itself."""
    return {"kernels": sources_hash(), "lowering": lowering_hash()}


def shipped(spec):
    """The shipped StableHLO of ``spec`` for these kernel sources, or None."""
    if not spec.dynamic:
        return None
    if not _loaded:
        try:
            steps = json.loads(gzip.decompress(FILE.read_bytes()))["steps"]
        except (OSError, ValueError, KeyError):
            steps = {}
        _loaded.update(steps=steps, sources=_sources())
    return _loaded["steps"].get(_key(spec, _loaded["sources"]))


def write(path=FILE):
    """Lower every spec of ``shipped_specs`` (needs jax) and write them to ``path``."""
    import jax

    from .trace import lower_step   # (jax is imported inside)

    sources = _sources()
    steps = {_key(spec, sources): lower_step(spec) for spec in shipped_specs()}
    data = {"jax": jax.__version__, "sources": sources, "steps": steps}
    pathlib.Path(path).write_bytes(gzip.compress(json.dumps(data, sort_keys=True).encode(), mtime=0))
    _loaded.clear()
    return len(steps)


if __name__ == "__main__":
    print(f"wrote {write()} lowered steps to {FILE}")
