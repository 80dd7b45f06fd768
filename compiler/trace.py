"""StepSpec -> StableHLO text, with every state argument donated."""


def lower_step(spec):
    """Trace ``kernels.step.flat_step`` for ``spec`` and return its StableHLO module text.

    Donated arguments carry ``tf.aliasing_output``, which IREE turns into
    ``iree.abi.output``: the compiled step writes results into those buffers.
    """
    import jax
    import jax.numpy as jnp

    from ..kernels.step import flat_step

    structs = [jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)) for _, _, shape, dtype in spec.arguments()]
    fn = jax.jit(flat_step(jnp, spec), donate_argnums=tuple(spec.donated), keep_unused=True)
    text = fn.lower(*structs).as_text()
    return text.replace("module @jit_fn", "module @ireeopt_step", 1)
