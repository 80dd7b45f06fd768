"""Compiled-step cache: in memory per device, and on disk across processes.

The disk key covers everything a module depends on: the step structure
(optimizer kind, variable shapes/dtypes, which variables get gradients and which
of them sparsely in which bucket, clip mode, amsgrad, EMA, weight-decay mask),
the target and its exact iree-compile flags (and workgroup tile: compiler/tiles.py), the host CPU
(``-target-cpu=host``), the IREE version, and a hash of the kernel sources.
Set ``IREEOPT_CACHE_DIR`` to move it (default ``~/.cache/ireeopt``).
"""
import atexit
import hashlib
import importlib.metadata
import json
import os
import pathlib
import platform
import sys
import tempfile
import threading
import time

from ..compiler.targets import step_flags
from ..compiler.trace import lowering_hash
from ..kernels import sources_hash as kernel_sources
from .module import LoadedModule

_memory = {}
_lock = threading.Lock()


def iree_version():
    return importlib.metadata.version("iree-base-runtime")


def _host_cpu():
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return f"{platform.machine()}:{hashlib.sha256(flags.encode()).hexdigest()[:16]}"


_STATIC = {}


def _static():
    """What every cached module also depends on: kernel sources, how they are lowered, host
    CPU, IREE version."""
    if not _STATIC:
        _STATIC.update(kernels=kernel_sources(), lowering=lowering_hash(), cpu=_host_cpu(), iree=iree_version())
    return _STATIC


def cache_key(spec, target, tile=None):
    """The disk key of ``spec`` compiled for ``target`` (with workgroups of ``tile``
    elements: compiler/tiles.py; None, IREE's own)."""
    key = {"spec": spec.to_json(), "target": target, "flags": step_flags(target, spec), **_static()}
    if tile is not None:
        key["tile"] = tile
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def cache_dir():
    return pathlib.Path(os.environ.get("IREEOPT_CACHE_DIR", pathlib.Path.home() / ".cache" / "ireeopt"))


def _write_atomic(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class _SlowNotice:
    """Prints a line to stderr when a compile takes longer than a second."""

    def __init__(self, what):
        self.what, self.shown = what, False

    def __enter__(self):
        self.start = time.perf_counter()
        self.timer = threading.Timer(1.0, self._show)
        self.timer.daemon = True
        self.timer.start()
        return self

    def _show(self):
        self.shown = True
        print(f"ireeopt: compiling {self.what} ...", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        self.timer.cancel()
        if self.shown and exc[0] is None:
            print(f"ireeopt: compiled {self.what} in {time.perf_counter() - self.start:.1f} s",
                  file=sys.stderr, flush=True)


def compile_vmfb(spec, target):
    """vmfb bytes for ``spec`` on ``target``, from the disk cache or a fresh compile."""
    return compile_vmfbs([spec], target)[0]


def compile_vmfbs(specs, target, tiles=None):
    """vmfb bytes for each of ``specs`` on ``target`` (with workgroups of ``tiles[k]``
    elements, where given: compiler/tiles.py), from the disk cache or fresh compiles.
    Those to compile are lowered one after another (by jax, unless shipped lowered:
    compiler/lowered.py) and compiled at the same time, each by an iree-compile process of its
    own started as soon as its StableHLO is ready: on 2 cores a first call that needs 2 steps
    took ~1.0 s of iree-compile against 1.8."""
    tiles = tiles or [None] * len(specs)
    paths = [cache_dir() / f"{cache_key(spec, target, tile)}.vmfb" for spec, tile in zip(specs, tiles)]
    out = []
    for path in paths:
        try:
            out.append(path.read_bytes())
        except OSError:
            out.append(None)
    missing = [k for k, vmfb in enumerate(out) if vmfb is None]
    if not missing:
        return out
    kinds = sorted({specs[k].optimizer for k in missing})
    what = (f"{kinds[0]} step for {len(specs[missing[0]].variables)} variable(s) ({target})" if len(missing) == 1
            else f"{len(missing)} {'/'.join(kinds)} steps ({target})")
    try:
        with _SlowNotice(what):
            for k, vmfb in zip(missing, _compile_all([specs[k] for k in missing], target, [tiles[k] for k in missing])):
                out[k] = vmfb
    except ImportError as e:
        raise RuntimeError(f"the {what} is not in the compile cache ({cache_dir()}) and cannot be compiled "
                           f"here: {e}. Install jax and iree-base-compiler, or use an artifact "
                           "(ireeopt.compile / ireeopt.load)") from e
    for k in missing:
        try:
            _write_atomic(paths[k], out[k])
        except OSError:
            pass  # an unwritable cache only costs a recompile next time
    return out


def _compile_all(specs, target, tiles):
    """The vmfb of each spec (with workgroups of its tile of ``tiles``, or IREE's): lowered
    here (or shipped lowered: compiler/lowered.py), one after another, each compiled on a
    thread of its own (iree-compile runs as a process) while the next is lowered; a failure
    is raised once all are done."""
    from concurrent.futures import ThreadPoolExecutor

    from ..compiler import compile_mlir, lower_step   # JAX-free to import; jax and iree.compiler load inside
    from ..compiler.lowered import shipped
    from ..compiler.tiles import tile_flags

    with ThreadPoolExecutor(len(specs), thread_name_prefix="ireeopt-compile") as pool:
        futures = [pool.submit(compile_mlir, shipped(spec) or lower_step(spec), step_flags(target, spec) + tile_flags(tile))
                   for spec, tile in zip(specs, tiles)]
    return [future.result() for future in futures]


def traced_module(key, lower, flags, device, what):
    """The ``LoadedModule`` of StableHLO from ``lower()`` (called at most once per ``key``
    in this process; jax is needed): the disk cache is keyed by the text itself.
    ``flags``: the iree-compile flags, or a function of the text that returns them."""
    memory_key = (key, device.key)
    with _lock:
        module = _memory.get(memory_key)
    if module is not None:
        return module
    text = lower()
    if callable(flags):
        flags = flags(text)
    digest = hashlib.sha256(json.dumps({"text": text, "flags": flags, **_static()}, sort_keys=True).encode())
    path = cache_dir() / f"{digest.hexdigest()}.vmfb"
    try:
        vmfb = path.read_bytes()
    except OSError:
        from ..compiler import compile_mlir

        with _SlowNotice(what):
            vmfb = compile_mlir(text, flags)
        try:
            _write_atomic(path, vmfb)
        except OSError:
            pass
    module = LoadedModule(device, vmfb)
    with _lock:
        return _memory.setdefault(memory_key, module)


def step_module(spec, device, tile=None):
    """The loaded ``StepModule`` for ``spec`` on ``device`` (compiled at most once; with
    workgroups of ``tile`` elements: compiler/tiles.py)."""
    return step_modules([spec], device, [tile])[0]


def step_modules(specs, device, tiles=None):
    """The loaded ``StepModule`` of each of ``specs`` on ``device`` (each compiled at most
    once, with workgroups of ``tiles[k]`` elements where given; those not yet loaded come
    from ``compile_vmfbs``, compiled at the same time)."""
    keys = [(spec, device.key, tile) for spec, tile in zip(specs, tiles or [None] * len(specs))]
    with _lock:
        missing = list(dict.fromkeys(key for key in keys if key not in _memory))
        if missing:
            vmfbs = compile_vmfbs([spec for spec, _, _ in missing], device.target, [tile for _, _, tile in missing])
            for key, vmfb in zip(missing, vmfbs):
                _load(key, device, vmfb)
        return [_memory[key] for key in keys]


def _load(key, device, vmfb):
    """Load ``vmfb`` on ``device`` as the step module of memory key (spec, device key, tile)."""
    spec, _, tile = key
    module = _memory[key] = LoadedModule(device, vmfb).step("main", spec)
    module.tile = tile


def twin_modules(modules, device):
    """Each of the loaded ``modules`` (``StepModule``s) on ``device`` too, which has their
    compile target: the same vmfb, loaded once (no compile, no disk)."""
    keys = [(module.spec, device.key, module.tile) for module in modules]
    with _lock:
        for key, module in zip(keys, modules):
            if key not in _memory:
                if device.target != module.loaded.device.target:
                    raise ValueError(f"a {module.loaded.device.target} module cannot run on {device.key}")
                _load(key, device, module.loaded.vmfb)
        return [_memory[key] for key in keys]


@atexit.register
def _release():
    """Drop loaded modules before interpreter teardown (nanobind reports them as leaks otherwise)."""
    _memory.clear()
