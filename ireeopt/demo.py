"""``ireeopt demo``: compiled on-device fine-tuning of two small models on real data.

The data is scikit-learn's bundled handwritten digits (1,797 8×8 images, no download).

1. **MLP** (64 → 128 → 10, ReLU) with AdamW: ``opt.minimize(loss, variables, batch)``
   runs forward, backward and the in-place update as one compiled IREE call.
2. **Pixel-token embedding model**: each image becomes 64 tokens (pixel position ×
   intensity × the right neighbour's intensity, a vocabulary of 18,496); an embedding
   bag (``ireeopt.lookup``: sparse gradients inside the compiled step) feeds a linear
   classifier; Adamax, whose sparse rule is lazy (only the looked-up rows move).

Then it times the compiled train step against the same step done as two calls
(``compute_gradients`` + ``apply_gradients``), writes a loss-curve PNG, the MLP's
deployable artifact and a checkpoint (``examples/deploy.py`` continues from them
in a process without JAX).
"""
import argparse
import json
import pathlib
import shutil
import sys
import time

import numpy as np

TOKENS_PER_IMAGE, LEVELS = 64, 17
VOCABULARY = TOKENS_PER_IMAGE * LEVELS * LEVELS      # 18,496


# ---------------------------------------------------------------------- data
def load_data(seed=0):
    """(train, held-out) splits of the digits: dicts of ``x`` [n, 64] float32 in [0, 1],
    ``tokens`` [n, 64] int32 (per pixel: its position, its intensity and its right
    neighbour's, one of VOCABULARY ids) and ``y`` [n] int32."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("ireeopt demo needs scikit-learn for its data set: pip install -e \".[demo]\"") from None
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    pixels = digits.data.astype(np.int64)
    right = np.roll(pixels.reshape(-1, 8, 8), -1, axis=2).reshape(-1, 64)     # the pixel to the right (wrapping)
    tokens = ((np.arange(TOKENS_PER_IMAGE) * LEVELS + pixels) * LEVELS + right).astype(np.int32)
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(0.8 * len(y))
    split = [order[:cut], order[cut:]]
    return [{"x": x[i], "tokens": tokens[i], "y": y[i]} for i in split]


# ---------------------------------------------------------------------- models (JAX, traced once)
def mlp_logits(values, x):
    import jax

    w1, b1, w2, b2 = values
    return jax.nn.relu(x @ w1 + b1) @ w2 + b2


def mlp_loss(values, batch):
    x, y = batch
    return _cross_entropy(mlp_logits(values, x), y)


def bag_logits(values, tokens):
    import ireeopt

    table, w, b = values
    return ireeopt.lookup(table, tokens).mean(axis=1) @ w + b


def bag_loss(values, batch):
    tokens, y = batch
    return _cross_entropy(bag_logits(values, tokens), y)


def _cross_entropy(logits, y):
    import jax
    import jax.numpy as jnp

    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def mlp_init(rng):
    return {"mlp/hidden/kernel": rng.standard_normal((64, 128)).astype(np.float32) * np.float32(np.sqrt(2 / 64)),
            "mlp/hidden/bias": np.zeros(128, np.float32),
            "mlp/out/kernel": rng.standard_normal((128, 10)).astype(np.float32) * np.float32(np.sqrt(1 / 128)),
            "mlp/out/bias": np.zeros(10, np.float32)}


def bag_init(rng):
    return {"bag/embeddings": rng.standard_normal((VOCABULARY, 32)).astype(np.float32) * np.float32(0.1),
            "bag/out/kernel": rng.standard_normal((32, 10)).astype(np.float32) * np.float32(0.1),
            "bag/out/bias": np.zeros(10, np.float32)}


# ---------------------------------------------------------------------- display
class Progress:
    """A one-line progress bar on a terminal; on anything else, one line at the end."""

    def __init__(self, total, label, stream=sys.stdout, width=28):
        self.total, self.label, self.stream, self.width = total, label, stream, width
        self.tty = stream.isatty()
        self.start = time.perf_counter()
        self.shown = 0.0

    def update(self, done, loss):
        now = time.perf_counter()
        if done == self.total or (self.tty and now - self.shown > 0.05):
            self.shown = now
            filled = int(self.width * done / self.total)
            rate = done / max(now - self.start, 1e-9)
            line = (f"  {self.label} {'█' * filled}{'░' * (self.width - filled)} {done:>4}/{self.total} "
                    f"loss {loss:6.4f}  {rate:7,.0f} steps/s")
            if self.tty:
                self.stream.write("\r" + line + ("\n" if done == self.total else ""))
            elif done == self.total:
                self.stream.write(line + "\n")
            self.stream.flush()


def sparkline(values, n=40):
    bars = "▁▂▃▄▅▆▇█"
    chunks = np.array_split(np.asarray(values, np.float64), min(n, len(values)))
    means = np.array([c.mean() for c in chunks])
    lo, hi = means.min(), means.max()
    scaled = (means - lo) / (hi - lo + 1e-12) * (len(bars) - 1)
    return "".join(bars[int(round(s))] for s in scaled)


# ---------------------------------------------------------------------- one model
class Model:
    def __init__(self, title, short, init, loss, logits, inputs, make_optimizer, device, batch_size):
        import ireeopt

        self.title, self.short, self.loss, self.logits, self.inputs = title, short, loss, logits, inputs
        self.batch_size = batch_size
        self.make_optimizer, self.device = make_optimizer, device
        self.initial = init(np.random.default_rng(1))
        self.variables = [ireeopt.Variable(v, name=n, device=device) for n, v in self.initial.items()]
        self.optimizer = make_optimizer()

    def evaluate(self, data):
        """(mean loss, accuracy) on ``data`` with the variables' current values (host JAX)."""
        import jax

        values = [v.numpy() for v in self.variables]
        logits = np.asarray(jax.jit(self.logits)(values, data[self.inputs]))
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        loss = float(-log_p[np.arange(len(data["y"])), data["y"]].mean())
        return loss, float((logits.argmax(axis=1) == data["y"]).mean())

    def batches(self, data, steps, seed):
        batch_size = self.batch_size
        rng = np.random.default_rng(seed)
        n = len(data["y"])
        order = np.concatenate([rng.permutation(n) for _ in range(steps * batch_size // n + 1)])
        for s in range(steps):
            idx = order[s * batch_size:(s + 1) * batch_size]
            yield data[self.inputs][idx], data["y"][idx]

    def train(self, data, steps, seed=0):
        """Returns (batch losses, seconds per step after the first, which compiles)."""
        losses, progress = [], Progress(steps, "training")
        start = time.perf_counter()
        first = None
        for s, batch in enumerate(self.batches(data, steps, seed)):
            losses.append(float(self.optimizer.minimize(self.loss, self.variables, batch)))
            if s == 0:
                first = time.perf_counter()
            progress.update(s + 1, losses[-1])
        return losses, (time.perf_counter() - first) / max(steps - 1, 1), first - start

    def time_paths(self, data, steps=300):
        """Median ms/step of the fused train step and of compute_gradients + apply_gradients,
        each on its own fresh copy of the initial variables, the two interleaved step by step
        (so that a noisy host slows both alike).  Returns {path: (ms, device calls, steps)}."""
        import ireeopt

        runs = {}
        for path in ("fused", "separate"):
            variables = [ireeopt.Variable(v, name=n, device=self.device) for n, v in self.initial.items()]
            runs[path] = (variables, self.make_optimizer(), [])
        for batch in self.batches(data, steps + 20, seed=5):
            for path, (variables, opt, times) in runs.items():
                t0 = time.perf_counter()
                if path == "fused":
                    opt.minimize(self.loss, variables, batch)
                else:
                    opt.apply_gradients(opt.compute_gradients(self.loss, variables, batch))
                times.append(time.perf_counter() - t0)
        return {path: (1e3 * float(np.median(times[20:])), opt.device_calls, int(opt.iterations))
                for path, (_, opt, times) in runs.items()}


# ---------------------------------------------------------------------- the demo
def plot(curves, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no loss-curve PNG (pip install matplotlib)"
    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 3.8))
    for ax, (title, losses, before, after) in zip(np.atleast_1d(axes), curves):
        steps = np.arange(1, len(losses) + 1)
        ax.plot(steps, losses, color="#9ecae1", lw=0.8, label="batch loss")
        k = max(len(losses) // 40, 1)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, color="#08519c", lw=2, label=f"mean of {k} batches")
        ax.set_yscale("log")
        ax.set_title(f"{title}\nheld-out accuracy {before:.1%} → {after:.1%}", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("ireeopt: one compiled IREE call per training step", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def mlp_optimizer():
    import ireeopt

    opt = ireeopt.AdamW(learning_rate=3e-3, weight_decay=1e-3)
    opt.exclude_from_weight_decay(var_names=["bias"])
    return opt


def mlp_model(device="cpu"):
    return Model("MLP 64→128→10, AdamW", "MLP", mlp_init, mlp_loss, mlp_logits, "x", mlp_optimizer, device, 64)


def bag_model(device="cpu"):
    import ireeopt

    return Model("pixel-token embedding bag (18,496×32, sparse lookups), Adamax", "embedding bag", bag_init, bag_loss, bag_logits,
                 "tokens", lambda: ireeopt.Adamax(learning_rate=2e-2), device, 32)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="ireeopt demo", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default), local-task, vulkan, cuda, ...")
    parser.add_argument("--steps", type=int, default=600, help="training steps per model (default 600)")
    parser.add_argument("--output", default="ireeopt_demo", help="folder for the PNG, artifact and checkpoint")
    parser.add_argument("--no-timing", action="store_true", help="skip the fused-vs-separate timing")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2")
    import ireeopt

    start = time.perf_counter()
    out = pathlib.Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    train, held_out = load_data()
    print(f"ireeopt {ireeopt.__version__} demo: compiled on-device fine-tuning on {args.device!r}\n"
          f"data: scikit-learn's handwritten digits, {len(train['y'])} training / {len(held_out['y'])} held-out "
          f"8×8 images, 10 classes\n")
    models = [mlp_model(args.device), bag_model(args.device)]
    curves, summary = [], []
    for n, model in enumerate(models, 1):
        params = sum(v.size for v in model.initial.values())
        print(f"[{n}/{len(models)}] {model.title}: {params:,} parameters, batch {model.batch_size}")
        loss0, acc0 = model.evaluate(held_out)
        print(f"  before  held-out loss {loss0:.4f}  accuracy {acc0:6.1%}")
        losses, per_step, compile_s = model.train(train, args.steps)
        loss1, acc1 = model.evaluate(held_out)
        print(f"  after   held-out loss {loss1:.4f}  accuracy {acc1:6.1%}   "
              f"(first step {compile_s:.1f} s: trace + compile, or the compile cache)")
        print(f"  batch loss {sparkline(losses)}  {losses[0]:.3f} → {np.mean(losses[-20:]):.3f}")
        calls = model.optimizer.device_calls
        print(f"  {args.steps} steps, {calls} device calls ({calls / args.steps:g} per step), "
              f"{per_step * 1e3:.3f} ms/step\n")
        curves.append((model.title, losses, acc0, acc1))
        summary.append({"model": model.title, "parameters": int(params), "held_out_accuracy": [acc0, acc1],
                        "held_out_loss": [loss0, loss1], "ms_per_step": per_step * 1e3, "device_calls": calls,
                        "steps": args.steps})
    if not args.no_timing:
        print("one compiled call vs. two (compute_gradients + apply_gradients), median of 300 steps:")
        for model, entry in zip(models, summary):
            t = model.time_paths(train)
            (fused, fused_calls, steps), (separate, separate_calls, _) = t["fused"], t["separate"]
            print(f"  {model.short:<14} {fused:7.3f} ms  vs {separate:7.3f} ms "
                  f"({separate_calls // steps} calls/step + host round trip of the gradients)  "
                  f"→ {separate / fused:4.1f}× faster")
            entry.update(fused_ms=fused, separate_ms=separate, speedup=separate / fused)
        print()
    note = plot(curves, out / "loss_curve.png")
    mlp = models[0]
    artifact_dir = out / "artifact"
    if artifact_dir.exists():
        shutil.rmtree(artifact_dir)
    example = next(mlp.batches(train, 1, seed=0))
    t0 = time.perf_counter()
    ireeopt.compile(mlp.optimizer, mlp.variables, targets=["llvm-cpu"], loss=mlp_loss, batch=example).save(artifact_dir)
    ireeopt.save_checkpoint(out / "checkpoint.npz", mlp.optimizer, mlp.variables)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {out}/")
    print(f"  loss_curve.png    {note or 'batch loss of both models'}")
    print(f"  artifact/         the MLP's train step for llvm-cpu ({time.perf_counter() - t0:.1f} s to compile): "
          "ireeopt info " + str(artifact_dir))
    print(f"  checkpoint.npz    the MLP after {int(mlp.optimizer.iterations)} steps")
    print("  summary.json      every number above")
    print(f"next: python examples/deploy.py {out}   (continues fine-tuning in a process without JAX)")
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
