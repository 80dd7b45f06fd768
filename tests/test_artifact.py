"""AOT artifacts: compile for llvm-cpu, vulkan-spirv and cuda; run the same artifact on
local-task, local-sync and Vulkan (lavapipe) without JAX; clear errors for bad artifacts."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import ireeopt
from ireeopt.kernels.step import StepSpec

from .conftest import HAS_VULKAN, needs_cuda, needs_vulkan

SPEC = {"embedding": {"shape": [60, 8], "dtype": "float32", "sparse": True},
        "dense/kernel": {"shape": [8, 4], "dtype": "float32", "sparse": False},
        "dense/bias": {"shape": [4], "dtype": "float32"}}
TARGETS = ["llvm-cpu", "vulkan-spirv", "cuda"]


def _optimizer():
    opt = ireeopt.AdamW(learning_rate=ireeopt.schedules.ExponentialDecay(0.01, 4, 0.8), weight_decay=0.02,
                        amsgrad=True, use_ema=True, ema_overwrite_frequency=3, global_clipnorm=2.0)
    opt.exclude_from_weight_decay(var_names=["bias$"])
    return opt


@pytest.fixture(scope="module")
def artifact_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("artifact") / "adamw"
    ireeopt.compile(_optimizer(), SPEC, targets=TARGETS, sparse_buckets=[16, 128]).save(path)
    return path


def _trajectory(make_optimizer, device, steps=6):
    rng = np.random.default_rng(0)
    variables = {n: ireeopt.Variable(rng.standard_normal(s["shape"]).astype(np.float32), name=n, device=device)
                 for n, s in SPEC.items()}
    opt = make_optimizer()
    for step in range(steps):
        k = [5, 16, 40, 0, 3, 100][step]
        grads = [(ireeopt.IndexedSlices(rng.standard_normal((k, 8)).astype(np.float32), rng.integers(0, 60, k)),
                  variables["embedding"]),
                 (rng.standard_normal((8, 4)).astype(np.float32), variables["dense/kernel"]),
                 (rng.standard_normal(4).astype(np.float32), variables["dense/bias"])]
        if step == 4:            # an all-dense step uses the artifact's `step` function
            grads[0] = (rng.standard_normal((60, 8)).astype(np.float32), variables["embedding"])
        opt.apply_gradients(grads)
    return {n: v.numpy() for n, v in variables.items()}, opt


def test_manifest(artifact_dir):
    manifest = json.loads((artifact_dir / "manifest.json").read_text())
    assert manifest["schema"] == "ireeopt.artifact/1" and manifest["iree_version"] == "3.13.0"
    assert manifest["optimizer"]["class"] == "AdamW"
    assert ireeopt.AdamW.from_config(manifest["optimizer"]["config"]).get_config() == manifest["optimizer"]["config"]
    assert [f["name"] for f in manifest["functions"]] == ["step", "step_sparse_16", "step_sparse_128"]
    assert [v["weight_decay"] for v in manifest["variables"]] == [True, True, False]
    assert set(manifest["targets"]) == set(TARGETS)
    for target, entry in manifest["targets"].items():
        data = (artifact_dir / entry["module"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and entry["flags"]
    for function in manifest["functions"]:        # the layout is complete and round-trips
        spec = StepSpec.from_json(function["spec"])
        assert StepSpec.from_json(spec.to_json()) == spec
        assert [a["kind"] for a in function["arguments"]] == [a[0] for a in spec.arguments()]
        aliased = [function["arguments"][i] for i in function["results_alias_arguments"]]
        state = {"params", "m", "v", "vhat", "ema", "scratch"}
        assert all(a["kind"] in state for a in aliased)        # only state is written, never a gradient
        assert len(aliased) == 3 * 5 + (1 if function["name"] != "step" else 0)   # 3 vars x 5 kinds (+ scratch)
    assert "func.func public @step_sparse_128" in (artifact_dir / "step.mlir").read_text()


@pytest.mark.parametrize("device", ["local-task", "local-sync", pytest.param("vulkan", marks=needs_vulkan)])
def test_loaded_artifact_matches_the_keras_like_path(artifact_dir, device):
    expected, _ = _trajectory(_optimizer, "cpu")
    got, opt = _trajectory(lambda: ireeopt.load(artifact_dir, device=device), device)
    assert int(opt.iterations) == 6
    for name in SPEC:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-7, err_msg=name)


@needs_cuda
def test_loaded_artifact_on_cuda(artifact_dir):
    expected, _ = _trajectory(_optimizer, "cpu")
    got, _ = _trajectory(lambda: ireeopt.load(artifact_dir, device="cuda"), "cuda")
    for name in SPEC:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-7, err_msg=name)


RUNTIME_ONLY = textwrap.dedent("""
    import sys, json, numpy as np
    sys.modules["jax"] = None              # importing jax or the IREE compiler now raises ImportError
    sys.modules["jaxlib"] = None
    sys.modules["iree.compiler"] = None
    sys.path.insert(0, sys.argv[3])
    from tests.test_artifact import _trajectory
    import ireeopt
    got, _ = _trajectory(lambda: ireeopt.load(sys.argv[1], device=sys.argv[2]), sys.argv[2])
    np.savez(sys.argv[4], **{k.replace("/", "_"): v for k, v in got.items()})
    assert not any(m == "jax" or m.startswith(("jax.", "iree.compiler")) for m in sys.modules if sys.modules[m])
""")


@pytest.mark.parametrize("device", ["local-task", pytest.param("vulkan", marks=needs_vulkan)])
def test_runtime_only_process(artifact_dir, device, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(RUNTIME_ONLY)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "out.npz"
    done = subprocess.run([sys.executable, str(script), str(artifact_dir), device, root, str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    expected, _ = _trajectory(_optimizer, "cpu")
    got = np.load(out)
    for name in SPEC:
        np.testing.assert_allclose(got[name.replace("/", "_")], expected[name], rtol=1e-5, atol=1e-7)


def _copy(artifact_dir, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(artifact_dir, target)
    return target


def _edit_manifest(path, change):
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage,match", [
    (lambda p: _edit_manifest(p, lambda m: m.update(iree_version="3.12.0")), "recompile"),
    (lambda p: _edit_manifest(p, lambda m: m.update(schema="ireeopt.artifact/99")), "schema"),
    (lambda p: (p / "llvm-cpu.vmfb").write_bytes(b"\0" * 64 + (p / "llvm-cpu.vmfb").read_bytes()[64:]), "corrupted"),
    (lambda p: (p / "llvm-cpu.vmfb").unlink(), "missing"),
    (lambda p: (p / "manifest.json").write_text("{not json"), "cannot be read"),
    (lambda p: _edit_manifest(p, lambda m: m["targets"].pop("llvm-cpu")), "no module for device"),
])
def test_bad_artifacts_raise_clear_errors(artifact_dir, tmp_path, damage, match):
    path = _copy(artifact_dir, tmp_path)
    damage(path)
    with pytest.raises(ireeopt.ArtifactError, match=match):
        ireeopt.load(path, device="local-task")


def test_corrupted_module_with_matching_hash_is_a_clear_error(artifact_dir, tmp_path):
    path = _copy(artifact_dir, tmp_path)
    junk = b"not a flatbuffer" * 100
    (path / "llvm-cpu.vmfb").write_bytes(junk)
    _edit_manifest(path, lambda m: m["targets"]["llvm-cpu"].update(sha256=hashlib.sha256(junk).hexdigest()))
    with pytest.raises(ireeopt.ArtifactError, match="cannot be loaded"):
        ireeopt.load(path, device="local-task")


@pytest.mark.parametrize("change,match", [
    ({"name": "embeddings"}, "compiled for the variables"),
    ({"shape": (61, 8)}, "shape"),
    ({"dtype": "bfloat16"}, "dtype"),
    ({"device": "local-sync"}, "device"),
])
def test_variables_must_match_the_compiled_specs(artifact_dir, change, match):
    opt = ireeopt.load(artifact_dir, device="local-task")
    variables = []
    for name, spec in SPEC.items():
        kwargs = {"name": name, "device": "local-task", "dtype": spec.get("dtype", "float32")}
        shape = spec["shape"]
        if name == "embedding":
            kwargs.update({k: v for k, v in change.items() if k != "shape"})
            shape = change.get("shape", shape)
        variables.append(ireeopt.Variable(np.zeros(shape, np.float32), **kwargs))
    with pytest.raises(ValueError, match=match):
        opt.apply_gradients([(np.zeros(v.shape, np.float32), v) for v in variables])
    assert int(opt.iterations) == 0 and all(not v.numpy().any() for v in variables)


def test_artifact_limits_are_clear_errors(artifact_dir):
    opt = ireeopt.load(artifact_dir, device="local-task")
    with pytest.raises(ValueError, match="compiled in"):
        opt.exclude_from_weight_decay(var_names=["kernel"])
    variables = {n: ireeopt.Variable(np.zeros(s["shape"], np.float32), name=n, device="local-task")
                 for n, s in SPEC.items()}
    big = ireeopt.IndexedSlices(np.ones((129, 8), np.float32), np.arange(129) % 60)
    with pytest.raises(ValueError, match="largest bucket"):
        opt.apply_gradients([(big, variables["embedding"]), (np.ones((8, 4), np.float32), variables["dense/kernel"]),
                             (np.ones(4, np.float32), variables["dense/bias"])])
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no step for this call"):
        opt.apply_gradients([(np.ones((60, 8), np.float32), variables["embedding"]),
                             (np.ones((8, 4), np.float32), variables["dense/kernel"]), (None, variables["dense/bias"])])
    assert all(not v.numpy().any() for v in variables.values()) and int(opt.iterations) == 0


def test_cli_compile_info_recompile(tmp_path):
    (tmp_path / "cfg.json").write_text(json.dumps(ireeopt.Adamax(learning_rate=0.01, clipvalue=0.5).get_config()))
    (tmp_path / "vars.json").write_text(json.dumps({"emb": {"shape": [30, 4], "dtype": "float32", "sparse": True},
                                                    "w": {"shape": [4], "dtype": "float32", "sparse": False}}))
    out = tmp_path / "art"
    run = lambda *args: subprocess.run(["ireeopt", *args], capture_output=True, text=True, cwd=tmp_path)  # noqa: E731
    done = run("compile", "--optimizer", "Adamax", "--config", "cfg.json", "--variables", "vars.json",
               "--target", "llvm-cpu", "--target", "vulkan-spirv", "--sparse-buckets", "8,64", "--output", str(out))
    assert done.returncode == 0, done.stderr
    info = run("info", str(out))
    assert info.returncode == 0 and "Adamax" in info.stdout and "step_sparse_64" in info.stdout
    before = json.loads((out / "manifest.json").read_text())["targets"]["llvm-cpu"]["sha256"]
    assert run("recompile", str(out), "--target", "llvm-cpu:generic").returncode == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["targets"]) == {"llvm-cpu", "vulkan-spirv", "llvm-cpu:generic"}
    assert manifest["targets"]["llvm-cpu"]["sha256"] == before          # same source, same flags
    opt = ireeopt.load(out, device="local-sync")
    emb = ireeopt.Variable(np.ones((30, 4), np.float32), name="emb", device="local-sync")
    w = ireeopt.Variable(np.ones(4, np.float32), name="w", device="local-sync")
    opt.apply_gradients([(ireeopt.IndexedSlices(np.ones((2, 4), np.float32), [3, 3]), emb),
                         (np.ones(4, np.float32), w)])
    assert (emb.numpy()[3] < 1).all() and (np.delete(emb.numpy(), 3, axis=0) == 1).all()
    bad = run("compile", "--optimizer", "Nadam", "--variables", "vars.json", "--output", str(tmp_path / "x"))
    assert bad.returncode != 0 and "Nadam" in bad.stderr


def test_vulkan_sparse_matches_cpu_up_to_4096_rows():
    """lavapipe stops a shader after 65,535 loop iterations; the sparse step has no serial
    loop, so k = 4096 rows of 64 (262,144 values) is exact on Vulkan too."""
    if not HAS_VULKAN:
        pytest.skip("no Vulkan device (install mesa-vulkan-drivers for lavapipe)")
    results = {}
    for device in ("cpu", "vulkan"):
        rng = np.random.default_rng(3)
        table = ireeopt.Variable(rng.standard_normal((5000, 64)).astype(np.float32), name="t", device=device)
        other = ireeopt.Variable(rng.standard_normal((5000, 64)).astype(np.float32), name="u", device=device)
        adam, adamax = ireeopt.Adam(learning_rate=0.01), ireeopt.Adamax(learning_rate=0.01)
        for _ in range(2):
            idx = rng.integers(0, 5000, 4096)
            vals = rng.standard_normal((4096, 64)).astype(np.float32)
            adam.apply_gradients([(ireeopt.IndexedSlices(vals, idx), table)])
            adamax.apply_gradients([(ireeopt.IndexedSlices(vals, idx), other)])
        results[device] = (table.numpy(), other.numpy())
    for a, b in zip(results["cpu"], results["vulkan"]):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
