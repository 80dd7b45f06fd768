"""Merge several traced steps into one StableHLO module with named functions.

Each input is JAX's lowered module (public ``main`` plus private helpers).  ``main``
becomes the given name and every private helper ``<name>__<helper>``, so the texts
can share one module; per-function ``tf.aliasing_output`` attributes survive.
"""


def merge_modules(named_texts, module_name="ireeopt"):
    """``{function name: StableHLO text}`` -> the text of one module holding them all."""
    from iree.compiler import ir

    context = ir.Context()
    with context, ir.Location.unknown(context):
        merged = ir.Module.create()
        merged.operation.attributes["sym_name"] = ir.StringAttr.get(module_name)
        for name, text in named_texts.items():
            module = ir.Module.parse(text, context)
            for op in list(module.body.operations):
                old = ir.StringAttr(op.attributes["sym_name"]).value
                new = name if old == "main" else f"{name}__{old}"
                ir.SymbolTable.replace_all_symbol_uses(old, new, module.operation)
                ir.SymbolTable.set_symbol_name(op, new)
            for op in list(module.body.operations):
                merged.body.append(op)
        return str(merged)
