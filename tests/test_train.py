"""``minimize`` / ``compute_gradients``: forward, backward and update compiled into one
IREE call, checked step for step against the float64 spec reference fed with gradients
derived by hand in numpy (no JAX in the reference); ``ireeopt.lookup`` tables take the
sparse rule; a train-step artifact continues training in a process without JAX."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import ireeopt
from ireeopt.runtime.module import StepModule

from .conftest import needs_vulkan
from .reference import Reference

R, D, F, C, B, L = 200, 6, 5, 4, 8, 3       # table rows, row width, features, classes, batch, ids per example
NAMES = ["embedding", "kernel", "proj", "bias"]
# float32 forward/backward on the device against float64 gradients in the reference
RTOL, ATOL = 2e-5, 2e-6


def _init(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((R, D)).astype(np.float32) * 0.3, rng.standard_normal((F, C)).astype(np.float32) * 0.3,
            rng.standard_normal((D, C)).astype(np.float32) * 0.3, np.zeros(C, np.float32)]


def _batches(n, seed=1, b=B, ids=L):
    rng = np.random.default_rng(seed)
    # few distinct ids, so that duplicates are common
    return [(rng.integers(0, R // 8, (b, ids)), rng.standard_normal((b, F)).astype(np.float32),
             rng.integers(0, C, b)) for _ in range(n)]


def loss_lookup(values, batch):
    import jax
    import jax.numpy as jnp

    table, kernel, proj, bias = values
    ids, x, y = batch
    logits = x @ kernel + ireeopt.lookup(table, ids).sum(axis=1) @ proj + bias
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def loss_take(values, batch):
    """The same loss reading the table with a plain gather: a dense gradient."""
    import jax
    import jax.numpy as jnp

    table, kernel, proj, bias = values
    ids, x, y = batch
    logits = x @ kernel + jnp.take(table, ids, axis=0).sum(axis=1) @ proj + bias
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def numpy_loss_and_grads(params, batch):
    """float64 loss and gradients by hand: the table's as occurrence rows ("sparse", rows, ids)."""
    table, kernel, proj, bias = (np.asarray(p, np.float64) for p in params)
    ids, x, y = batch
    b, n = ids.shape
    x = x.astype(np.float64)
    s = table[ids].sum(axis=1)
    logits = x @ kernel + s @ proj + bias
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    loss = -np.mean(np.log(p[np.arange(b), y]))
    d = p.copy()
    d[np.arange(b), y] -= 1
    d /= b
    ds = d @ proj.T                                       # [b, D], the same for each of an example's ids
    rows = np.repeat(ds[:, None, :], n, axis=1).reshape(-1, D)
    return loss, [("sparse", rows, ids.reshape(-1)), x.T @ d, s.T @ d, d.sum(axis=0)]


CASES = {
    "adam": (ireeopt.Adam, dict(learning_rate=0.01), {}),
    "adamw-clip-exclude": (ireeopt.AdamW, dict(learning_rate=0.02, weight_decay=0.05, global_clipnorm=0.5),
                           dict(exclude_names=["bias"])),
    "adam-amsgrad-clipvalue-ema": (ireeopt.Adam, dict(learning_rate=0.01, amsgrad=True, clipvalue=0.05,
                                                      use_ema=True, ema_overwrite_frequency=3), {}),
    "adam-clipnorm": (ireeopt.Adam, dict(learning_rate=0.01, clipnorm=0.1), {}),
    "adamax-lazy": (ireeopt.Adamax, dict(learning_rate=0.02, weight_decay=0.01), {}),
}


def _optimizer(case):
    cls, kwargs, extra = CASES[case]
    opt = cls(**kwargs)
    if extra.get("exclude_names"):
        opt.exclude_from_weight_decay(var_names=extra["exclude_names"])
    return opt


def _variables(device="cpu"):
    return [ireeopt.Variable(p, name=n, device=device) for p, n in zip(_init(), NAMES)]


@pytest.mark.parametrize("case", list(CASES))
def test_minimize_matches_reference(case):
    cls, kwargs, extra = CASES[case]
    variables = _variables()
    opt = _optimizer(case)
    ref = Reference(cls.__name__.lower(), _init(), NAMES, **kwargs, **extra)
    for step, batch in enumerate(_batches(7)):
        ref_loss, grads = numpy_loss_and_grads(ref.p, batch)
        got = opt.minimize(loss_lookup, variables, batch)
        assert isinstance(got, np.float32)
        np.testing.assert_allclose(got, ref_loss, rtol=1e-5, err_msg=f"loss at step {step}")
        ref.step(grads)
        for v, expected in zip(variables, ref.p):
            np.testing.assert_allclose(v.numpy(), expected, rtol=RTOL, atol=ATOL, err_msg=f"{v.name} step {step}")
    assert opt.iterations == 7
    for i, v in enumerate(variables):
        np.testing.assert_allclose(opt._slots["m"][i].numpy(), ref.m[i], rtol=RTOL, atol=ATOL, err_msg=v.name)
    if kwargs.get("use_ema"):
        opt.finalize_variable_values(variables)
        for v, expected in zip(variables, ref.avg):
            np.testing.assert_allclose(v.numpy(), expected, rtol=RTOL, atol=ATOL, err_msg=f"{v.name} average")


def test_adamax_lookup_is_lazy():
    """Rows that no lookup touched stay bit-identical, in the table and its slots."""
    variables = _variables()
    before = variables[0].numpy().copy()
    opt = _optimizer("adamax-lazy")
    batches = _batches(3)
    for batch in batches:
        opt.minimize(loss_lookup, variables, batch)
    touched = np.unique(np.concatenate([b[0].reshape(-1) for b in batches]))
    untouched = np.setdiff1d(np.arange(R), touched)
    assert len(untouched) >= R // 2
    np.testing.assert_array_equal(variables[0].numpy()[untouched], before[untouched])
    np.testing.assert_array_equal(opt._slots["m"][0].numpy()[untouched], 0)
    assert np.all(variables[0].numpy()[touched] != before[touched])


def test_sparse_lookup_equals_dense_gather_for_adam():
    """Adam is dense-equivalent: the sparse (lookup) path and the dense gradient of a plain
    gather give the same trajectory.  (Not under clipping: a sparse gradient's norm counts
    duplicate ids separately, spec §1, so clipping differs from the summed dense gradient.)"""
    runs = []
    for loss in (loss_lookup, loss_take):
        variables = _variables()
        opt = ireeopt.Adam(learning_rate=0.01, weight_decay=0.02)
        for batch in _batches(5):
            opt.minimize(loss, variables, batch)
        runs.append([v.numpy() for v in variables])
    for a, b, name in zip(*runs, NAMES):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=name)


def _train_spec(opt):
    (prepared,) = opt._train_steps.values()
    return prepared.tspec


def test_adam_takes_a_dense_gradient_where_that_is_faster():
    """Adam without clipping: a table looked up with >= rows/8 ids per step gets a
    dense gradient (the same update); fewer ids, clipping or Adamax keep the sparse rule."""
    many = _batches(4, b=16, ids=16)            # 256 ids on 200 rows
    cases = [(ireeopt.Adam(learning_rate=0.01), many, None, {}),
             (ireeopt.Adam(learning_rate=0.01), _batches(4), 24, {}),
             (ireeopt.Adam(learning_rate=0.01, clipvalue=0.01), many, 256, dict(clipvalue=0.01)),
             (ireeopt.Adamax(learning_rate=0.01), many, 256, {})]
    for opt, batches, sparse, kwargs in cases:
        variables = _variables()
        ref = Reference(type(opt).__name__.lower(), _init(), NAMES, learning_rate=0.01, **kwargs)
        for batch in batches:
            opt.minimize(loss_lookup, variables, batch)
            ref.step(numpy_loss_and_grads(ref.p, batch)[1])
        assert _train_spec(opt).step.variables[0].sparse == sparse, type(opt).__name__
        for v, expected in zip(variables, ref.p):
            np.testing.assert_allclose(v.numpy(), expected, rtol=RTOL, atol=ATOL, err_msg=v.name)


def test_compute_gradients():
    variables = _variables()
    opt = ireeopt.Adam(learning_rate=0.01)
    batch = _batches(1)[0]
    pairs = opt.compute_gradients(loss_lookup, variables, batch)
    _, expected = numpy_loss_and_grads(_init(), batch)
    assert [v for _, v in pairs] == variables
    sparse = pairs[0][0]
    assert isinstance(sparse, ireeopt.IndexedSlices)
    np.testing.assert_array_equal(sparse.indices, batch[0].reshape(-1))
    np.testing.assert_allclose(sparse.values, expected[0][1], rtol=1e-5, atol=1e-7)
    for (g, _), e in zip(pairs[1:], expected[1:]):
        assert isinstance(g, np.ndarray) and g.dtype == np.float32
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-7)
    assert opt.iterations == 0          # nothing was applied
    np.testing.assert_array_equal(variables[1].numpy(), _init()[1])
    # the pairs feed apply_gradients, which then agrees with one fused step
    opt.apply_gradients(pairs)
    fused = _variables()
    ireeopt.Adam(learning_rate=0.01).minimize(loss_lookup, fused, batch)
    for a, b in zip(variables, fused):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=RTOL, atol=ATOL, err_msg=a.name)


def test_one_module_call_per_step(monkeypatch):
    variables = _variables()
    opt = ireeopt.AdamW(learning_rate=0.01, use_ema=True, clipnorm=1.0)
    batches = _batches(4)
    opt.minimize(loss_lookup, variables, batches[0])          # compiles
    calls = []
    original = StepModule.__call__
    monkeypatch.setattr(StepModule, "__call__", lambda self, args: calls.append(self) or original(self, args))
    for batch in batches[1:]:
        opt.minimize(loss_lookup, variables, batch)
    assert len(calls) == 3 and len({id(m) for m in calls}) == 1
    assert opt.device_calls == 4
    # its results are the very buffers passed in (parameters, slots, averages, scratch, loss)
    assert opt._train_steps and all(p.verified for p in opt._train_steps.values())


def test_unread_variable_gets_no_gradient_and_a_warning():
    variables = _variables()
    extra = ireeopt.Variable(np.ones(3, np.float32), name="unused")

    def loss(values, batch):
        return loss_lookup(values[:4], batch)

    opt = ireeopt.Adam(learning_rate=0.01)
    with pytest.warns(UserWarning, match="Gradients do not exist for variables.*unused"):
        opt.minimize(loss, variables + [extra], _batches(1)[0])
    np.testing.assert_array_equal(extra.numpy(), 1.0)
    assert not np.array_equal(variables[1].numpy(), _init()[1])


def _state(opt, variables):
    return ([v.numpy().copy() for v in variables], [s.numpy().copy() for s in opt.variables], int(opt.iterations))


def _assert_same_state(a, b):
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        np.testing.assert_array_equal(x, y)
    assert a[2] == b[2]


def test_bad_input_changes_nothing():
    variables = _variables()
    opt = ireeopt.Adam(learning_rate=0.01)
    batch = _batches(1)[0]
    opt.minimize(loss_lookup, variables, batch)
    before = _state(opt, variables)
    ids, x, y = batch
    bad_ids = ids.copy()
    bad_ids[2, 1] = R
    with pytest.raises(IndexError, match=f"id {R} is out of range for 'embedding'"):
        opt.minimize(loss_lookup, variables, (bad_ids, x, y))
    bad_ids[2, 1] = -1
    with pytest.raises(IndexError, match="id -1"):
        opt.minimize(loss_lookup, variables, (bad_ids, x, y))
    with pytest.raises(TypeError, match="one floating-point scalar"):
        opt.minimize(lambda values, b: values[1] * 2.0, variables, batch)
    with pytest.raises(TypeError, match="loss must be a function"):
        opt.minimize(3.0, variables, batch)
    with pytest.raises(TypeError, match="dtype bool"):
        opt.minimize(loss_lookup, variables, (ids, x, y > 1))
    other = ireeopt.Variable(np.zeros(3, np.float32), name="other")
    with pytest.raises(ValueError, match="were not part of the variables"):
        opt.minimize(loss_lookup, variables[:3] + [other], batch)
    _assert_same_state(before, _state(opt, variables))


@pytest.fixture(scope="module")
def train_artifact(tmp_path_factory):
    """An AdamW train-step artifact, and a checkpoint after 3 in-process steps."""
    path = tmp_path_factory.mktemp("train-artifact")
    variables = _variables()
    opt = _optimizer("adamw-clip-exclude")
    ireeopt.compile(opt, variables, loss=loss_lookup, batch=_batches(1)[0], sparse_buckets=[]).save(path / "art")
    for batch in _batches(3):
        opt.minimize(loss_lookup, variables, batch)
    ireeopt.save_checkpoint(path / "ckpt.npz", opt, variables)
    losses = [opt.minimize(loss_lookup, variables, batch) for batch in _batches(4, seed=7)]
    return path, losses, [v.numpy() for v in variables]


def test_train_artifact_manifest(train_artifact):
    import json

    path, _, _ = train_artifact
    manifest = json.loads((path / "art" / "manifest.json").read_text())
    train = manifest["train"]
    kinds = [a["kind"] for a in train["arguments"]]
    assert kinds.count("batch") == 3 and kinds[-1] == "loss" and "grads" not in kinds
    assert [a["batch"] for a in train["arguments"] if a["kind"] == "batch"] == [0, 1, 2]
    assert "inverse" in kinds and {a["variable"] for a in train["arguments"] if a["kind"] == "inverse"} == {"embedding"}
    for i in train["results_alias_arguments"]:
        assert kinds[i] in ("params", "m", "v", "scratch", "loss")


RUNTIME_ONLY = textwrap.dedent("""
    import sys, numpy as np
    sys.modules["jax"] = None              # importing jax or the IREE compiler now raises ImportError
    sys.modules["jaxlib"] = None
    sys.modules["iree.compiler"] = None
    sys.path.insert(0, sys.argv[2])
    import ireeopt
    from tests.test_train import NAMES, _batches, _init
    opt = ireeopt.load(sys.argv[1] + "/art", device=sys.argv[3])
    variables = [ireeopt.Variable(np.zeros_like(p), name=n, device=sys.argv[3]) for p, n in zip(_init(), NAMES)]
    ireeopt.load_checkpoint(sys.argv[1] + "/ckpt.npz", opt, variables)
    losses = [opt.minimize(None, variables, batch) for batch in _batches(4, seed=7)]
    np.savez(sys.argv[1] + "/out.npz", losses=np.array(losses), *[v.numpy() for v in variables])
    assert not any(m == "jax" or m.startswith(("jax.", "iree.compiler")) for m in sys.modules if sys.modules[m])
""")


def test_train_artifact_continues_without_jax(train_artifact, tmp_path):
    path, losses, final = train_artifact
    script = tmp_path / "run.py"
    script.write_text(RUNTIME_ONLY)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, str(script), str(path), root, "local-task"], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    out = np.load(path / "out.npz")
    np.testing.assert_allclose(out["losses"], losses, rtol=1e-6)
    assert out["losses"][-1] < out["losses"][0]
    for i, expected in enumerate(final):
        np.testing.assert_allclose(out[f"arr_{i}"], expected, rtol=1e-6, atol=1e-7, err_msg=NAMES[i])


def test_train_artifact_rejects_a_loss_and_other_batches(train_artifact):
    path, _, _ = train_artifact
    opt = ireeopt.load(path / "art")
    variables = _variables()
    ids, x, y = _batches(1)[0]
    with pytest.raises(ValueError, match="pass loss=None"):
        opt.minimize(loss_lookup, variables, (ids, x, y))
    with pytest.raises(ValueError, match="compiled for a batch"):
        opt.minimize(None, variables, (ids[:4], x[:4], y[:4]))
    with pytest.raises(ValueError, match="compiled for the variables"):
        opt.minimize(None, variables[:3], (ids, x, y))
    assert opt.iterations == 0
    np.testing.assert_array_equal(variables[0].numpy(), _init()[0])
    opt.minimize(None, variables, (ids, x, y))
    assert opt.iterations == 1


@needs_vulkan
def test_minimize_on_vulkan_matches_cpu_with_many_lookups():
    """Many looked-up ids per step (70,000 occurrences of 8-wide rows: as one serial loop,
    the duplicate sum ran past what Mesa's lavapipe executes in one invocation and the table
    came out wrong by up to 0.1) give the same trajectory on Vulkan as on the CPU, for lazy
    Adamax and dense-equivalent Adam."""
    rng = np.random.default_rng(9)
    table = rng.standard_normal((300, 8)).astype(np.float32)
    proj = rng.standard_normal((8, 3)).astype(np.float32)
    batches = [(rng.integers(0, 300, (4375, 16)), rng.integers(0, 3, 4375)) for _ in range(2)]

    def loss(values, batch):
        import jax
        import jax.numpy as jnp

        t, p = values
        ids, y = batch
        logits = ireeopt.lookup(t, ids).mean(axis=1) @ p
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    for cls in (ireeopt.Adamax, ireeopt.Adam):
        runs = []
        for device in ("cpu", "vulkan"):
            variables = [ireeopt.Variable(table, name="t", device=device), ireeopt.Variable(proj, name="p",
                                                                                            device=device)]
            opt = cls(learning_rate=0.05)         # (on Vulkan, Adam keeps the sparse rule: analyze)
            for batch in batches:
                opt.minimize(loss, variables, batch)
            runs.append([v.numpy() for v in variables])
        for a, b in zip(*runs):
            np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-6, err_msg=cls.__name__)
        assert opt._train_steps and all(p.tspec.chunked and p.tspec.step.variables[0].sparse == 70000
                                        for p in opt._train_steps.values())
