"""Deploy: continue fine-tuning the demo's MLP in a process without JAX.

    ireeopt demo                      # writes ireeopt_demo/{artifact/, checkpoint.npz}
    python examples/deploy.py [ireeopt_demo] [--steps 300] [--device cpu]

Only numpy, iree-base-runtime and ireeopt are used here: the artifact holds the whole
train step (forward, backward, AdamW update) compiled ahead of time, the checkpoint
holds the weights, the optimizer's slots and its iteration count.  The held-out
accuracy below is computed with a numpy forward pass.
"""
import argparse
import sys
import time

import numpy as np

import ireeopt
from ireeopt.demo import load_data
from ireeopt.runtime.artifact import read_manifest


def forward(values, x):
    w1, b1, w2, b2 = values
    return np.maximum(x @ w1 + b1, 0) @ w2 + b2


def loss_and_accuracy(values, data):
    logits = forward(values, data["x"])
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(data["y"])), data["y"]].mean()), float((logits.argmax(1) == data["y"]).mean())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default="ireeopt_demo", help="what `ireeopt demo` wrote")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    opt = ireeopt.load(f"{args.folder}/artifact", device=args.device)
    manifest = read_manifest(f"{args.folder}/artifact")
    variables = [ireeopt.Variable(np.zeros(v["shape"], v["dtype"]), name=v["name"], device=args.device)
                 for v in manifest["variables"]]
    ireeopt.load_checkpoint(f"{args.folder}/checkpoint.npz", opt, variables)
    train, held_out = load_data()
    batch = manifest["train"]["spec"]["batch"][0][0][0]
    print(f"loaded {args.folder}/artifact ({manifest['optimizer']['class']}, {len(variables)} variables, "
          f"batch {batch}) and the checkpoint at step {int(opt.iterations)}")
    rng = np.random.default_rng(int(opt.iterations))
    print(f"{'step':>6}  {'train loss':>10}  {'held-out loss':>13}  {'held-out acc':>12}")

    def report():
        values = [v.numpy() for v in variables]
        tl, _ = loss_and_accuracy(values, train)
        hl, ha = loss_and_accuracy(values, held_out)
        print(f"{int(opt.iterations):>6}  {tl:>10.5f}  {hl:>13.5f}  {ha:>12.1%}")
        return tl

    first = report()
    start = time.perf_counter()
    for s in range(args.steps):
        idx = rng.integers(0, len(train["y"]), batch)
        opt.minimize(None, variables, (train["x"][idx], train["y"][idx]))     # the compiled train step
        if (s + 1) % max(args.steps // 5, 1) == 0:
            last = report()
    elapsed = time.perf_counter() - start
    jax_loaded = any((m == "jax" or m.startswith("jax.")) and sys.modules[m] is not None for m in list(sys.modules))
    print(f"{args.steps} steps in {elapsed:.2f} s ({opt.device_calls} device calls); train loss {first:.5f} -> "
          f"{last:.5f}; jax imported: {'yes' if jax_loaded else 'no'}")
    ireeopt.save_checkpoint(f"{args.folder}/checkpoint.npz", opt, variables)
    print(f"saved {args.folder}/checkpoint.npz at step {int(opt.iterations)}")
    return 0 if last < first else 1


if __name__ == "__main__":
    sys.exit(main())
