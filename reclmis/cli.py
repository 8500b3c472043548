"""Command line: ``reclmis {train,evaluate,predict,make-synthetic,profile}`` (also ``python -m reclmis``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from reclmis.config import PRESETS


def _profile(args: argparse.Namespace) -> int:
    from reclmis.profiling import profile_preset

    result = profile_preset(args.preset, args.image_size, args.tokens)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reclmis", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    profile = commands.add_parser("profile", help="parameters and FLOPs (the paper's Table II columns)")
    profile.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    profile.add_argument("--image-size", type=int, default=224)
    profile.add_argument("--tokens", type=int, default=18, help="note length in tokens")
    profile.add_argument("--json", action="store_true", help="print JSON instead of a table")
    profile.set_defaults(handler=_profile)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"reclmis {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
