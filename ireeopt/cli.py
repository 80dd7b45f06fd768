"""The ``ireeopt`` command line."""
import argparse
import sys


def main(argv=None):
    import ireeopt

    parser = argparse.ArgumentParser(prog="ireeopt", description=ireeopt.__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"ireeopt {ireeopt.__version__}")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("versions", help="print the versions of ireeopt and the IREE packages in use")
    args = parser.parse_args(argv)
    if args.command == "versions":
        import importlib.metadata as md
        for dist in ("ireeopt", "iree-base-runtime", "iree-base-compiler", "jax", "numpy"):
            try:
                print(f"{dist} {md.version(dist)}")
            except md.PackageNotFoundError:
                print(f"{dist} (not installed)")
        return 0
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
