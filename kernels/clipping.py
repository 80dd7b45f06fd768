"""Gradient clipping (spec §5). ``c`` is the threshold, a runtime scalar.

A sparse gradient arrives with its duplicates already summed; its squared norm over
the *raw* values (duplicates separate) is passed in as ``sumsq``, and ``clipvalue``
has already been applied to its raw values on the host (``host_clipped``).
"""

MODES = ("clipnorm", "global_clipnorm", "clipvalue")
#: a squared norm of at least NORM_ROWS_FROM elements is summed over rows of a length in
#: NORM_ROW_RANGE that divides the size
NORM_ROWS_FROM = 8192
NORM_ROW_RANGE = (256, 4096)


def norm_row(size):
    """The row length ``squared_norm`` sums by: the largest divisor of ``size`` in
    NORM_ROW_RANGE that is a multiple of 16 (whole vectors), else the largest one; None for
    a size below NORM_ROWS_FROM or without such a divisor."""
    low, high = NORM_ROW_RANGE
    if size < NORM_ROWS_FROM:
        return None
    divisors = [r for r in range(min(high, size // 2), low - 1, -1) if size % r == 0]
    return next((r for r in divisors if r % 16 == 0), divisors[0] if divisors else None)


def squared_norm(xp, grad):
    """``sum(grad ** 2)``, summed row by row (``norm_row``; where no row length divides the
    size, rows of 4,096 over all but the last elements, which are summed apart), then over
    the rows' sums, as a scalar of its own (``_apart``).  Summed along its one long axis,
    llvm-cpu gives a norm to one thread adding into one float32: 2^24 elements took ~18 ms
    standalone and came out 1% off; by rows of 4,096 ~5-6 ms, within 1e-6.  In a step of
    1 x 2^24 with clipnorm: 48.9 -> 20 ms (14-15 plain); 1 x (2^24 + 3), rows of 1,549:
    23-37 ms (over a prefix instead: 66 ms); IREE's own split-reduction flag made the whole
    step 4x slower."""
    size = 1
    for d in grad.shape:
        size = size * d
    if not isinstance(size, int) or size < NORM_ROWS_FROM:        # (a symbolic size: as it is)
        return xp.sum(grad * grad)
    row = norm_row(size)
    if row is None:          # rows of all but the last elements, which are summed apart
        flat, row = grad.reshape(-1), NORM_ROW_RANGE[1]
        count = size // row
        rows, tail = flat[:count * row].reshape(count, row), flat[count * row:]
        return _apart(xp, xp.sum(xp.sum(rows * rows, axis=1)) + xp.sum(tail * tail))
    rows = grad.reshape(size // row, row)
    return _apart(xp, xp.sum(xp.sum(rows * rows, axis=1)))


def _apart(xp, norm):
    """A norm kept out of the dispatch that uses it (a JAX optimization barrier).  Fused
    into the elementwise update, the sum over the rows' sums was done again by every
    workgroup (1 x (2^24 + 3), rows of 1,549: 167 ms a step), and a sum along one axis took
    the whole update into its single-threaded dispatch (1 x (2^22 + 5): 96 ms)."""
    if getattr(xp, "__name__", "").startswith("jax"):
        from jax import lax

        return lax.optimization_barrier(norm)
    return norm


def clip_by_norm(xp, grad, c, sumsq):
    """Per variable: ``g * c / max(||g||, c)``."""
    return (grad * c) / xp.maximum(xp.sqrt(sumsq), c)


def clip_by_global_norm(xp, grads, c, sumsqs):
    """All gradients scaled by ``c * min(1/n, 1/c)``, ``n = sqrt(sum_i ||g_i||^2)``; a
    non-finite norm gives NaN everywhere, as Keras does (the ``n - n`` term)."""
    n = xp.sqrt(sum(sumsqs))
    scale = c * xp.minimum(1.0 / n, 1.0 / c) + (n - n)
    return [g * scale for g in grads]


def clip_by_value(xp, grad, c):
    """Elementwise clip to ``[-c, c]``."""
    return xp.clip(grad, -c, c)


def clip(xp, mode, grads, c, sumsqs=None, host_clipped=None):
    """Apply the one active clipping ``mode`` (or none) to the list ``grads``.
    ``sumsqs[i]``: a given squared norm, or None to compute it from ``grads[i]``."""
    sumsqs = sumsqs or [None] * len(grads)
    host_clipped = host_clipped or [False] * len(grads)
    if mode is None:
        return list(grads)
    if mode == "clipvalue":
        return [g if done else clip_by_value(xp, g, c) for g, done in zip(grads, host_clipped)]
    squares = [squared_norm(xp, g) if s is None else s for g, s in zip(grads, sumsqs)]
    if mode == "clipnorm":
        return [clip_by_norm(xp, g, c, s) for g, s in zip(grads, squares)]
    if mode == "global_clipnorm":
        return clip_by_global_norm(xp, grads, c, squares)
    raise ValueError(f"unknown clipping mode {mode!r}; expected one of {MODES}")
