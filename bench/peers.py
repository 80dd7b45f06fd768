"""The implementations ``ireeopt bench`` times: ireeopt on each device, and peers when
installed (torch.optim.Adam fused and foreach, optax.adam under jax.jit with donation).

Each ``make_*`` returns a zero-argument ``step`` closure over ready, device-resident
state with its gradients already in place, or raises ``Unavailable`` with a reason.
"""
import numpy as np


class Unavailable(Exception):
    pass


def make_ireeopt(device, sizes):
    import ireeopt
    from ireeopt.runtime.device import Device

    try:
        Device.get(device)
    except Exception as e:
        raise Unavailable(f"no {device} device ({e})") from None
    rng = np.random.default_rng(0)
    variables = [ireeopt.Variable(rng.standard_normal(n).astype(np.float32), name=f"w{i}", device=device)
                 for i, n in enumerate(sizes)]
    grads = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    opt = ireeopt.Adam(learning_rate=1e-3)
    pairs = list(zip(grads, variables))
    return lambda: opt.apply_gradients(pairs)


def _torch(sizes, **kwargs):
    try:
        import torch
    except ImportError:
        raise Unavailable("torch is not installed") from None
    params = [torch.zeros(n, requires_grad=True) for n in sizes]
    for p in params:
        p.grad = torch.randn(p.numel())
    opt = torch.optim.Adam(params, lr=1e-3, **kwargs)
    return opt.step


def make_torch_fused(sizes):
    return _torch(sizes, fused=True)


def make_torch_foreach(sizes):
    return _torch(sizes, foreach=True)


def make_optax(sizes):
    try:
        import jax
        import jax.numpy as jnp
        import optax
    except ImportError:
        raise Unavailable("optax (and jax) are not installed") from None
    rng = np.random.default_rng(0)
    params = [jnp.asarray(rng.standard_normal(n).astype(np.float32)) for n in sizes]
    grads = [jnp.asarray(rng.standard_normal(n).astype(np.float32)) for n in sizes]
    tx = optax.adam(1e-3)
    state = {"params": params, "opt": tx.init(params)}

    def update(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    update = jax.jit(update, donate_argnums=(0, 1))

    def step():
        state["params"], state["opt"] = update(state["params"], state["opt"], grads)
        jax.block_until_ready(state["params"])
    return step


PEERS = {"torch-fused": make_torch_fused, "torch-foreach": make_torch_foreach, "optax-jit": make_optax}


# ---------------------------------------------------------------------- the sparse embedding scenario
def _sparse_batch(rows, width, k):
    rng = np.random.default_rng(0)
    return rng.integers(0, rows, k), rng.standard_normal((k, width)).astype(np.float32)


def make_ireeopt_sparse(device, optimizer, rows, width, k):
    """``optimizer`` ("Adam": dense-equivalent, "Adamax": lazy) on a ``rows x width`` table
    with an IndexedSlices gradient of ``k`` random rows (duplicates included)."""
    import ireeopt
    from ireeopt.runtime.device import Device

    try:
        Device.get(device)
    except Exception as e:
        raise Unavailable(f"no {device} device ({e})") from None
    table = ireeopt.Variable(np.random.default_rng(1).standard_normal((rows, width)).astype(np.float32),
                             name="embedding", device=device)
    ids, values = _sparse_batch(rows, width, k)
    opt = getattr(ireeopt, optimizer)(learning_rate=1e-3)
    pairs = [(ireeopt.IndexedSlices(values, ids, (rows, width)), table)]
    return lambda: opt.apply_gradients(pairs)


def make_torch_sparse_adam(rows, width, k):
    """torch.optim.SparseAdam (lazy Adam: only the rows in the gradient move)."""
    try:
        import torch
    except ImportError:
        raise Unavailable("torch is not installed") from None
    table = torch.zeros(rows, width, requires_grad=True)
    ids, values = _sparse_batch(rows, width, k)
    table.grad = torch.sparse_coo_tensor(torch.as_tensor(ids)[None], torch.as_tensor(values), (rows, width))
    return torch.optim.SparseAdam([table], lr=1e-3).step


SPARSE_PEERS = {"torch-sparse-adam": make_torch_sparse_adam}
