"""`python -m backend` / `tfgate-backend`: a drop-in for `tensorflow_model_server`."""

from __future__ import annotations

import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    from backend.flags import FlagError, parse_flags, usage

    if any(arg in ("-h", "--help", "-help") for arg in args):
        print(usage())
        return 0
    try:
        flags = parse_flags(args)
    except FlagError as error:
        print(f"tfgate-backend: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter, before its import
    import uvloop

    from backend.server import StartupError, serve

    try:
        uvloop.run(serve(flags))
    except StartupError as error:
        logging.getLogger("backend").error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
