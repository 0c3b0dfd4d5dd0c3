"""The `tfgate` command.

`tfgate up` is the main job. Today it serves the bundled demo models from one backend on loopback; the gateway
and its fleet take over this command as they land, so the quick start never changes.
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

DEMO_MODELS = ("half_plus_two", "half_plus_two_tf1", "mlp", "strings")


def demo_model_config(models_dir: Path) -> str:
    """A text ModelServerConfig serving every demo model; half_plus_two keeps both versions with labels."""
    entries = []
    for name in DEMO_MODELS:
        extra = ""
        if name == "half_plus_two":
            extra = (" model_version_policy { all {} } version_labels { key: 'stable' value: 1 }"
                     " version_labels { key: 'canary' value: 2 }")
        entries.append(f"  config {{ name: '{name}' base_path: '{models_dir / name}' model_platform: 'tensorflow'"
                       f"{extra} }}")
    return "model_config_list {\n" + "\n".join(entries) + "\n}\n"


def _up(args: argparse.Namespace) -> int:
    from backend.__main__ import main as backend_main

    models_dir = ensure_demo_models()
    config_path = models_dir.parent / f"{models_dir.name}.models.config"
    config_path.write_text(demo_model_config(models_dir))
    monitoring_path = models_dir.parent / "monitoring.config"
    monitoring_path.write_text("prometheus_config { enable: true }\n")
    rest = f"http://{args.bind}:{args.rest_port}"
    print(f"tfgate: serving the demo models from {models_dir}\n"
          f"tfgate: REST {rest}, gRPC {args.bind}:{args.grpc_port}; once ready, try:\n"
          f"  curl -s {rest}/v1/models/half_plus_two:predict -d '{{\"instances\": [1.0, 2.0, 5.0]}}'\n"
          f"  curl -s {rest}/v1/models/half_plus_two\n"
          f"  curl -s {rest}/v2/health/ready\n"
          f"  curl -s {rest}/monitoring/prometheus/metrics", file=sys.stderr)
    return backend_main([f"--port={args.grpc_port}", f"--rest_api_port={args.rest_port}",
                         f"--bind_address={args.bind}", f"--model_config_file={config_path}",
                         f"--monitoring_config_file={monitoring_path}", "--enable_grpc_healthcheck_service"])


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
    up = commands.add_parser("up", help="serve the bundled demo models (Ctrl-C stops)")
    up.add_argument("--rest-port", type=int, default=8501)
    up.add_argument("--grpc-port", type=int, default=8500)
    up.add_argument("--bind", default="127.0.0.1", help="listen address (default: loopback only)")
    up.set_defaults(run=_up)
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
    models = commands.add_parser("demo-models", help="build the demo SavedModels (cached) and print where")
    models.set_defaults(run=lambda _args: print(ensure_demo_models()) or 0)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
