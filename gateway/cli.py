"""The `tfgate` command.

`tfgate up` is the main job (gateway/up.py): the TLS gateway and its fleet of backends serving the demo models.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from backend.demo_models import ensure_demo_models
from gateway.__main__ import add_arguments as add_gateway_arguments
from gateway.__main__ import run as run_gateway
from gateway.certs import write_dev_certs
from gateway.keys import new_key
from gateway.status import add_arguments as add_status_arguments
from gateway.status import run as run_status
from gateway.up import add_arguments as add_up_arguments
from gateway.up import run as run_up


def _certs(args: argparse.Namespace) -> int:
    paths = write_dev_certs(args.dir, hosts=args.hosts, overwrite=args.force)
    for field in dataclasses.fields(paths):
        print(f"{field.name}: {getattr(paths, field.name)}")
    return 0


def _new_key(args: argparse.Namespace) -> int:
    try:
        key, line = new_key(args.name)
    except ValueError as error:
        print(f"tfgate keys new: {error}", file=sys.stderr)
        return 2
    print(f"key: {key}\n"
          "  (shown once: only its digest is stored; give it to the client, who sends Authorization: Bearer <key>)\n"
          f"add under auth.api_keys (or auth.admin_keys, without models) in the gateway's config:\n  {line}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tfgate", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="the TLS gateway with a fleet of backends serving the demo models "
                             "(Ctrl-C stops)")
    add_up_arguments(up)
    up.set_defaults(run=run_up)
    certs = commands.add_parser("certs", help="write a development CA and server/client certificates")
    certs.add_argument("--dir", type=Path, default=Path("certs"), help="where to write them (default: certs/)")
    certs.add_argument("--hosts", nargs="+", default=["localhost", "127.0.0.1", "::1"],
                       help="names and addresses the server certificate is valid for")
    certs.add_argument("--force", action="store_true", help="replace existing certificates")
    certs.set_defaults(run=_certs)
    gateway = commands.add_parser("gateway", help="run the TLS gateway in front of backends (see configs/gateway.yaml)")
    add_gateway_arguments(gateway)
    gateway.set_defaults(run=run_gateway)
    keys = commands.add_parser("keys", help="API keys for the gateway's config")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    new = key_commands.add_parser("new", help="print a fresh random key once, and the config line with its digest")
    new.add_argument("name", help="the key's name (who holds it): letters, digits, '.', '_' or '-'")
    new.set_defaults(run=_new_key)
    status = commands.add_parser("status", help="a table of the pools, backends and fleet workers (admin API)")
    add_status_arguments(status)
    status.set_defaults(run=run_status)
    models = commands.add_parser("demo-models", help="build the demo SavedModels (cached) and print where")
    models.set_defaults(run=lambda _args: print(ensure_demo_models()) or 0)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
