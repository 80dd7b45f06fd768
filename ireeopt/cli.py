"""The ``ireeopt`` command line: compile, info, recompile, versions."""
import argparse
import json
import pathlib
import sys


def _versions():
    import importlib.metadata as md
    for dist in ("ireeopt", "iree-base-runtime", "iree-base-compiler", "jax", "numpy"):
        try:
            print(f"{dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            print(f"{dist} (not installed)")
    return 0


def _read_json(path, what):
    try:
        return json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"ireeopt: cannot read {what} {path}: {e}")


def _compile(args):
    import ireeopt
    from ireeopt.compiler.artifact import DEFAULT_SPARSE_BUCKETS

    classes = {"Adam": ireeopt.Adam, "AdamW": ireeopt.AdamW, "Adamax": ireeopt.Adamax}
    if args.optimizer not in classes:
        raise SystemExit(f"ireeopt: unknown optimizer {args.optimizer!r}; choose from {sorted(classes)}")
    config = _read_json(args.config, "config") if args.config else {}
    variables = _read_json(args.variables, "variables")
    if not isinstance(variables, dict) or not variables:
        raise SystemExit("ireeopt: the variables file must map each variable name to "
                         "{\"shape\": [...], \"dtype\": \"float32\", \"sparse\": false}")
    optimizer = classes[args.optimizer].from_config(config)
    if args.exclude_from_weight_decay:
        optimizer.exclude_from_weight_decay(var_names=args.exclude_from_weight_decay)
    buckets = [int(b) for b in args.sparse_buckets.split(",")] if args.sparse_buckets else DEFAULT_SPARSE_BUCKETS
    artifact = ireeopt.compile(optimizer, variables, targets=args.target or ["llvm-cpu"], sparse_buckets=buckets)
    path = artifact.save(args.output)
    print(f"wrote {path}: {', '.join(artifact.manifest['targets'])} "
          f"({len(artifact.manifest['functions'])} functions)")
    return 0


def _info(args):
    from ireeopt.runtime.artifact import read_manifest

    m = read_manifest(args.artifact)
    print(f"{args.artifact}: {m['optimizer']['class']} (schema {m['schema']}, ireeopt {m['ireeopt_version']}, "
          f"IREE {m['iree_version']}, created {m['created']})")
    config = {k: v for k, v in m["optimizer"]["config"].items() if v not in (None, False)}
    print(f"  config: {json.dumps(config)}")
    print("  variables:")
    for v in m["variables"]:
        flags = [f for f, on in (("sparse", v["sparse"]), ("weight decay", v["weight_decay"])) if on]
        print(f"    {v['name']}: {v['dtype']}{v['shape']} {' '.join(flags)}")
    print(f"  slots: {', '.join(m['slots'])}{' + EMA averages' if m['ema'] else ''}")
    print(f"  functions: {', '.join(f['name'] for f in m['functions'])} (hyper scalars: {', '.join(m['scalars'])})")
    if m.get("train"):
        batch = [f"{a['dtype']}{a['shape']}" for a in m["train"]["arguments"] if a["kind"] == "batch"]
        print(f"  train step: {m['train']['name']} (forward + backward + update in one call; batch {', '.join(batch)})")
    print("  targets:")
    for name, t in m["targets"].items():
        print(f"    {name}: {t['module']} {t['bytes']} bytes sha256 {t['sha256'][:16]}... flags {' '.join(t['flags'])}")
    return 0


def _recompile(args):
    import hashlib
    import importlib.metadata

    from ireeopt.compiler.artifact import Artifact, compile_modules, target_entry
    from ireeopt.runtime.artifact import read_manifest

    path = pathlib.Path(args.artifact)
    manifest = read_manifest(path)
    source = (path / manifest["source"]).read_text()
    targets = list(dict.fromkeys(list(manifest["targets"]) + (args.target or [])))
    compiled = compile_modules(source, targets)
    manifest["targets"] = {t: target_entry(t, vmfb, flags) for t, (vmfb, flags) in compiled.items()}
    manifest["iree_version"] = importlib.metadata.version("iree-base-compiler")
    Artifact(manifest, source, {t: vmfb for t, (vmfb, _) in compiled.items()}).save(path)
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    print(f"recompiled {path} ({digest}) for {', '.join(targets)} with IREE {manifest['iree_version']}")
    return 0


def main(argv=None):
    import ireeopt

    parser = argparse.ArgumentParser(prog="ireeopt", description=ireeopt.__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"ireeopt {ireeopt.__version__}")
    sub = parser.add_subparsers(dest="command")
    c = sub.add_parser("compile", help="compile an optimizer ahead of time into an artifact directory")
    c.add_argument("--optimizer", required=True, help="Adam, AdamW or Adamax")
    c.add_argument("--config", help="JSON file: what get_config() returns (default: the class defaults)")
    c.add_argument("--variables", required=True,
                   help='JSON file: {name: {"shape": [...], "dtype": "float32", "sparse": false}}')
    c.add_argument("--target", action="append",
                   help="llvm-cpu (default), llvm-cpu:generic, llvm-cpu:aarch64, vulkan-spirv, cuda; repeatable")
    c.add_argument("--exclude-from-weight-decay", action="append", metavar="REGEX",
                   help="variable-name pattern excluded from weight decay; repeatable")
    c.add_argument("--sparse-buckets", help="padded row counts compiled for sparse variables, e.g. 64,512,4096")
    c.add_argument("--output", required=True, help="the artifact directory to write")
    i = sub.add_parser("info", help="describe an artifact directory")
    i.add_argument("artifact")
    r = sub.add_parser("recompile", help="recompile an artifact's StableHLO with the installed IREE")
    r.add_argument("artifact")
    r.add_argument("--target", action="append", help="also compile for this target; repeatable")
    sub.add_parser("versions", help="print the versions of ireeopt and the IREE packages in use")
    sub.add_parser("bench", help="time an Adam step across devices and peers (see `ireeopt bench --help`)",
                   add_help=False)
    sub.add_parser("demo", help="fine-tune two small models on the digits data, one compiled call per step "
                   "(see `ireeopt demo --help`)", add_help=False)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"]:
        from ireeopt.demo import main as demo
        return demo(argv[1:])
    if argv[:1] == ["bench"]:
        from ireeopt.bench.compare import main as bench
        return bench(argv[1:])
    args = parser.parse_args(argv)
    commands = {"compile": _compile, "info": _info, "recompile": _recompile, "versions": lambda a: _versions()}
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return commands[args.command](args)
    except (ValueError, TypeError, ireeopt.ArtifactError) as e:
        print(f"ireeopt {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
