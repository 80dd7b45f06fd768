"""Per-step time of ``apply_gradients`` for a dense model, through the public API.

    python bench/dense_step.py --params 1048576 --tensors 1 --device cpu --steps 200

Prints the median, p10 and p90 of the wall time per step (numpy gradients in,
parameters and slots updated in place on the device).
"""
import argparse
import time

import numpy as np

import ireeopt


def measure(params, tensors, device, steps, optimizer="Adam", **kwargs):
    rng = np.random.default_rng(0)
    size = params // tensors
    variables = [ireeopt.Variable(rng.standard_normal(size).astype(np.float32), name=f"w{i}", device=device)
                 for i in range(tensors)]
    grads = [rng.standard_normal(size).astype(np.float32) for _ in variables]
    opt = getattr(ireeopt, optimizer)(**kwargs)
    pairs = list(zip(grads, variables))
    for _ in range(5):
        opt.apply_gradients(pairs)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.apply_gradients(pairs)
        times.append(time.perf_counter() - start)
    return np.percentile(np.array(times) * 1e3, [10, 50, 90])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=1 << 20)
    parser.add_argument("--tensors", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--optimizer", default="Adam")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    p10, p50, p90 = measure(args.params, args.tensors, args.device, args.steps, args.optimizer)
    print(f"{args.optimizer} {args.params} params in {args.tensors} tensor(s) on {args.device}: "
          f"median {p50:.3f} ms/step (p10 {p10:.3f}, p90 {p90:.3f})")


if __name__ == "__main__":
    main()
