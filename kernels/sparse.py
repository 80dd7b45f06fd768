"""Sparse (IndexedSlices) updates over rows (axis 0) of a variable (spec §2, §4).

The host hands the step ``values[K, ...]`` (raw gradient rows, padded with zeros to a
bucket K), ``segments[K]`` (which unique row each value belongs to), ``indices[K]``
(the unique row ids, padded) and ``count`` (how many unique rows are real).  The
kernel clips the raw values (elsewhere), sums duplicates with ``segment_sum``, and
then *replicates slot 0 into every padding slot* while the host pads ``indices``
with ``indices[0]``: every write that lands on one row carries identical bytes, so
the scatters can be parallel (``unique_indices``) and never go out of bounds.  An
empty gradient (count 0) writes the rows it read back unchanged.

These kernels use JAX's ``x.at[...]`` indexing, so ``xp`` must be ``jax.numpy``.
"""


def segment_sum(xp, values, segments, count):
    """Sum the rows of ``values`` per segment, then fill the padding slots
    (``>= count``) with slot 0."""
    n = values.shape[0]
    summed = xp.zeros(values.shape, values.dtype).at[segments].add(values, mode="promise_in_bounds")
    slot = xp.arange(n, dtype=segments.dtype)
    return summed.at[xp.where(slot < count, slot, 0)].get(mode="promise_in_bounds")


def _gather(xp, table, indices):
    return table.at[indices].get(mode="promise_in_bounds")


def _scatter(table, indices, rows):
    return table.at[indices].set(rows, unique_indices=True, mode="promise_in_bounds")


def _keep_if_empty(xp, count, new_rows, old_rows):
    return xp.where(xp.broadcast_to(count, new_rows.shape) > 0, new_rows, old_rows)


def adam_dense_equivalent(xp, var, rows, indices, stale, slots, scratch, c):
    """Adam with a sparse gradient: every row of m, v decays, touched rows add the summed
    gradient, every row of ``var`` is updated.  Returns (var, slots, scratch).

    ``scratch`` is a persistent float32 table (donated) that holds the previous sparse
    step's rows at ``stale`` and zeros elsewhere.  Those rows are zeroed and this step's
    summed rows scattered in (O(k*d), in place); one fused elementwise pass then applies
    tf_keras's order ``m += -m*(1-b1); m[idx] += g*(1-b1)`` to every row (for an untouched
    row the added term is exactly 0).  The table is only written before it is read:
    IREE 3.13 mishandles an in-place write after a read of a donated buffer.  Padding
    slots repeat slot 0 (same row, same values), so no count mask is needed here.
    """
    g = _scatter(_scatter(scratch, stale, xp.zeros_like(rows)), indices, rows)
    m = (slots["m"] + (-slots["m"]) * c["one_minus_b1"]) + g * c["one_minus_b1"]
    v = (slots["v"] + (-slots["v"]) * c["one_minus_b2"]) + (g * g) * c["one_minus_b2"]
    new = {"m": m, "v": v}
    v_used = v
    if "vhat" in slots:
        v_used = new["vhat"] = xp.maximum(slots["vhat"], v)
    var = var - (m * c["alpha"]) / (xp.sqrt(v_used) + c["eps"])
    return var, new, g


def adamax_lazy(xp, var, rows, indices, count, slots, c, decay=None):
    """Lazy Adamax: only touched rows of m, u and ``var`` are read and written::

        m_r = m[idx]*b1 + g*(1-b1);  u_r = max(u[idx]*b2, |g|)
        var[idx] -= (lr/(1-b1p)) * (m_r/(u_r+epsilon))

    ``decay``, if given, is ``(wd, lr)``: weight decay of the touched rows only.
    Returns (var, slots) with ``var`` in float32."""
    p_rows = _gather(xp, var, indices).astype("float32")
    m_rows, u_rows = _gather(xp, slots["m"], indices), _gather(xp, slots["u"], indices)
    new_p = p_rows
    if decay is not None:
        new_p = new_p - (new_p * decay[0]) * decay[1]
    m_new = m_rows * c["beta_1"] + rows * c["one_minus_b1"]
    u_new = xp.maximum(u_rows * c["beta_2"], xp.abs(rows))
    new_p = new_p - c["current_lr"] * (m_new / (u_new + c["eps"]))
    new_p = _keep_if_empty(xp, count, new_p.astype(var.dtype), p_rows.astype(var.dtype))
    m_new = _keep_if_empty(xp, count, m_new, m_rows)
    u_new = _keep_if_empty(xp, count, u_new, u_rows)
    return _scatter(var, indices, new_p), {"m": _scatter(slots["m"], indices, m_new),
                                            "u": _scatter(slots["u"], indices, u_new)}
