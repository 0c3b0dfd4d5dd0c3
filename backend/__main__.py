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
    from backend.siblings import WorkerRole

    role = WorkerRole.from_env(os.environ)
    who = "" if role is None else f" [worker {role.index}]"  # the workers of `--workers` share one stderr
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s %(name)s{who}: %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter, before its import
    import uvloop

    if flags.workers > 1 and role is None:
        from backend.workers import run_workers

        return uvloop.run(run_workers(args, flags))
    from backend.server import StartupError, serve

    try:
        uvloop.run(serve(flags))
    except StartupError as error:
        logging.getLogger("backend").error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
