"""Compiled step modules loaded on a device, invoked through the VM directly.

The argument list is built once per set of buffers and reused: because every
state argument is donated (``iree.abi.output``), the results are written into
the very buffers passed in, so the next step passes the same list again.  The
high-level ``FunctionInvoker`` is bypassed (it costs ~1 ms per call for
hundreds of arguments).
"""
import iree.runtime as rt


class LoadedModule:
    """One .vmfb loaded into a VM context on a device."""

    def __init__(self, device, vmfb):
        self.device = device
        self.vm_module = rt.VmModule.copy_buffer(device.vm_instance, vmfb)
        self.context = rt.VmContext(device.vm_instance, modules=[device.hal_module, self.vm_module])

    def step(self, name, spec, n_results=None):
        return StepModule(self, name, spec, n_results)


class StepModule:
    """One exported function (``name``) of a loaded module, for structure ``spec`` (a
    ``StepSpec`` or ``TrainSpec``: its results are its ``donated`` arguments), or with
    ``n_results`` fresh results (the gradient function)."""

    def __init__(self, loaded, name, spec, n_results=None):
        self.loaded, self.spec = loaded, spec
        self.function = loaded.vm_module.lookup_function(name)
        if self.function is None:
            raise RuntimeError(f"the compiled module has no function {name!r}; recompile it")
        self.context = loaded.context
        self.n_results = len(spec.donated) if n_results is None else n_results

    def arguments(self, buffers):
        """A reusable VM argument list for ``buffers`` (DeviceBuffers, in ``spec.arguments()`` order)."""
        args = rt.VmVariantList(len(buffers))
        for b in buffers:
            args.push_ref(b.view)
        return args

    def __call__(self, args):
        results = rt.VmVariantList(self.n_results)
        self.context.invoke(self.function, args, results)
        return results

    def result_buffers(self, results):
        return [results.get_as_object(i, rt.HalBufferView).get_buffer() for i in range(self.n_results)]
