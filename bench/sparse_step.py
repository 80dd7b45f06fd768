"""Sparse embedding step time vs k, next to the dense step (issue: sparse updates).

    python bench/sparse_step.py --rows 1000000 --width 64 --device cpu

A ``rows x width`` float32 table gets an ``IndexedSlices`` gradient of k random rows
(duplicates included) each step: lazy Adamax touches only those rows, Adam is
dense-equivalent (every row of m, v and the table moves).  The dense row is the same
table with a full dense gradient.  Prints a markdown table of median ms/step.
"""
import argparse
import time

import numpy as np

import ireeopt


def _time(opt, pairs_fn, steps):
    opt.apply_gradients(pairs_fn())            # compile / warm up
    times = []
    for _ in range(steps):
        pairs = pairs_fn()
        start = time.perf_counter()
        opt.apply_gradients(pairs)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ks", default="1,16,256,4096,65536")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    table = rng.standard_normal((args.rows, args.width)).astype(np.float32)
    results = {}
    for name, cls in (("Adamax (lazy)", ireeopt.Adamax), ("Adam (dense-equivalent)", ireeopt.Adam)):
        var = ireeopt.Variable(table, name="embedding", device=args.device)
        opt = cls(learning_rate=1e-3)
        for k in [int(x) for x in args.ks.split(",")]:
            def pairs(k=k):
                g = ireeopt.IndexedSlices(rng.standard_normal((k, args.width)).astype(np.float32),
                                          rng.integers(0, args.rows, k), (args.rows, args.width))
                return [(g, var)]
            results[(name, k)] = _time(opt, pairs, args.steps)
            print(f"{name:24s} k={k:6d}: {results[(name, k)]:9.3f} ms/step", flush=True)
        dense = rng.standard_normal(table.shape).astype(np.float32)
        results[(name, "dense")] = _time(opt, lambda: [(dense, var)], max(3, args.steps // 2))
        print(f"{name:24s} dense   : {results[(name, 'dense')]:9.3f} ms/step", flush=True)

    ks = [k for (_, k) in results if k != "dense"]
    ks = sorted(set(ks))
    print(f"\n{args.rows} x {args.width} float32 table on {args.device}, median ms/step\n")
    print("| k | " + " | ".join(str(k) for k in ks) + " | dense gradient |")
    print("|---|" + "---|" * (len(ks) + 1))
    for name in ("Adamax (lazy)", "Adam (dense-equivalent)"):
        print(f"| {name} | " + " | ".join(f"{results[(name, k)]:.3f}" for k in ks)
              + f" | {results[(name, 'dense')]:.1f} |")


if __name__ == "__main__":
    main()
