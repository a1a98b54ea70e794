"""Command line of the bundle's tooling: ``python -m bundle <verb> [options]``."""

from __future__ import annotations

import argparse
import logging
import sys


def _demo_data(args: argparse.Namespace) -> int:
    from bundle.demo_data import write_demo_data

    path = write_demo_data(args.out, num_samples=args.num_samples, seed=args.seed, size=args.size)
    print(f"demo data written: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bundle", description=__doc__)
    sub = parser.add_subparsers(dest="verb", required=True)
    demo = sub.add_parser("demo-data", help="write the embedded synthetic demo data set and its datalist")
    demo.add_argument("--out", required=True, help="destination folder")
    demo.add_argument("--num-samples", type=int, default=400)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--size", type=int, default=224, help="image side in pixels")
    demo.set_defaults(func=_demo_data)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
