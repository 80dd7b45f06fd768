"""``ireeopt bench`` runs and writes its table, JSON and plots (no timing is asserted)."""
import json
import subprocess
import sys


def test_bench_runs_and_reports(tmp_path):
    out = tmp_path / "report"
    done = subprocess.run(["ireeopt", "bench", "--sizes", "4096", "--tensors", "1,3", "--devices", "local-sync",
                           "--peers", "", "--budget", "0.05", "--sparse-table", "1000x8", "--sparse-ks", "16",
                           "--sparse-peers", "", "--processes", "2", "--output", f"{out}.json"], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert "| 3 × 1,365 |" in done.stdout and "roofline" in done.stdout
    assert "| 1,000 × 8, k = 16 |" in done.stdout
    report = json.loads((tmp_path / "report.json").read_text())     # (--output's .json is not doubled)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report_1_tensors.png", "report_3_tensors.png"]
    assert [(r["tensors"], sorted(r["results"])) for r in report["rows"]] == [(1, ["ireeopt local-sync"]),
                                                                           (3, ["ireeopt local-sync"])]
    assert report["bandwidth_bytes_per_s"] > 0 and report["versions"]["iree-base-runtime"] == "3.13.0"
    assert all(r["results"]["ireeopt local-sync"]["ms"] > 0 for r in report["rows"])
    for r in report["rows"]:          # two processes each, the median of their medians reported
        result = r["results"]["ireeopt local-sync"]
        assert len(result["process_ms"]) == 2 and result["ms"] == sum(result["process_ms"]) / 2
    assert report["processes"] == 2 and "median of 2 process(es)" in done.stdout
    (sparse,) = report["sparse"]
    assert sorted(sparse["results"]) == ["ireeopt local-sync Adam", "ireeopt local-sync Adamax"]


def test_bench_rejects_unknown_peers(tmp_path):
    done = subprocess.run(["ireeopt", "bench", "--peers", "mxnet", "--output", str(tmp_path / "x")],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "mxnet" in done.stderr


def test_bench_rejects_fewer_than_one_process(tmp_path):
    done = subprocess.run(["ireeopt", "bench", "--processes", "0", "--output", str(tmp_path / "x")],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "--processes must be at least 1" in done.stderr
    assert not (tmp_path / "x.json").exists()


def test_first_call_bench_compiles_in_a_cold_process():
    """bench/first_call.py: a fresh process with an empty compile cache compiles and runs its
    first step (a shipped step: without importing jax)."""
    from ireeopt.bench.first_call import first_call

    seconds, jax = first_call(4000, 20)
    assert 0 < seconds < 60 and jax is False


def test_side_by_side_takes_the_two_in_turn(monkeypatch):
    """bench/side_by_side.py: two warm-up calls each, then blocks of ``steps`` of one and of
    the other for ``rounds`` rounds, or one step of each in turn; every step is timed."""
    from ireeopt.bench import side_by_side as sbs

    for mode, want in (("blocks", "aaabbbaaabbb"), ("alternate", "ababab" * 2)):
        calls = []
        monkeypatch.setattr(sbs, "make_dense", lambda name, split: lambda: calls.append(name[0]))
        medians = sbs.side_by_side("a", "b", [4], mode, steps=3, rounds=2)
        assert "".join(calls) == "aabb" + want, mode
        assert sorted(medians) == ["a", "b"] and all(m >= 0 for m in medians.values())


def test_side_by_side_runs_two_ireeopt_devices_and_rejects_bad_input():
    import re

    run = lambda *a: subprocess.run([sys.executable, "-m", "ireeopt.bench.side_by_side", *a],   # noqa: E731
                                    capture_output=True, text=True)
    done = run("--first", "ireeopt local-sync", "--second", "ireeopt local-task", "--params", "4096", "--tensors", "3",
               "--steps", "3", "--rounds", "2", "--mode", "alternate")
    assert done.returncode == 0, done.stderr
    found = re.fullmatch(r"3 x 1,365 params, alternate, 2 x 3 steps each: ireeopt local-sync ([\d.]+) ms, "
                         r"ireeopt local-task ([\d.]+) ms, ratio ([\d.]+)\n", done.stdout)
    assert found, done.stdout
    a, b, ratio = map(float, found.groups())
    # the ratio of the unrounded medians: within what the milliseconds' rounding to 0.001 allows
    half = 0.0005
    assert a > 0 and b > half and (a - half) / (b + half) - half <= ratio <= (a + half) / (b - half) + half
    for args, message in ((["--first", "mxnet"], "unknown implementation 'mxnet'"),
                          (["--first", "torch-fused"], "--first and --second must differ"),
                          (["--params", "2", "--tensors", "3"], "must be at least --tensors"),
                          (["--steps", "0"], "--steps and --rounds must be at least 1")):
        done = run(*args)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
