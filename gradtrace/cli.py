"""The ``gradtrace`` command: ``gradtrace demo``."""

from __future__ import annotations

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="gradtrace", description="Keras training-loop debugger.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="train a two-embedding inner model with a real fault and watch gradtrace catch it")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from gradtrace import demo

        return demo.main()
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
