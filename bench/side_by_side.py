"""Two implementations of one Adam step in one process, taken in turn on the same model.

    python -m ireeopt.bench.side_by_side --params 4194304 --tensors 1 --mode blocks
    python -m ireeopt.bench.side_by_side --first "ireeopt cpu" --second torch-fused --mode alternate

``ireeopt bench`` times every implementation in a fresh process of its own.  This is the
other view, that of a program that uses both: in one process each implementation meets
what the other leaves behind (torch's OpenMP workers spinning for milliseconds after its
step, the other's arrays in the caches).  ``--mode blocks`` runs ``--steps`` steps of one,
then of the other, for ``--rounds`` rounds; ``--mode alternate`` one step of each in turn.
Prints each implementation's median step (every step counted, the first of a block too)
and the ratio first / second.  Implementations are named as in ``ireeopt bench``:
"ireeopt DEVICE" or a peer (torch-fused, torch-foreach, optax-jit).
"""
import argparse
import sys

import numpy as np

from .compare import _timed, make_dense
from .peers import PEERS, Unavailable

MODES = ("blocks", "alternate")


def side_by_side(first, second, split, mode="blocks", steps=20, rounds=5):
    """{name: median seconds of its steps} of ``first`` and ``second`` on a model of
    tensors of ``split`` sizes, taken in turn (``mode``, see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    made = {name: make_dense(name, split) for name in (first, second)}
    for step in made.values():          # (the first call compiles; the second is warm)
        step()
        step()
    times = {name: [] for name in made}
    for _ in range(rounds):
        if mode == "alternate":
            for _ in range(steps):
                for name, step in made.items():
                    times[name].append(_timed(step))
        else:
            for name, step in made.items():
                times[name] += [_timed(step) for _ in range(steps)]
    return {name: float(np.median(t)) for name, t in times.items()}


def _known(name):
    return name.startswith("ireeopt ") or name in PEERS


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ireeopt.bench.side_by_side", description=__doc__.splitlines()[0])
    parser.add_argument("--first", default="ireeopt cpu", help='"ireeopt DEVICE" or a peer (default: ireeopt cpu)')
    parser.add_argument("--second", default="torch-fused", help="the same (default: torch-fused)")
    parser.add_argument("--params", type=int, default=1 << 22, help="total parameters (default 2^22)")
    parser.add_argument("--tensors", type=int, default=1, help="tensors they are split into (default 1)")
    parser.add_argument("--mode", choices=MODES, default="blocks")
    parser.add_argument("--steps", type=int, default=20, help="steps of each per block, or per round when alternating")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    for name in (args.first, args.second):
        if not _known(name):
            parser.error(f"unknown implementation {name!r}; known: 'ireeopt DEVICE', {', '.join(PEERS)}")
    if args.first == args.second:
        parser.error("--first and --second must differ")
    if args.tensors < 1 or args.params < args.tensors:
        parser.error(f"--params ({args.params}) must be at least --tensors ({args.tensors}), which must be at least 1")
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be at least 1")
    split = [args.params // args.tensors] * args.tensors
    try:
        medians = side_by_side(args.first, args.second, split, args.mode, args.steps, args.rounds)
    except Unavailable as e:
        print(f"cannot run: {e}", file=sys.stderr)
        return 2
    a, b = medians[args.first], medians[args.second]
    print(f"{args.tensors} x {split[0]:,} params, {args.mode}, {args.rounds} x {args.steps} steps each: "
          f"{args.first} {a * 1e3:.3f} ms, {args.second} {b * 1e3:.3f} ms, ratio {a / b:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
