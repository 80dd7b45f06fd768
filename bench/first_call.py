"""First-call time of ``apply_gradients`` with a cold compile cache, in fresh processes.

    python bench/first_call.py --tensors 200 --params 65536,4194304,16777216 --processes 3

Each process gets an empty ``IREEOPT_CACHE_DIR``, makes the model and its gradients, and
times its first ``apply_gradients`` (compile, build, step: ``import ireeopt`` and the model
are outside it).  Prints the times per process and whether the process imported jax.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

_CHILD = """
import json, sys, time
import numpy as np
import ireeopt
params, tensors, optimizer, settings = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
size = params // tensors
rng = np.random.default_rng(0)
variables = [ireeopt.Variable(rng.standard_normal(size).astype(np.float32), name=f"w{i}") for i in range(tensors)]
pairs = [(rng.standard_normal(size).astype(np.float32), v) for v in variables]
opt = getattr(ireeopt, optimizer)(**settings)
start = time.perf_counter()
opt.apply_gradients(pairs)
print(json.dumps({"seconds": time.perf_counter() - start, "jax": "jax" in sys.modules}))
"""


def first_call(params, tensors, optimizer="Adam", settings=None):
    """(seconds, whether jax was imported) of one fresh process's first call."""
    with tempfile.TemporaryDirectory(prefix="ireeopt-cold-") as cache:
        done = subprocess.run([sys.executable, "-c", _CHILD, str(params), str(tensors), optimizer,
                               json.dumps(settings or {})], env=dict(os.environ, IREEOPT_CACHE_DIR=cache),
                              capture_output=True, text=True, check=True)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return out["seconds"], out["jax"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="65536,4194304,16777216", help="total parameters, comma-separated")
    parser.add_argument("--tensors", type=int, default=200)
    parser.add_argument("--optimizer", default="Adam")
    parser.add_argument("--settings", default="{}", help='optimizer keywords as JSON, e.g. \'{"global_clipnorm": 1}\'')
    parser.add_argument("--processes", type=int, default=3)
    args = parser.parse_args()
    settings = json.loads(args.settings)
    for params in (int(p) for p in args.params.split(",")):
        runs = [first_call(params, args.tensors, args.optimizer, settings) for _ in range(args.processes)]
        times = ", ".join(f"{s:.2f}" for s, _ in runs)
        jax = "imported jax" if any(j for _, j in runs) else "no jax"
        print(f"{args.optimizer} {settings or ''} {args.tensors} x {params:,}/{args.tensors}: first call {times} s "
              f"({jax})", flush=True)


if __name__ == "__main__":
    main()
