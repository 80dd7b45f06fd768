"""StepSpec -> StableHLO text, with every state argument donated."""


def lower_step(spec):
    """Trace ``kernels.step.flat_step`` for ``spec`` and return its StableHLO module text.

    Donated arguments carry ``tf.aliasing_output``, which IREE turns into
    ``iree.abi.output``: the compiled step writes results into those buffers.

    A spec whose variables are 1-D of unknown length (``VarSpec((None,), ...)``, see
    ``kernels.step.dynamic_spec``) is exported with one symbolic length per variable
    (``jax.export``): one compiled step then updates variables of any lengths.
    """
    import jax
    import jax.numpy as jnp

    from ..kernels.step import flat_step

    fn = jax.jit(flat_step(jnp, spec), donate_argnums=tuple(spec.donated), keep_unused=True)
    if spec.dynamic:
        from jax import export

        lengths = export.symbolic_shape(",".join(f"n{i}" for i in range(len(spec.variables))))
        structs = [jax.ShapeDtypeStruct((lengths[i],) if shape == (None,) else shape, jnp.dtype(dtype))
                   for _, i, shape, dtype in spec.arguments()]
        text = export.export(fn)(*structs).mlir_module()
    else:
        structs = [jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)) for _, _, shape, dtype in spec.arguments()]
        text = fn.lower(*structs).as_text()
    return text.replace("module @jit_fn", "module @ireeopt_step", 1)
