"""Checkpoints: model variables + optimizer state + config in one file.

Format: a numpy ``.npz`` (a zip archive) holding ``meta`` (JSON: format, optimizer
class and config, iterations, names, shapes and dtypes) and one array per model
variable and per optimizer variable (spec §8 order).  Why npz: the zip container
has a CRC-32 per array, so a truncated or corrupted file is detected when read;
numpy alone reads it on any machine and device; and nothing is memory-mapped (an
mmap'ed ``.irpa`` that was truncated can kill the reader with SIGBUS).  bfloat16
arrays are stored as their uint16 bits.

Writes are atomic: a temporary file in the same directory, fsync, then rename.
Restoring validates everything before it assigns anything.
"""
import io
import json
import os
import pathlib
import tempfile
import zipfile

import numpy as np

from .device import numpy_dtype

FORMAT = "ireeopt.checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be restored here (says why)."""


def _stored(value, dtype):
    return value.view(np.uint16) if dtype == "bfloat16" else value


def _config(optimizer):
    try:
        config = optimizer.get_config()
        json.dumps(config)
        return config
    except (TypeError, ValueError):
        return None          # e.g. a callable learning rate


def save_checkpoint(path, optimizer, variables):
    """Write ``variables`` and ``optimizer``'s state to ``path`` (atomically)."""
    variables = list(variables)
    if not optimizer.built:
        optimizer.build(variables)
    opt_vars = optimizer.variables
    meta = {"format": FORMAT, "optimizer": type(optimizer).__name__, "config": _config(optimizer),
            "iterations": int(optimizer.iterations),
            "variables": [{"name": v.name, "shape": list(v.shape), "dtype": v.dtype} for v in variables],
            "optimizer_variables": [{"name": v.name, "shape": list(v.shape), "dtype": v.dtype} for v in opt_vars]}
    arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)}
    for i, v in enumerate(variables):
        arrays[f"variable_{i}"] = _stored(v.numpy(), v.dtype)
    for i, v in enumerate(opt_vars):
        arrays[f"optimizer_{i}"] = _stored(np.asarray(v.numpy()), v.dtype)
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def _read(path):
    try:
        data = pathlib.Path(path).read_bytes()
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
        meta = json.loads(arrays.pop("meta").tobytes().decode())
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not a readable ireeopt checkpoint (truncated or corrupted?): {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    return meta, arrays


def _loaded(arrays, key, entry, path):
    if key not in arrays:
        raise CheckpointError(f"{path}: missing array {key!r}")
    value = arrays[key]
    if entry["dtype"] == "bfloat16":
        value = value.view(numpy_dtype("bfloat16"))
    if list(value.shape) != list(entry["shape"]):
        raise CheckpointError(f"{path}: array {key!r} has shape {value.shape}, its metadata says {entry['shape']}")
    return value


def load_checkpoint(path, optimizer, variables):
    """Restore ``variables`` (matched by name) and ``optimizer``'s state from ``path``.
    Anything that does not match raises ``CheckpointError`` and changes nothing."""
    variables = list(variables)
    meta, arrays = _read(path)
    if meta["optimizer"] != type(optimizer).__name__:
        raise CheckpointError(f"{path} holds a {meta['optimizer']} state, not a {type(optimizer).__name__} one")
    by_name = {v.name: v for v in variables}
    saved = [e["name"] for e in meta["variables"]]
    if sorted(saved) != sorted(by_name) or len(by_name) != len(variables):
        raise CheckpointError(f"{path} is a checkpoint of the variables {saved}, not of "
                              f"{[v.name for v in variables]}")
    values = []
    for i, entry in enumerate(meta["variables"]):
        var = by_name[entry["name"]]
        if list(var.shape) != entry["shape"] or var.dtype != entry["dtype"]:
            raise CheckpointError(f"{path}: variable {entry['name']!r} was saved with shape {entry['shape']} and "
                                  f"dtype {entry['dtype']}, this one has {list(var.shape)} and {var.dtype}")
        values.append((var, _loaded(arrays, f"variable_{i}", entry, path)))
    store = {str(i): _loaded(arrays, f"optimizer_{i}", entry, path)
             for i, entry in enumerate(meta["optimizer_variables"])}
    if store and int(store["0"]) != meta["iterations"]:
        raise CheckpointError(f"{path}: inconsistent iteration count")
    ordered = [by_name[name] for name in saved]
    if optimizer.built:
        expected = [(v.name, list(v.shape)) for v in optimizer.variables]
        got = [(e["name"], e["shape"]) for e in meta["optimizer_variables"]]
        if expected != got:
            raise CheckpointError(f"{path}: the optimizer state does not match this optimizer's variables "
                                  f"(saved {len(got)}: {got[:4]}..., this optimizer has {len(expected)})")
    else:
        optimizer.build(ordered)
        try:
            if [v.name for v in optimizer.variables] != [e["name"] for e in meta["optimizer_variables"]]:
                raise CheckpointError(f"{path}: the optimizer state was saved with other options "
                                      f"({len(meta['optimizer_variables'])} variables; this optimizer has "
                                      f"{len(optimizer.variables)})")
        except CheckpointError:
            optimizer.built = False
            raise
    optimizer.load_own_variables(store)
    for var, value in values:
        var.assign(value)
    return optimizer
