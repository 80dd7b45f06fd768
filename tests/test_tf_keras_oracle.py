"""tf_keras 2.21 as an oracle (opt-in: ``pip install -e ".[oracle]"``; skipped otherwise).

Replays the same gradients through tf_keras and ireeopt (tests/tf_keras_replay.py, in a
subprocess: TensorFlow and lavapipe crash in one process) and compares every step's
parameters within rtol 2e-5 / atol 2e-6, the acceptance tolerance.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from .tf_keras_replay_cases import DENSE_CASES, SPARSE_CASES

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tf_keras") is None,
                                reason="tf_keras oracle: install the `oracle` extra to run it")


@pytest.fixture(scope="module")
def replay():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-m", "tests.tf_keras_replay"], cwd=root, capture_output=True,
                          text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", DENSE_CASES)
def test_dense_trajectory_matches_tf_keras(replay, case):
    assert replay[case] == "ok", replay[case]


@pytest.mark.parametrize("case", SPARSE_CASES)
def test_sparse_trajectory_matches_tf_keras(replay, case):
    assert replay[f"{case} sparse"] == "ok", replay[f"{case} sparse"]
