"""Train a softmax classifier with ireeopt.AdamW: numpy computes the gradients, the
compiled IREE step updates the parameters in place on the device.

    python examples/quickstart.py
"""
import time

import numpy as np

import ireeopt


def make_data(rng, centers, n):
    labels = rng.integers(0, len(centers), n)
    x = centers[labels] * 0.15 + rng.standard_normal((n, centers.shape[1])).astype(np.float32)
    return x, labels


def loss_and_grads(w, b, x, y):
    logits = x @ w + b
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    loss = -np.log(p[np.arange(len(y)), y] + 1e-12).mean()
    p[np.arange(len(y)), y] -= 1
    p /= len(y)
    return loss, (x.T @ p).astype(np.float32), p.sum(axis=0).astype(np.float32)


def main():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((10, 784)).astype(np.float32)
    x, y = make_data(rng, centers, 2048)
    x_test, y_test = make_data(rng, centers, 512)
    w = ireeopt.Variable(np.zeros((784, 10), np.float32), name="dense/kernel")
    b = ireeopt.Variable(np.zeros(10, np.float32), name="dense/bias")
    opt = ireeopt.AdamW(learning_rate=ireeopt.schedules.CosineDecay(1e-2, 300), weight_decay=0.01,
                        amsgrad=True, global_clipnorm=1.0, use_ema=True, ema_overwrite_frequency=100)
    opt.exclude_from_weight_decay(var_names=["bias"])

    def accuracy(wv, bv):
        return float(((x_test @ wv + bv).argmax(axis=1) == y_test).mean())

    print(f"before: loss {loss_and_grads(w.numpy(), b.numpy(), x, y)[0]:.4f}  "
          f"test accuracy {accuracy(w.numpy(), b.numpy()):.3f}")
    start = time.perf_counter()
    for step in range(300):
        batch = rng.integers(0, len(x), 128)
        loss, gw, gb = loss_and_grads(w.numpy(), b.numpy(), x[batch], y[batch])
        opt.apply_gradients([(gw, w), (gb, b)])
        if step % 100 == 0:
            print(f"step {step:3d}  batch loss {loss:.4f}")
    elapsed = time.perf_counter() - start
    opt.finalize_variable_values([w, b])
    print(f"after {int(opt.iterations)} steps ({elapsed:.1f} s, compile included): "
          f"loss {loss_and_grads(w.numpy(), b.numpy(), x, y)[0]:.4f}  "
          f"test accuracy {accuracy(w.numpy(), b.numpy()):.3f}")


if __name__ == "__main__":
    main()
