"""``ireeopt.load``: an optimizer bound to an artifact directory, with no JAX and no
IREE compiler (numpy and iree.runtime only)."""
import hashlib
import importlib.metadata
import json
import pathlib

from ..compiler.artifact import MANIFEST, SCHEMA     # the format's constants (no JAX, no compiler)
from ..compiler.targets import DRIVERS
from ..kernels.step import StepSpec
from ..kernels.train import TrainSpec
from .device import Device
from .module import LoadedModule


class ArtifactError(RuntimeError):
    """An artifact that cannot be used here (says why and what to do)."""


def read_manifest(path):
    path = pathlib.Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path} is not an ireeopt artifact: it has no {MANIFEST}") from None
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}/{MANIFEST} cannot be read ({e}); compile the artifact again") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        schema = manifest.get("schema") if isinstance(manifest, dict) else None
        raise ArtifactError(f"{path}: unknown manifest schema {schema!r} (this ireeopt reads {SCHEMA!r}); "
                            "compile the artifact again with this version of ireeopt")
    return manifest


def choose_target(manifest, device, path):
    """The manifest's target that runs on ``device`` (the host CPU build first)."""
    for target in manifest["targets"]:
        if device.driver in DRIVERS.get(target, ()):
            if target == "llvm-cpu:aarch64" and not _is_arm():
                continue
            return target
    raise ArtifactError(f"{path} has no module for device {device.driver!r}: it was compiled for "
                        f"{sorted(manifest['targets'])}; add a target with `ireeopt recompile {path} --target ...`")


def _is_arm():
    import platform
    return platform.machine().lower() in ("aarch64", "arm64")


class LoadedArtifact:
    """The artifact's module on one device, and its step functions by structure."""

    def __init__(self, path, device_name):
        self.path = pathlib.Path(path)
        self.manifest = manifest = read_manifest(path)
        self.device = Device.get(device_name)
        self.target = choose_target(manifest, self.device, self.path)
        installed = importlib.metadata.version("iree-base-runtime")
        if manifest.get("iree_version") != installed:
            raise ArtifactError(f"{self.path} was compiled by IREE {manifest.get('iree_version')} but this runtime "
                                f"is IREE {installed}; modules do not move between IREE versions: run "
                                f"`ireeopt recompile {self.path}` with iree-base-compiler=={installed}")
        entry = manifest["targets"][self.target]
        try:
            vmfb = (self.path / entry["module"]).read_bytes()
        except OSError as e:
            raise ArtifactError(f"{self.path}: the {self.target} module is missing ({e}); run "
                                f"`ireeopt recompile {self.path}`") from None
        if hashlib.sha256(vmfb).hexdigest() != entry["sha256"]:
            raise ArtifactError(f"{self.path}/{entry['module']} is corrupted (its sha256 does not match the "
                                f"manifest); run `ireeopt recompile {self.path}`")
        try:
            self.module = LoadedModule(self.device, vmfb)
        except Exception as e:
            raise ArtifactError(f"{self.path}/{entry['module']} cannot be loaded by this IREE runtime ({e}); run "
                                f"`ireeopt recompile {self.path}`") from None
        self.functions = {StepSpec.from_json(f["spec"]): f["name"] for f in manifest["functions"]}
        self.variables = manifest["variables"]
        self.buckets = manifest.get("sparse_buckets", [])
        self._steps = {}
        train = manifest.get("train")
        self.train = None if train is None else (train["name"], TrainSpec.from_json(train["spec"]))

    def step(self, spec):
        if spec not in self.functions:
            raise ValueError(self.describe_missing(spec))
        if spec not in self._steps:
            self._steps[spec] = self.module.step(self.functions[spec], spec)
        return self._steps[spec]

    def train_step(self):
        name, tspec = self._train()
        if name not in self._steps:
            self._steps[name] = self.module.step(name, tspec)
        return self._steps[name]

    def train_spec(self, leaves, tree):
        """The compiled ``TrainSpec``, after checking the batch matches what it was compiled for."""
        _, tspec = self._train()
        kind, layout = next(iter(tree.items()))
        got = (tuple((tuple(a.shape), a.dtype.name) for a in leaves),
               (kind, tuple(layout) if isinstance(layout, list) else layout))
        if got != (tspec.batch, tspec.tree):
            raise ValueError(f"the artifact's train step was compiled for a batch {tspec.tree_dict} of arrays "
                             f"{[(s, d) for s, d in tspec.batch]}, got {tree} of "
                             f"{[(tuple(a.shape), a.dtype.name) for a in leaves]}")
        return tspec

    def _train(self):
        if self.train is None:
            raise ValueError(f"the artifact {self.path} has no train step: compile it with "
                             "ireeopt.compile(..., loss=..., batch=...)")
        return self.train

    def describe_missing(self, spec):
        names = [v["name"] for v in self.variables]
        got = [v.sparse for v in spec.variables]
        return (f"the artifact {self.path} has no step for this call (gradients: "
                f"{'dense' if not any(got) else got}, clip={spec.clip!r}); it holds "
                f"{sorted(self.functions.values())} for the variables {names}: every variable must get a "
                "gradient, the sparse ones IndexedSlices (or all dense), with the compiled clip setting")

    def bucket(self, k):
        for b in self.buckets:
            if k <= b:
                return b
        raise ValueError(f"a sparse gradient of {k} rows exceeds the artifact's largest bucket "
                         f"({self.buckets[-1] if self.buckets else 'none: no variable was compiled sparse'}); "
                         "recompile with larger --sparse-buckets")


def load(path, device="cpu"):
    """The optimizer saved in the artifact at ``path``, on ``device``, bound to the
    compiled variable specs: pass ``ireeopt.Variable``s of the same names, shapes and
    dtypes (on that device) to ``apply_gradients``/``build``."""
    from . import optimizers

    artifact = LoadedArtifact(path, device)
    spec = artifact.manifest["optimizer"]
    cls = {"Adam": optimizers.Adam, "AdamW": optimizers.AdamW, "Adamax": optimizers.Adamax}.get(spec["class"])
    if cls is None:
        raise ArtifactError(f"{path}: unknown optimizer class {spec['class']!r}")
    optimizer = cls.from_config(spec["config"])
    optimizer._bind_artifact(artifact)
    return optimizer
