"""``python -m openmm_flowmatch.native status|build [--force]``: the native plugin by hand.

``status`` prints the library that would be loaded, or why native is unavailable (exit 1);
``build`` compiles it into the per-user cache (``--force``: again, also after a failed build).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from openmm_flowmatch.native.build import NativeBuildError, build_library, locate_library, unavailable_reason


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m openmm_flowmatch.native", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["status", "build"])
    parser.add_argument("--force", action="store_true", help="build: compile again even if a build exists or failed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "build":
        try:
            print(build_library(force=args.force, verbose=True))
        except NativeBuildError as error:
            print(f"native build failed: {error}", file=sys.stderr)
            return 1
        return 0
    library, why = locate_library(build=False)
    if library is not None:
        print(f"native CGNet kernel: {library}")
        return 0
    reason = unavailable_reason()
    if reason is None:
        print(f"native CGNet kernel: not built yet, compiled on first use ({why})")
        return 0
    print(f"native CGNet kernel unavailable: {reason}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
