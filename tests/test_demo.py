"""``ireeopt demo`` (the README's first command) and ``examples/deploy.py``, as a user runs them."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("sklearn", reason="the demo's data set comes with scikit-learn (the `demo` extra)")

from ireeopt.demo import main  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    assert main(["--steps", "200", "--output", str(out), "--no-timing"]) == 0
    return out


def test_demo_trains_and_writes_everything(demo_dir, capsys):
    summary = json.loads((demo_dir / "summary.json").read_text())
    assert [s["steps"] for s in summary] == [200, 200]
    for model in summary:
        before, after = model["held_out_accuracy"]
        assert before < 0.3 and after > 0.85, model
        assert model["held_out_loss"][1] < 0.5 * model["held_out_loss"][0]
        assert model["device_calls"] == 200          # one compiled call per training step
    assert (demo_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((demo_dir / "artifact" / "manifest.json").read_text())
    assert manifest["train"]["name"] == "train_step"
    assert (demo_dir / "checkpoint.npz").stat().st_size > 0


DEPLOY = textwrap.dedent("""
    import runpy, sys
    sys.modules["jax"] = None              # importing jax or the IREE compiler now raises ImportError
    sys.modules["jaxlib"] = None
    sys.modules["iree.compiler"] = None
    sys.argv = ["deploy.py", sys.argv[1], "--steps", "100"]
    runpy.run_path(%r, run_name="__main__")
""")


def test_deploy_continues_without_jax(demo_dir, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(DEPLOY % os.path.join(ROOT, "examples", "deploy.py"))
    done = subprocess.run([sys.executable, str(script), str(demo_dir)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr     # exit 0: the training loss fell
    assert "checkpoint at step 200" in done.stdout and "jax imported: no" in done.stdout
    assert "saved" in done.stdout and "at step 300" in done.stdout
