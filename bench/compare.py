"""``ireeopt bench``: one Adam step across ireeopt devices and peers, next to the copy roofline.

Scenarios: models of 1 and 200 float32 tensors totalling 2^16, 2^22 and 2^24 parameters
(``--sizes``/``--tensors`` change them), and a sparse embedding step (a 1,000,000 × 64
table, IndexedSlices of 256 and 4,096 rows: ``--sparse-ks``/``--sparse-table``) for Adam,
Adamax and torch's SparseAdam.  Every implementation is timed in this one run
(compare ratios, not absolute numbers, on a shared host), each implementation and
scenario in a fresh process.  The roofline is 28 bytes per parameter (Adam reads p, g,
m, v and writes p, m, v) at the memory bandwidth measured here by a 64 MiB numpy copy (one thread, or one per core: the faster);
models that fit in cache can beat it.  Output: a table on stdout, a JSON file and PNG
plots.  The ireeopt time is ``apply_gradients`` with numpy gradients (their copy to the
device included); the peers' gradients are already in place.
"""
import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

from ..runtime import cores
from .peers import PEERS, SPARSE_PEERS, make_ireeopt, make_ireeopt_sparse

BYTES_PER_PARAM = 28


def copy_bandwidth(n=1 << 24, reps=7):
    """Bytes per second of a large copy (read + write counted): the best of a one-thread
    and a one-thread-per-core copy (numpy releases the GIL), ``reps`` tries each."""
    from concurrent.futures import ThreadPoolExecutor

    src = np.ones(n, np.float32)
    dst = np.empty_like(src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(reps))
    workers = cores.CORES
    if workers > 1:
        bounds = np.linspace(0, n, workers + 1).astype(int)
        parts = [(dst[a:b], src[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        with ThreadPoolExecutor(workers) as pool:
            def threaded():
                list(pool.map(lambda p: np.copyto(*p), parts))
            best = min([best] + [_timed(threaded) for _ in range(reps)])
    return 2 * src.nbytes / best


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(step, budget_s=1.0, min_reps=5, max_reps=500):
    """Median seconds per call after two warm-up calls, within about ``budget_s``."""
    step()
    first = _timed(step)
    reps = int(min(max_reps, max(min_reps, budget_s / max(first, 1e-6))))
    return float(np.median([_timed(step) for _ in range(reps)]))


def _versions():
    out = {}
    for dist in ("ireeopt", "iree-base-runtime", "iree-base-compiler", "numpy", "torch", "jax", "optax"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _machine():
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": model, "cores": cores.CORES, "python": platform.python_version()}


def _commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _available_devices():
    devices = ["cpu", "local-sync", "local-task"]
    for driver in ("vulkan", "cuda"):
        probe = subprocess.run([sys.executable, "-c", f"import iree.runtime as rt; rt.get_device({driver!r})"],
                               capture_output=True)
        if probe.returncode == 0:
            devices.append(driver)
    return devices


def make_dense(name, split):
    """The ``step`` of implementation ``name`` ("ireeopt DEVICE" or a peer of ``PEERS``) on a
    model of tensors of ``split`` sizes (raises ``peers.Unavailable``, or KeyError for an
    unknown peer)."""
    if name.startswith("ireeopt "):
        return make_ireeopt(name.split(" ", 1)[1], split)
    return PEERS[name](split)


def _one(name, split, budget_s, sparse=None):
    """Time implementation ``name`` on a model of tensors of ``split`` sizes, or with
    ``sparse`` = (rows, width, k) on the sparse embedding scenario (in this process)."""
    if sparse is not None:
        if name.startswith("ireeopt "):
            device, optimizer = name.split(" ")[1:]
            make = lambda: make_ireeopt_sparse(device, optimizer, *sparse)    # noqa: E731
        else:
            make = lambda: SPARSE_PEERS[name](*sparse)                         # noqa: E731
    else:
        make = lambda: make_dense(name, split)                               # noqa: E731
    start = time.perf_counter()
    step = make()
    step()                      # the first call compiles (ireeopt, jax)
    setup = time.perf_counter() - start
    return {"ms": measure(step, budget_s) * 1e3, "setup_s": setup}


def _isolated(name, total, count, budget_s, sparse=None):
    """``_one`` in a fresh process: JAX, torch, IREE's workers and lavapipe threads would
    otherwise compete for the same cores and disturb each other's timings."""
    code = ("import json, sys; from ireeopt.bench.compare import _one; from ireeopt.bench.peers import Unavailable\n"
            "try: r = _one(sys.argv[1], [int(sys.argv[2]) // int(sys.argv[3])] * int(sys.argv[3]), float(sys.argv[4]),"
            " json.loads(sys.argv[5]))\n"
            "except Unavailable as e: r = {'skipped': str(e)}\n"
            "print(json.dumps(r))")
    done = subprocess.run([sys.executable, "-c", code, name, str(total), str(count), str(budget_s),
                           json.dumps(sparse)], capture_output=True, text=True)
    if done.returncode != 0:
        return {"skipped": f"failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _rounds(names, processes, measure_one):
    """{name: result} of ``measure_one(name)`` (``_isolated``), each name in ``processes``
    fresh processes, taken in rounds (every name once, then again) so that a slow spell of
    the host falls on all of them; ``ms`` is the median of the processes' medians, each
    kept in ``process_ms`` (one process of the same code can be 2x slower than the next)."""
    runs = {name: [] for name in names}
    for _ in range(processes):
        for name in names:
            if runs[name] and "skipped" in runs[name][0]:
                continue
            runs[name].append(measure_one(name))
    out = {}
    for name, results in runs.items():
        if "skipped" in results[0]:
            out[name] = results[0]
            continue
        times = [r["ms"] for r in results]
        out[name] = {"ms": float(statistics.median(times)), "process_ms": times, "setup_s": results[0]["setup_s"]}
    return out


def _spread(result):
    times = result["process_ms"]
    return f" (processes {min(times):.3f}-{max(times):.3f})" if len(times) > 1 else ""


def run(sizes, tensors, devices, peers, budget_s, log=print, processes=1):
    bandwidth = copy_bandwidth()
    log(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (roofline: {BYTES_PER_PARAM} bytes/param)")
    rows = []
    for total in sizes:
        for count in tensors:
            scenario = f"{count} tensor{'s' if count > 1 else ''}, {total:,} params"
            row = {"params": total, "tensors": count, "roofline_ms": BYTES_PER_PARAM * total / bandwidth * 1e3,
                   "results": {}, "skipped": {}}
            names = [f"ireeopt {d}" for d in devices] + list(peers)
            measured = _rounds(names, processes, lambda name: _isolated(name, total, count, budget_s))
            for name, result in measured.items():
                if "skipped" in result:
                    row["skipped"][name] = result["skipped"]
                    log(f"  {scenario:30s} {name:20s} skipped: {result['skipped']}")
                    continue
                result["roofline_fraction"] = row["roofline_ms"] / result["ms"]
                row["results"][name] = result
                log(f"  {scenario:30s} {name:20s} {result['ms']:9.3f} ms/step "
                    f"({result['roofline_fraction']:6.1%} of roofline; setup {result['setup_s']:.1f} s){_spread(result)}")
            rows.append(row)
    return {"bandwidth_bytes_per_s": bandwidth, "rows": rows}


def run_sparse(rows, width, ks, devices, peers, budget_s, log=print, processes=1):
    """The sparse embedding scenario: Adam (dense-equivalent) and Adamax (lazy) on a
    ``rows x width`` table with IndexedSlices of k random rows, per ireeopt device, next to
    the sparse peers (torch SparseAdam is lazy Adam)."""
    out = []
    names = [f"ireeopt {d} {o}" for d in devices for o in ("Adam", "Adamax")] + list(peers)
    for k in ks:
        row = {"rows": rows, "width": width, "k": k, "results": {}, "skipped": {}}
        measured = _rounds(names, processes, lambda name: _isolated(name, 1, 1, budget_s, [rows, width, k]))
        for name, result in measured.items():
            if "skipped" in result:
                row["skipped"][name] = result["skipped"]
                log(f"  sparse {rows:,} x {width}, k={k:<7,} {name:26s} skipped: {result['skipped']}")
                continue
            row["results"][name] = result
            log(f"  sparse {rows:,} x {width}, k={k:<7,} {name:26s} {result['ms']:9.3f} ms/step{_spread(result)}")
        out.append(row)
    return out


def sparse_table(rows):
    names = sorted({n for r in rows for n in r["results"]})
    lines = ["| table, k rows | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for r in rows:
        cells = [f"{r['results'][n]['ms']:.3f}" if n in r["results"] else "—" for n in names]
        lines.append(f"| {r['rows']:,} × {r['width']}, k = {r['k']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(report):
    names = sorted({n for r in report["rows"] for n in r["results"]})
    lines = ["| scenario | " + " | ".join(names) + " | roofline |", "|---|" + "---|" * (len(names) + 1)]
    for r in report["rows"]:
        cells = [f"{r['results'][n]['ms']:.3f}" if n in r["results"] else "—" for n in names]
        lines.append(f"| {r['tensors']} × {r['params'] // r['tensors']:,} | " + " | ".join(cells)
                     + f" | {r['roofline_ms']:.3f} |")
    return "\n".join(lines)


def plots(report, prefix):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    names = sorted({n for r in report["rows"] for n in r["results"]})
    for count in sorted({r["tensors"] for r in report["rows"]}):
        rows = [r for r in report["rows"] if r["tensors"] == count]
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
        for name in names:
            pts = [(r["params"], r["results"][name]) for r in rows if name in r["results"]]
            if pts:
                left.plot([p for p, _ in pts], [x["ms"] for _, x in pts], "o-", label=name)
                right.plot([p for p, _ in pts], [100 * x["roofline_fraction"] for _, x in pts], "o-", label=name)
        left.plot([r["params"] for r in rows], [r["roofline_ms"] for r in rows], "k--", label="copy roofline")
        left.set(xscale="log", yscale="log", xlabel="parameters", ylabel="ms per Adam step",
                 title=f"{count} tensor(s): step time")
        right.set(xscale="log", xlabel="parameters", ylabel="% of copy roofline", title="efficiency")
        right.axhline(85, color="grey", lw=0.8, ls=":")
        left.legend(fontsize=8)
        fig.tight_layout()
        path = f"{prefix}_{count}_tensors.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(prog="ireeopt bench", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="65536,4194304,16777216", help="total parameters per scenario")
    parser.add_argument("--tensors", default="1,200", help="tensor counts per scenario")
    parser.add_argument("--devices", help="ireeopt devices (default: cpu, local-sync, local-task, and vulkan/cuda if present)")
    parser.add_argument("--peers", default=",".join(PEERS), help="peers to time (those installed)")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of timing per implementation and scenario")
    parser.add_argument("--output", default="ireeopt_bench",
                        help="prefix of the JSON and PNG files (a trailing .json is dropped)")
    parser.add_argument("--quick", action="store_true", help="small sizes only (2^16, 2^20), short budget, one process")
    parser.add_argument("--processes", type=int, default=3,
                        help="fresh processes per implementation and scenario, in rounds; the median of theirs is reported")
    parser.add_argument("--sparse-ks", default="256,4096",
                        help="rows per IndexedSlices gradient in the sparse embedding scenario ('' skips it)")
    parser.add_argument("--sparse-table", default="1000000x64", help="its table, ROWSxWIDTH")
    parser.add_argument("--sparse-peers", default=",".join(SPARSE_PEERS), help="its peers (those installed)")
    args = parser.parse_args(argv)
    if args.output.endswith(".json"):           # (``--output run.json`` writes run.json, not run.json.json)
        args.output = args.output[:-len(".json")]
    try:
        sparse_rows, sparse_width = (int(x) for x in args.sparse_table.lower().split("x"))
    except ValueError:
        parser.error(f"--sparse-table must be ROWSxWIDTH, got {args.sparse_table!r}")
    if args.quick:
        sparse_rows = min(sparse_rows, 100_000)
    sparse_ks = [int(k) for k in args.sparse_ks.split(",") if k]
    sparse_peers = [p for p in args.sparse_peers.split(",") if p]
    unknown = [p for p in sparse_peers if p not in SPARSE_PEERS]
    if unknown:
        parser.error(f"unknown sparse peers {unknown}; known: {list(SPARSE_PEERS)}")
    sizes = [1 << 16, 1 << 20] if args.quick else [int(s) for s in args.sizes.split(",")]
    tensors = [int(t) for t in args.tensors.split(",")]
    devices = args.devices.split(",") if args.devices else _available_devices()
    peers = [p for p in args.peers.split(",") if p]
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        parser.error(f"unknown peers {unknown}; known: {list(PEERS)}")
    budget = 0.2 if args.quick else args.budget
    if args.processes < 1:
        parser.error(f"--processes must be at least 1, got {args.processes}")
    processes = 1 if args.quick else args.processes
    report = run(sizes, tensors, devices, peers, budget, log=lambda line: print(line, flush=True), processes=processes)
    report["sparse"] = run_sparse(sparse_rows, sparse_width, sparse_ks, devices, sparse_peers, budget,
                                  log=lambda line: print(line, flush=True), processes=processes) if sparse_ks else []
    report["processes"] = processes
    report.update(machine=_machine(), versions=_versions(), commit=_commit(),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  optimizer="Adam(learning_rate=1e-3)")
    print()
    print(f"Adam step, median ms ({report['machine']['cpu']}, {report['machine']['cores']} cores, "
          f"copy bandwidth {report['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s; median of {processes} process(es) each)")
    print(table(report))
    if report["sparse"]:
        print("\nSparse embedding step (IndexedSlices of k random rows), median ms")
        print(sparse_table(report["sparse"]))
    with open(f"{args.output}.json", "w") as f:
        json.dump(report, f, indent=1)
    written = [f"{args.output}.json"] + plots(report, args.output)
    print("\nwrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
