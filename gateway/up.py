"""`tfgate up`: the whole thing from one command: dev certificates, an API key, the demo models, a fleet of
backends and the TLS gateway in front of them.

How it works: without `--config`, the gateway runs on an embedded default config written to `.tfgate/gateway.yaml`
under `--home` (the working directory by default), so it can be read, copied and edited: loopback TLS on 8443, the
admin API on 9901, a fleet serving the demo models (one worker per GPU, else CPU workers), and API-key auth. What
must survive a restart lives next to it: the digest of the API key (the key itself is printed once, when made) and
the admin key that `tfgate status` reads (a client credential, mode 0600). With `--config`, that config runs as it
is; only its certificates are made when both files are missing.

Once the gateway listens it prints `endpoint: …`, `api key: …` (when a new key was made), a curl line and a Python
example, and writes `.tfgate/up.json` (endpoint, admin URL, pid) for `tfgate status`; it removes that file on exit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path

import uvloop

from backend.demo_models import ensure_demo_models
from gateway.certs import write_dev_certs
from gateway.config import ConfigError, load_config
from gateway.config_fleet import DEFAULT_BASE_PORT
from gateway.keys import digest, new_key

STATE_DIR = ".tfgate"
DEMO_MODELS = ("half_plus_two", "half_plus_two_tf1", "mlp", "strings")
_DEFAULT_CONFIG = """\
# Written by `tfgate up` on every start (edit a copy and pass it with --config). Every key: configs/gateway.yaml.
listen: {{https: "{bind}:{port}", grpc: "{bind}:{grpc_port}", admin: "127.0.0.1:{admin_port}"}}
tls: {{cert: "{certs}/server.pem", key: "{certs}/server-key.pem"}}
auth:
  api_keys: [{{name: up, sha256: "{api_key}"}}]
  admin_keys: [{{name: up-admin, sha256: "{admin_key}"}}]
pools:
  demo: {{}}
routes:
  - {{model: "*", pool: demo}}
fleet:
  pool: demo
  model_config_file: "{models_config}"
  base_port: {base_port}
  log_dir: "{logs}"
"""


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="run this gateway config instead of the embedded default")
    parser.add_argument("--home", type=Path, default=Path("."),
                        help="where certs/, logs/ and .tfgate/ go (default: the working directory)")
    parser.add_argument("--bind", default="127.0.0.1", help="address of the TLS endpoint (default: loopback only)")
    parser.add_argument("--port", type=int, default=8443, help="port of the TLS endpoint (0: any free port)")
    parser.add_argument("--grpc-port", type=int, default=8500, help="port of the gRPC endpoint, TLS too (0: any)")
    parser.add_argument("--admin-port", type=int, default=9901, help="loopback port of the admin API (0: any)")
    parser.add_argument("--base-port", type=int, default=DEFAULT_BASE_PORT,
                        help="the fleet's backends listen on loopback ports from here")
    parser.add_argument("--grace-s", type=float, default=10.0, help="on Ctrl-C/SIGTERM, time to drain requests")


def run(args: argparse.Namespace) -> int:
    from gateway.__main__ import Running, configure_logging, serve

    configure_logging()
    home: Path = args.home.resolve()
    state = home / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    new_api_key: str | None = None
    if args.config is None:
        config_path, new_api_key = _write_default_config(args, home)
    else:
        config_path = args.config
        try:
            tls = load_config(config_path).tls
        except ConfigError as error:
            print(f"tfgate up: {error}", file=sys.stderr)
            return 2
        if not tls.cert.exists() and not tls.key.exists():
            write_dev_certs(tls.cert.parent)

    def on_ready(gateway: Running) -> None:
        endpoint = f"https://localhost:{gateway.https_port}"
        admin = f"http://127.0.0.1:{gateway.admin_port}"
        (state / "up.json").write_text(json.dumps({"endpoint": endpoint, "admin": admin, "pid": os.getpid()}))
        ca = gateway.config.tls.cert.parent / "ca.pem"
        print(_banner(endpoint, gateway.grpc_port, ca, new_api_key), flush=True)

    try:
        return uvloop.run(serve(config_path, args.grace_s, on_ready))
    finally:
        (state / "up.json").unlink(missing_ok=True)


def _write_default_config(args: argparse.Namespace, home: Path) -> tuple[Path, str | None]:
    """The embedded default, with certificates, keys and the demo models made when absent."""
    state = home / STATE_DIR
    certs = home / "certs"
    write_dev_certs(certs)
    print("tfgate up: building the demo models if absent (once; about a minute) ...", file=sys.stderr, flush=True)
    models_dir = ensure_demo_models()
    models_config = state / "models.config"
    models_config.write_text(demo_model_config(models_dir))
    key_file = state / "api-key.sha256"
    new_api_key = None
    if not key_file.exists():
        new_api_key, _line = new_key("up")
        key_file.write_text(digest(new_api_key) + "\n")
    admin_file = state / "admin-key"
    if not admin_file.exists():
        admin_key, _line = new_key("up-admin")
        admin_file.touch(mode=0o600)
        admin_file.write_text(admin_key + "\n")
    config_path = state / "gateway.yaml"
    config_path.write_text(_DEFAULT_CONFIG.format(
        bind=args.bind, port=args.port, grpc_port=args.grpc_port, admin_port=args.admin_port, certs=certs,
        base_port=args.base_port,
        api_key=key_file.read_text().strip(), admin_key=digest(admin_file.read_text().strip()),
        models_config=models_config, logs=home / "logs"))
    return config_path, new_api_key


def _banner(endpoint: str, grpc_port: int, ca: Path, new_api_key: str | None) -> str:
    key_line = (f"api key: {new_api_key}   (shown once; only its digest is kept)" if new_api_key is not None else
                f"api key: the one printed when it was made (delete {STATE_DIR}/api-key.sha256 for a new one)")
    key = new_api_key or "$TFGATE_API_KEY"
    url = f"{endpoint}/v1/models/half_plus_two:predict"
    body = '{"instances": [1.0, 2.0, 5.0]}'
    curl = f"curl -s --cacert {ca} -H 'Authorization: Bearer {key}' {url} -d '{body}'"
    if new_api_key is None:
        curl = curl.replace("'Authorization: Bearer $TFGATE_API_KEY'", '"Authorization: Bearer $TFGATE_API_KEY"')
    python = textwrap.indent(textwrap.dedent(f"""\
        import json, ssl, urllib.request
        request = urllib.request.Request("{url}", data=json.dumps({{"instances": [1.0, 2.0, 5.0]}}).encode(),
                                         headers={{"Authorization": "Bearer {key}"}})
        print(json.load(urllib.request.urlopen(request, context=ssl.create_default_context(cafile="{ca}"))))"""),
        "  ")
    grpc_line = (f"grpc: localhost:{grpc_port}   (TF Serving's gRPC API, same TLS and key: metadata authorization: "
                 "Bearer <key>)\n") if grpc_port else ""
    return (f"endpoint: {endpoint}\n{key_line}\ntry it:\n{curl}\nor from Python:\n{python}\n{grpc_line}"
            "status: tfgate status    stop: Ctrl-C")
