"""In-place device state, no per-step allocation, one module call per step, JAX-free
import, and the on-disk compile cache shared between processes."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import ireeopt
from ireeopt.runtime import cache
from ireeopt.runtime.device import Device
from ireeopt.runtime.module import StepModule

from .conftest import needs_vulkan


def _model(n=3, device="local-sync"):
    rng = np.random.default_rng(0)
    return [ireeopt.Variable(rng.standard_normal((64, 8)).astype(np.float32), name=f"w{i}", device=device)
            for i in range(n)]


@pytest.mark.parametrize("kwargs,n_state", [({"amsgrad": True, "clipnorm": 1.0, "weight_decay": 0.1}, 4),
                                             ({"use_ema": True, "ema_overwrite_frequency": 2}, 4)])
def test_state_is_updated_in_place_and_nothing_is_allocated_per_step(kwargs, n_state):
    """Allocator statistics on local-sync count every device allocation, transient ones too.
    (EMA combined with amsgrad or clipping, and global_clipnorm over several variables, still
    use one transient buffer inside the step; see README, Performance notes.)"""
    variables = _model()
    opt = ireeopt.Adam(**kwargs)
    grads = [np.full((64, 8), 0.1, np.float32) for _ in variables]
    opt.apply_gradients(zip(grads, variables))
    prepared, = opt._prepared.values()
    module, args = prepared.module, prepared.args
    state = [prepared.buffers[i].buffer for i in prepared.spec.donated]
    assert len(state) == len(prepared.spec.variables) * n_state
    allocator = Device.get("local-sync").hal_device.allocator
    assert allocator.has_statistics
    before = allocator.statistics["device_bytes_allocated"]
    for _ in range(20):
        opt.apply_gradients(zip(grads, variables))
    assert allocator.statistics["device_bytes_allocated"] == before
    # every result of a direct call is the very buffer that was passed in
    results = module(args)
    assert module.result_buffers(results) == state
    # the variables' memory is what the module updated: their own buffers, or slices of the
    # flat group buffers (clipnorm clips each variable by its own norm: a step per variable)
    params = [prepared.buffers[i] for i in prepared.spec.donated[:len(prepared.spec.variables)]]
    for var in variables:
        assert any(np.shares_memory(var._buffer.host, p.host) for p in params)
    assert len(prepared.spec.variables) == (len(variables) if "clipnorm" in kwargs else 1)


def test_one_module_call_per_step(monkeypatch):
    calls = []
    original = StepModule.__call__
    monkeypatch.setattr(StepModule, "__call__", lambda self, args: calls.append(1) or original(self, args))
    variables = _model(5)
    opt = ireeopt.AdamW(use_ema=True)
    for _ in range(4):
        opt.apply_gradients((np.ones((64, 8), np.float32), v) for v in variables)
    assert len(calls) == 4


def test_import_does_not_import_jax():
    code = "import sys, ireeopt; assert 'jax' not in sys.modules; assert 'iree.compiler' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


SCRIPT = textwrap.dedent("""
    import sys, numpy as np
    if sys.argv[1] == "blocked":
        sys.modules["jax"] = None            # any import of jax now raises ImportError
        sys.modules["iree.compiler"] = None
    import ireeopt
    w = ireeopt.Variable(np.arange(12, dtype=np.float32).reshape(3, 4), name="w")
    b = ireeopt.Variable(np.ones(4, np.float32), name="b")
    opt = ireeopt.AdamW(learning_rate=0.1, amsgrad=True)
    for step in range(3):
        opt.apply_gradients([(np.full((3, 4), step + 1.0, np.float32), w), (np.full(4, -1.0, np.float32), b)])
    np.save(sys.argv[2], np.concatenate([w.numpy().ravel(), b.numpy()]))
    print("jax" in sys.modules and sys.modules["jax"] is not None)
""")


def test_second_process_uses_the_disk_cache_without_jax(tmp_path):
    env = dict(os.environ, IREEOPT_CACHE_DIR=str(tmp_path / "cache"))
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    first = subprocess.run([sys.executable, str(script), "normal", str(tmp_path / "a.npy")], env=env,
                           capture_output=True, text=True, check=True)
    assert first.stdout.strip() == "True"                   # the first process compiled with jax
    assert len(list((tmp_path / "cache").glob("*.vmfb"))) == 1
    second = subprocess.run([sys.executable, str(script), "blocked", str(tmp_path / "b.npy")], env=env,
                            capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "False"
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))


def test_the_shipped_lowered_steps_are_current():
    """compiler/lowered.json.gz holds, for these kernel sources, exactly what ``lower_step``
    makes of each shipped spec (after changing a kernel: ``python -m ireeopt.compiler.lowered``)."""
    from ireeopt.compiler import lowered
    from ireeopt.compiler.trace import lower_step

    specs = lowered.shipped_specs()
    assert len(specs) == 75 and all(spec.dynamic for spec in specs)
    for spec in specs:
        assert lowered.shipped(spec) == lower_step(spec), spec


def test_a_common_step_compiles_without_jax(tmp_path):
    """With an empty compile cache and jax blocked, Adam and Adamax over 200 small variables
    (one float32 group: a shipped step) compile from the shipped StableHLO, and the values
    are the float64 reference's."""
    from .reference import Reference

    code = textwrap.dedent("""
        import sys, numpy as np
        sys.modules["jax"] = None
        import ireeopt
        kind = sys.argv[1]
        rng = np.random.default_rng(3)
        variables = [ireeopt.Variable(rng.standard_normal(327).astype(np.float32), name=f"w{i}") for i in range(200)]
        opt = ireeopt.Adam(learning_rate=0.01) if kind == "adam" else ireeopt.Adamax(learning_rate=0.01)
        for _ in range(3):
            opt.apply_gradients([(rng.standard_normal(327).astype(np.float32), v) for v in variables])
        np.save(sys.argv[2], np.stack([v.numpy() for v in variables]))
    """)
    for kind in ("adam", "adamax"):
        env = dict(os.environ, IREEOPT_CACHE_DIR=str(tmp_path / f"cache-{kind}"))
        done = subprocess.run([sys.executable, "-c", code, kind, str(tmp_path / f"{kind}.npy")], env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        rng = np.random.default_rng(3)
        init = [rng.standard_normal(327).astype(np.float32) for _ in range(200)]
        ref = Reference(kind, init, [f"w{i}" for i in range(200)], learning_rate=0.01)
        for _ in range(3):
            ref.step([rng.standard_normal(327).astype(np.float32) for _ in range(200)])
        np.testing.assert_allclose(np.load(tmp_path / f"{kind}.npy"), np.stack(ref.p), rtol=2e-5, atol=2e-6)


def test_a_cache_miss_without_the_compiler_says_what_to_do(tmp_path):
    code = textwrap.dedent("""
        import sys, numpy as np
        sys.modules["jax"] = None
        sys.modules["iree.compiler"] = None
        import ireeopt
        w = ireeopt.Variable(np.ones(5, np.float32), name="w")
        try:
            ireeopt.Adam().apply_gradients([(np.ones(5, np.float32), w)])
        except RuntimeError as e:
            print(e)
    """)
    env = dict(os.environ, IREEOPT_CACHE_DIR=str(tmp_path / "empty-cache"))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "not in the compile cache" in done.stdout and "install jax" in done.stdout.lower()


def test_steps_compiled_together_are_the_steps_compiled_alone(tmp_path, monkeypatch):
    """``compile_vmfbs`` compiles the steps a first call needs at the same time (one
    iree-compile process each): the modules are byte for byte those compiled one by one,
    and all land in the disk cache; a compile that fails raises in the caller after the
    others are done, and no file is written (none is before all have compiled)."""
    from ireeopt import compiler
    from ireeopt.kernels.step import StepSpec, VarSpec

    specs = [StepSpec("adam", (VarSpec((5, 3), "float32"),), (False,)),
             StepSpec("adamax", (VarSpec((7,), "float32"), VarSpec((2,), "float32")), (True, True))]
    monkeypatch.setenv("IREEOPT_CACHE_DIR", str(tmp_path / "alone"))
    alone = [cache.compile_vmfb(spec, "llvm-cpu") for spec in specs]
    monkeypatch.setenv("IREEOPT_CACHE_DIR", str(tmp_path / "together"))
    assert cache.compile_vmfbs(specs, "llvm-cpu") == alone
    assert sorted(p.name for p in (tmp_path / "together").glob("*.vmfb")) == \
        sorted(f"{cache.cache_key(spec, 'llvm-cpu')}.vmfb" for spec in specs)

    real = compiler.compile_mlir

    def failing(text, flags):
        if "stablehlo.maximum" in text:             # (Adamax's u)
            raise RuntimeError("iree-compile failed")
        return real(text, flags)

    monkeypatch.setattr(compiler, "compile_mlir", failing)
    monkeypatch.setenv("IREEOPT_CACHE_DIR", str(tmp_path / "failing"))
    with pytest.raises(RuntimeError, match="iree-compile failed"):
        cache.compile_vmfbs(specs, "llvm-cpu")
    assert [p.name for p in (tmp_path / "failing").glob("*.vmfb")] == []


def test_cache_key_depends_on_structure():
    from ireeopt.kernels.step import StepSpec, VarSpec
    a = StepSpec("adam", (VarSpec((3,), "float32"),), (False,))
    assert cache.cache_key(a, "llvm-cpu") == cache.cache_key(StepSpec("adam", (VarSpec((3,), "float32"),), (False,)),
                                                             "llvm-cpu")
    for other in (StepSpec("adam", (VarSpec((4,), "float32"),), (False,)),
                  StepSpec("adam", (VarSpec((3,), "float32"),), (True,)),
                  StepSpec("adam", (VarSpec((3,), "float32"),), (False,), amsgrad=True),
                  StepSpec("adamax", (VarSpec((3,), "float32"),), (False,)),
                  StepSpec("adam", (VarSpec((3,), "bfloat16"),), (False,))):
        assert cache.cache_key(other, "llvm-cpu") != cache.cache_key(a, "llvm-cpu")
    assert cache.cache_key(a, "llvm-cpu", 2048) not in (cache.cache_key(a, "llvm-cpu"), cache.cache_key(a, "llvm-cpu", 4096))


@pytest.mark.parametrize("device", ["local-task", pytest.param("vulkan", marks=needs_vulkan)])
def test_devices_agree(device):
    """The same steps on another driver give the local-sync result (`cpu` is local-sync)."""
    results = []
    for dev in ("local-sync", device):
        variables = _model(2, device=dev)
        opt = ireeopt.Adam(learning_rate=0.01)
        for step in range(3):
            opt.apply_gradients((np.full((64, 8), step - 1.0, np.float32), v) for v in variables)
        results.append([v.numpy() for v in variables])
    for a, b in zip(*results):
        if device == "vulkan":      # another compiler backend: equal to rounding
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
        else:
            np.testing.assert_array_equal(a, b)
    assert Device.get("cpu") is Device.get("local-sync")


def test_variable_api():
    v = ireeopt.Variable([1.0, 2.0], name="v")
    assert v.dtype == "float32" and v.shape == (2,) and v.device == "cpu" and v.name == "v"
    v.assign(np.array([3, 4]))
    np.testing.assert_array_equal(v.numpy(), [3, 4])
    with pytest.raises(ValueError, match="shape"):
        v.assign([1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="float64"):
        ireeopt.Variable(np.zeros(3))
    with pytest.raises(ValueError, match="device"):
        ireeopt.Variable([1.0], device="tpu")
    assert ireeopt.Variable(np.zeros(2, np.float16)).dtype == "float16"
    assert ireeopt.Variable(np.zeros(2), dtype="bfloat16").dtype == "bfloat16"


@pytest.fixture
def staged_device(monkeypatch):
    """A local-task device treated as not host-mappable: its buffers are device-local and go
    through host staging and queued copies, the path CUDA takes (no GPU is needed to test it)."""
    device = Device("local-task", "llvm-cpu")
    device.mappable = False
    monkeypatch.setitem(Device._instances, ("local-task", 7), device)
    return "local-task:7"


@pytest.mark.parametrize("jit_compile", [True, False])
def test_staged_buffers_give_the_mapped_result(staged_device, jit_compile):
    results = []
    for device in ("local-sync", staged_device):
        rng = np.random.default_rng(4)
        variables = [ireeopt.Variable(rng.standard_normal(s).astype(np.float32), name=f"w{i}", device=device)
                     for i, s in enumerate([(64, 8), (8,), (30, 4)])]
        opt = ireeopt.AdamW(learning_rate=0.01, amsgrad=True, use_ema=True, jit_compile=jit_compile)
        for step in range(4):
            grads = [rng.standard_normal(v.shape).astype(np.float32) for v in variables]
            grads[2] = ireeopt.IndexedSlices(rng.standard_normal((5, 4)).astype(np.float32), rng.integers(0, 30, 5))
            opt.apply_gradients(zip(grads, variables))
        variables[1].assign(np.arange(8))
        results.append([v.numpy() for v in variables] + [np.asarray(v.numpy()) for v in opt.variables])
    assert all(v._buffer.host is None for v in variables)       # really staged
    for a, b in zip(*results):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
