"""Sparse (IndexedSlices) updates over rows (axis 0) of a variable (spec §2, §4).

The host hands the step, per sparse variable, ``rows[K, ...]`` (float32, duplicates
already summed; ``clipvalue`` already applied to the raw values), ``indices[K]`` (the
unique row ids), ``count`` (how many of the K slots are real) and ``sumsq`` (the
sum of squares of the raw values, duplicates separate, for ``clipnorm`` and
``global_clipnorm``).  Padding slots repeat slot 0 (same row id, same values): every
write that lands on one row carries identical bytes, so every scatter can be parallel
(``unique_indices``) and is in bounds, and the graph has no serial scatter (Mesa's
lavapipe silently stops a shader after 65,535 loop iterations).

These kernels use JAX's ``x.at[...]`` indexing, so ``xp`` must be ``jax.numpy``.
"""


def _gather(table, indices):
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
    rows scattered in (O(k*d), in place); one fused elementwise pass then applies
    tf_keras's order ``m += -m*(1-b1); m[idx] += g*(1-b1)`` to every row (for an untouched
    row the added term is exactly 0).  The table is only written before it is read:
    IREE 3.13 mishandles an in-place write after a read of a donated buffer.  An empty
    gradient scatters zeros, so no count mask is needed here.
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
    An empty gradient (``count == 0``) writes back the rows it read."""
    p_rows = _gather(var, indices)
    m_rows, u_rows = _gather(slots["m"], indices), _gather(slots["u"], indices)
    new_p = p_rows.astype("float32")
    if decay is not None:
        new_p = new_p - (new_p * decay[0]) * decay[1]
    m_new = m_rows * c["beta_1"] + rows * c["one_minus_b1"]
    u_new = xp.maximum(u_rows * c["beta_2"], xp.abs(rows))
    new_p = new_p - c["current_lr"] * (m_new / (u_new + c["eps"]))
    new_p = _keep_if_empty(xp, count, new_p.astype(var.dtype), p_rows)
    m_new = _keep_if_empty(xp, count, m_new, m_rows)
    u_new = _keep_if_empty(xp, count, u_new, u_rows)
    return _scatter(var, indices, new_p), {"m": _scatter(slots["m"], indices, m_new),
                                            "u": _scatter(slots["u"], indices, u_new)}
