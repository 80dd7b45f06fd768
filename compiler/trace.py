"""StepSpec -> StableHLO text, with every state argument donated."""
import hashlib
import pathlib
import re


def lowering_hash():
    """sha256 of this file: how a step is lowered (its function's arguments among it), which a
    compiled or shipped step depends on as much as on the kernels."""
    return hashlib.sha256(pathlib.Path(__file__).read_bytes()).hexdigest()


def lower_step(spec):
    """Trace ``kernels.step.flat_step`` for ``spec`` and return its StableHLO module text.

    Donated arguments carry ``tf.aliasing_output``, which IREE turns into
    ``iree.abi.output``: the compiled step writes results into those buffers.

    A spec whose variables are 1-D of unknown length (``VarSpec((None,), ...)``, see
    ``kernels.step.dynamic_spec``) is lowered with one symbolic length per variable: one
    compiled step then updates variables of any lengths.  Its function takes those lengths
    first, as int32 scalars (``n00``, ``n01``, ...: jax's dimension variables), then the
    arguments of ``spec.arguments()`` (``runtime.module.StepModule`` passes them).  (Not
    ``jax.export``, which computes the lengths from the arrays itself but spends ~0.2 s of
    a first call building the error messages of its shape checks, and puts the caller's
    source lines into the text.)
    """
    import jax
    import jax.numpy as jnp

    from ..kernels.step import flat_step

    fn = jax.jit(flat_step(jnp, spec), donate_argnums=tuple(spec.donated), keep_unused=True)
    names = [f"n{i:02d}" for i in range(len(spec.variables))] if spec.dynamic else []
    if names:
        from jax import export

        lengths = export.symbolic_shape(",".join(names))
        structs = [jax.ShapeDtypeStruct((lengths[i],) if shape == (None,) else shape, jnp.dtype(dtype))
                   for _, i, shape, dtype in spec.arguments()]
    else:
        structs = [jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)) for _, _, shape, dtype in spec.arguments()]
    text = fn.lower(*structs).as_text()
    signature = text[text.index("func.func public @main("):].split("\n", 1)[0]
    found = re.findall(r'%arg\d+: tensor<i32> \{jax.global_constant = "(\w+)"\}', signature)
    if found != names:
        raise RuntimeError(f"the lowered step takes the lengths {found}, expected {names}")
    return text.replace("module @jit_fn", "module @ireeopt_step", 1)
