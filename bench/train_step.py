"""Time compiled train steps (``opt.minimize``), median ms per step on one device.

    python bench/train_step.py [--device cpu] [--steps 200]

1. The demo's models (``ireeopt demo``): one fused call per step against
   ``compute_gradients`` + ``apply_gradients`` (two calls and the gradients' round trip
   through the host), interleaved step by step.
2. An embedding bag over tables of R rows × 64 with n looked-up ids per step: the sparse
   rule (``ireeopt.lookup`` with Adam's dense-gradient choice switched off), a plain gather
   (``jnp.take``, a dense gradient) and ``ireeopt.lookup`` as shipped, for Adam
   (dense-equivalent sparse rule) and Adamax (lazy sparse rule).
"""
import argparse
import sys
import time

import numpy as np


def _median_ms(fn, batches, warmup=10):
    times = []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        fn(batch)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def demo_models(device, steps):
    from ireeopt import demo

    train, _ = demo.load_data()
    rows = []
    for make in (demo.mlp_model, demo.bag_model):
        model = make(device)
        t = model.time_paths(train, steps)
        rows.append((model.title, t["fused"][0], t["separate"][0]))
    return rows


def embedding_tables(device, steps, sizes=((4096, 4096), (16384, 4096), (65536, 4096), (262144, 1024), (262144, 16384))):
    import jax
    import jax.numpy as jnp

    import ireeopt
    from ireeopt.compiler import train

    default = train.DENSE_FROM

    def loss(read):
        def f(values, batch):
            table, w = values
            ids, y = batch
            logits = read(table, ids).mean(axis=1) @ w
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))
        return f

    losses = {"lookup": loss(ireeopt.lookup), "take": loss(lambda t, i: jnp.take(t, i, axis=0))}
    rng = np.random.default_rng(0)
    rows = []
    for r, n in sizes:
        batches = [(rng.integers(0, r, (n // 16, 16)).astype(np.int32), rng.integers(0, 10, n // 16).astype(np.int32))
                   for _ in range(steps + 10)]
        for name in ("Adam", "Adamax"):
            times = {}
            for how, f in (("sparse", losses["lookup"]), ("take", losses["take"]), ("auto", losses["lookup"])):
                # "sparse": lookup with Adam's dense-gradient rule off; "auto": lookup as shipped
                train.DENSE_FROM = 0 if how == "sparse" else default
                variables = [ireeopt.Variable(rng.standard_normal((r, 64)).astype(np.float32), name="table",
                                              device=device),
                             ireeopt.Variable(rng.standard_normal((64, 10)).astype(np.float32), name="w",
                                              device=device)]
                opt = getattr(ireeopt, name)(learning_rate=1e-3)
                times[how] = _median_ms(lambda b: opt.minimize(f, variables, b), batches)
            train.DENSE_FROM = default
            rows.append((r, n, name, times["sparse"], times["take"], times["auto"]))
            print(f"  table {r:>7,} x 64, {n:>6,} ids, {name:<6}: sparse {times['sparse']:8.3f} ms   "
                  f"take (dense) {times['take']:8.3f} ms   lookup {times['auto']:8.3f} ms", file=sys.stderr, flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--skip-tables", action="store_true")
    args = parser.parse_args(argv)
    print(f"device {args.device}, median ms/step over {args.steps} steps\n")
    print("| demo model | fused train step | compute_gradients + apply_gradients | speed-up |\n|---|---|---|---|")
    for title, fused, separate in demo_models(args.device, args.steps):
        print(f"| {title} | {fused:.3f} | {separate:.3f} | {separate / fused:.1f}x |")
    if not args.skip_tables:
        print("\n| table rows x 64 | ids per step | optimizer | sparse rule | dense gradient (`jnp.take`) | "
              "`ireeopt.lookup` |\n|---|---|---|---|---|---|")
        for r, n, name, sparse, take, auto in embedding_tables(args.device, args.steps):
            print(f"| {r:,} | {n:,} | {name} | {sparse:.3f} | {take:.3f} | {auto:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
