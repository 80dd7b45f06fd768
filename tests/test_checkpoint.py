"""Checkpoints: round trip across devices and processes; crash, truncation, corruption
and the wrong model raise and change nothing."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import ireeopt

from .conftest import HAS_VULKAN

DEVICES = ["cpu", "local-task"] + (["vulkan"] if HAS_VULKAN else [])


def _model(device="cpu", seed=0, shapes=None):
    rng = np.random.default_rng(seed)
    shapes = shapes or {"emb": (30, 4), "w": (4, 3), "b": (3,)}
    return [ireeopt.Variable(rng.standard_normal(s).astype(np.float32), name=n, device=device)
            for n, s in shapes.items()]


def _step(opt, variables, rng):
    emb, w, b = variables
    opt.apply_gradients([(ireeopt.IndexedSlices(rng.standard_normal((5, 4)).astype(np.float32),
                                                rng.integers(0, 30, 5)), emb),
                         (rng.standard_normal((4, 3)).astype(np.float32), w),
                         (rng.standard_normal(3).astype(np.float32), b)])


def _state(opt, variables):
    return [v.numpy() for v in variables] + [np.asarray(v.numpy()) for v in opt.variables]


def _make():
    return ireeopt.AdamW(learning_rate=0.01, amsgrad=True, use_ema=True)


@pytest.mark.parametrize("source,target", [(a, b) for a in DEVICES for b in DEVICES if a != b][:4])
def test_round_trip_across_devices_continues_identically(tmp_path, source, target):
    rng = np.random.default_rng(1)
    variables, opt = _model(source), _make()
    for _ in range(3):
        _step(opt, variables, rng)
    path = ireeopt.save_checkpoint(tmp_path / "ckpt.npz", opt, variables)
    later = np.random.default_rng(2)
    for _ in range(2):
        _step(opt, variables, later)
    restored_vars, restored = _model(target, seed=5), _make()
    ireeopt.load_checkpoint(path, restored, restored_vars[::-1])      # matched by name, any order
    assert int(restored.iterations) == 3
    later = np.random.default_rng(2)
    for _ in range(2):
        _step(restored, restored_vars, later)
    for a, b in zip(_state(opt, variables), _state(restored, restored_vars)):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)


def test_restore_in_a_fresh_process(tmp_path):
    rng = np.random.default_rng(1)
    variables, opt = _model(), _make()
    for _ in range(2):
        _step(opt, variables, rng)
    ireeopt.save_checkpoint(tmp_path / "ckpt.npz", opt, variables)
    code = textwrap.dedent(f"""
        import sys, numpy as np
        sys.modules["jax"] = None
        sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
        from tests.test_checkpoint import _model, _make
        import ireeopt
        variables, opt = _model(seed=9), _make()
        ireeopt.load_checkpoint({str(tmp_path / "ckpt.npz")!r}, opt, variables)
        np.save({str(tmp_path / "w.npy")!r}, variables[1].numpy())
        print(int(opt.iterations))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "2"
    np.testing.assert_array_equal(np.load(tmp_path / "w.npy"), variables[1].numpy())


def test_a_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    variables, opt = _model(), _make()
    _step(opt, variables, rng)
    path = ireeopt.save_checkpoint(tmp_path / "ckpt.npz", opt, variables)
    good = path.read_bytes()
    _step(opt, variables, rng)

    def crash(file, **arrays):
        file.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt("power cut")
    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        ireeopt.save_checkpoint(path, opt, variables)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.npz"]      # no temporary left behind


def _saved(tmp_path):
    rng = np.random.default_rng(1)
    variables, opt = _model(), _make()
    _step(opt, variables, rng)
    return ireeopt.save_checkpoint(tmp_path / "ckpt.npz", opt, variables)


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "not a zip"])
def test_truncated_or_corrupted_files_raise_and_change_nothing(tmp_path, damage):
    path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:len(data) // 2]
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF
    elif damage == "empty":
        data = b""
    else:
        data = b"hello" * 100
    path.write_bytes(bytes(data))
    rng = np.random.default_rng(4)
    variables, opt = _model(seed=3), _make()
    _step(opt, variables, rng)
    before = _state(opt, variables)
    with pytest.raises(ireeopt.CheckpointError):
        ireeopt.load_checkpoint(path, opt, variables)
    for a, b in zip(before, _state(opt, variables)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("other", ["names", "shapes", "optimizer class", "options"])
def test_a_checkpoint_of_another_model_raises_and_changes_nothing(tmp_path, other):
    path = _saved(tmp_path)
    shapes = {"emb": (30, 4), "w": (4, 3), "b": (3,)}
    make = _make
    if other == "names":
        shapes = {"emb": (30, 4), "w": (4, 3), "bias": (3,)}
    elif other == "shapes":
        shapes = {"emb": (31, 4), "w": (4, 3), "b": (3,)}
    elif other == "optimizer class":
        make = lambda: ireeopt.Adam(amsgrad=True, use_ema=True)   # noqa: E731
    else:
        make = lambda: ireeopt.AdamW(learning_rate=0.01)           # noqa: E731  (no amsgrad, no EMA)
    variables, opt = _model(seed=3, shapes=shapes), make()
    before = [v.numpy() for v in variables]
    with pytest.raises(ireeopt.CheckpointError):
        ireeopt.load_checkpoint(path, opt, variables)
    for a, v in zip(before, variables):
        np.testing.assert_array_equal(a, v.numpy())
    assert int(opt.iterations) == 0 and not opt.built
