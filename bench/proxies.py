"""The proxies the gateway benchmarks put between the load generator and the backends, as subprocesses with the same
guarantee as bench.backend_process (leaving the `with` block ends them, whatever happened): tfgate's own gateway
(`python -m gateway`) and nginx, each configured here for one run, plus how much CPU a server process used.

Both listen on loopback with TLS 1.2+ and the same development certificates, and keep connections to the backends
alive. The gateway writes its JSON access lines to a file (its stdout) and its log to another; nginx runs in the
foreground (`daemon off`) with its prefix, config, pid file, temp paths and error log all in a directory of its own,
so it needs nothing of /etc/nginx and leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import yaml

from bench.backend_process import HOST, REPO, ServerExited, ServerProcess, free_port
from gateway.certs import CertPaths
from gateway.keys import digest
from gateway.tls import TLS12_CIPHERS  # nginx offers what the gateway offers, so both do equal work

NGINX_MISSING = "nginx not installed: apt-get install nginx"
_SBIN = ("/usr/sbin", "/usr/local/sbin", "/usr/local/nginx/sbin")  # not on every user's PATH


ADMIN_KEY = secrets.token_urlsafe(24)  # this bench run's admin key, for the gateways it starts


def find_nginx(given: str | None = None) -> str | None:
    """The nginx binary: `given` if it is one, else nginx on PATH or in the usual sbin directories; None if none."""
    if given is not None:
        return given if os.access(given, os.X_OK) and not os.path.isdir(given) else None
    return shutil.which("nginx") or shutil.which("nginx", path=os.pathsep.join(_SBIN))


def nginx_version(nginx: str) -> str:
    finished = subprocess.run([nginx, "-v"], capture_output=True, text=True, check=False, timeout=10)
    return (finished.stderr or finished.stdout).strip().removeprefix("nginx version: ")


def gateway_config(certs: CertPaths, backends: Sequence[str], balancer: str, https_port: int,
                   admin_port: int, workers: int = 1, grpc_port: int | None = None,
                   grpc_backends: Sequence[str] = ()) -> dict[str, Any]:
    """One pool of `backends` (host:port; with `grpc_backends`, their gRPC addresses in the same order) behind one
    catch-all route; everything else the gateway's defaults, but one process unless `workers` says otherwise (nginx
    here runs one worker too), and gRPC on `grpc_port` when given."""
    grpc = {"grpc": f"{HOST}:{grpc_port}"} if grpc_port is not None else {}
    addresses = [{"rest": backend, **({"grpc": grpc_backends[index]} if grpc_backends else {})}
                 for index, backend in enumerate(backends)]
    return {
        "workers": workers,
        "listen": {"https": f"{HOST}:{https_port}", "admin": f"{HOST}:{admin_port}", **grpc},
        "tls": {"cert": str(certs.server_cert), "key": str(certs.server_key)},
        "pools": {"backends": {"balancer": balancer, "backends": addresses}},
        "routes": [{"model": "*", "pool": "backends"}],
        # A proxy against a proxy: nginx here authenticates no one either. The admin key lets the bench read state.
        "auth": {"required": False, "admin_keys": [{"name": "bench", "sha256": digest(ADMIN_KEY)}]},
        "expose_upstream_header": False,
    }


class GatewayProcess(ServerProcess):
    """`python -m gateway --config WORK/config/gateway.yaml` for `document` (see gateway_config); ready when its
    admin `GET /readyz` answers 200. Access lines go to `access_log`, everything else to WORK/gateway.log. The config
    has a directory of its own, as in a deployment: the gateway watches the config's directory, and logs written
    there would wake its watcher on every flush, a cost no deployment pays."""

    def __init__(self, document: Mapping[str, Any], work: Path, access_log: Path, grace_s: float = 1.0,
                 env: Mapping[str, str] | None = None) -> None:
        self.config_path = work / "config" / "gateway.yaml"
        self.config_path.parent.mkdir(exist_ok=True)
        self._env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
        self.config_path.write_text(yaml.safe_dump(dict(document)))
        self.access_log = access_log
        self.https_port = int(document["listen"]["https"].rpartition(":")[2])
        self.admin = f"http://{document['listen']['admin']}"
        super().__init__("gateway", ["--config", str(self.config_path), "--grace-s", f"{grace_s:g}"],
                         self.https_port, work / "gateway.log", stop_grace_s=grace_s + 10)

    @property
    def url(self) -> str:
        return f"https://{HOST}:{self.https_port}"

    def start(self) -> Self:
        with open(self._log_path, "wb") as log, open(self.access_log, "ab") as access:
            self.process = subprocess.Popen(self._command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=access,
                                            stderr=log, start_new_session=True, env=self._env)
        return self

    def wait_ready(self, timeout_s: float = 60.0) -> Self:
        assert self.process is not None, "start() it first, or use it as a context manager"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerExited(f"gateway exited with {self.process.returncode}:\n{self.log_tail()}", self.log())
            try:
                if self._get("/readyz")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"gateway not ready after {timeout_s:g} s:\n{self.log_tail()}")

    def config(self) -> dict[str, Any]:
        """`GET /admin/config`: the config in force, as the gateway read it."""
        return self._get("/admin/config")[1]["config"]

    def backends(self) -> dict[str, Any]:
        """`GET /admin/backends`: every pool's backends with their state and request counts."""
        return self._get("/admin/backends")[1]["pools"]

    def fleet(self) -> list[dict[str, Any]]:
        """The fleet's workers from `GET /admin/backends` (pid, GPU, state, restarts)."""
        return self._get("/admin/backends")[1]["fleet"]["workers"]

    def _get(self, path: str) -> tuple[int, Any]:
        """Status and JSON of an admin GET (the body as text if the status is an error)."""
        try:
            request = urllib.request.Request(self.admin + path, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode(errors="replace")


class NginxProcess(ServerProcess):
    """nginx as a TLS reverse proxy on a free loopback port, round robin over `upstreams` (host:port) with
    keep-alive connections to them, configured to do the gateway's job: one worker process (the gateway is one),
    TLS 1.2+ with the gateway's ciphers, a request id made per request, sent upstream (with X-Forwarded-For) and
    returned, and one buffered JSON access line per request with the gateway's main fields (written within 100 ms
    or 64 KiB, as the gateway's are; `access_lines` counts them once it stopped). Everything it writes is in a
    directory of its own under the system's temp directory, which stop() removes: run as root, nginx's worker runs
    as nobody, and must be able to reach its temp paths, which a caller's private (0700) directory would not let it.
    """

    def __init__(self, nginx: str, certs: CertPaths, upstreams: Sequence[str], grpc_upstreams: Sequence[str] = ()
                 ) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="tfgate-nginx-"))
        self.work.chmod(0o755)
        self.error_log = self.work / "error.log"
        self.access_lines = 0
        port = free_port()
        self.grpc_port = free_port() if grpc_upstreams else 0  # gRPC over TLS with grpc_pass, when upstreams given
        config = self.work / "nginx.conf"
        config.write_text(_nginx_config(self.work, certs, upstreams, port, grpc_upstreams, self.grpc_port))
        super().__init__("nginx", [], port, self.work / "nginx.out")
        self._command = [nginx, "-p", f"{self.work}/", "-c", str(config), "-e", str(self.error_log),
                         "-g", "daemon off;"]

    @property
    def url(self) -> str:
        return f"https://{HOST}:{self.rest_port}"

    def stop(self) -> int | None:
        try:
            return super().stop()
        finally:
            access_log = self.work / "access.log"  # flushed by nginx as it exits; the directory goes next
            self.access_lines = sum(1 for _ in access_log.open("rb")) if access_log.exists() else 0
            shutil.rmtree(self.work, ignore_errors=True)

    def log(self) -> str:
        error_log = self.error_log.read_text(errors="replace") if self.error_log.exists() else ""
        return super().log() + error_log


def _nginx_config(work: Path, certs: CertPaths, upstreams: Sequence[str], port: int,
                  grpc_upstreams: Sequence[str] = (), grpc_port: int = 0) -> str:
    servers = "\n".join(f"        server {upstream};" for upstream in upstreams)
    tls = f"""ssl_certificate {certs.server_cert};
        ssl_certificate_key {certs.server_key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers {TLS12_CIPHERS};
        ssl_prefer_server_ciphers on;
        keepalive_requests 1000000;"""
    grpc = "" if not grpc_upstreams else f"""
    upstream grpc_backends {{
{chr(10).join(f"        server {upstream};" for upstream in grpc_upstreams)}
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen {HOST}:{grpc_port} ssl http2;
        {tls}
        location / {{
            grpc_pass grpc://grpc_backends;
        }}
    }}"""
    temp = "\n".join(f"    {kind}_temp_path {work / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                             "scgi"))
    # keepalive_requests: nginx closes a keep-alive connection after 1000 requests by default, client side and
    # upstream side; the gateway never does, so both are lifted, lest nginx pay for TLS handshakes the gateway skips.
    # The gateway's access line, as near as nginx's variables come (request_time is in seconds, ms resolution).
    log_format = ('{"ts":"$time_iso8601","request_id":"$request_id","method":"$request_method","path":"$uri",'
                  '"peer":"$remote_addr:$remote_port","status":$status,"upstream":"$upstream_addr",'
                  '"duration_s":$request_time,"upstream_s":"$upstream_response_time","bytes_in":$request_length,'
                  '"bytes_out":$bytes_sent}')
    return f"""worker_processes 1;
pid {work / "nginx.pid"};
error_log {work / "error.log"} warn;
events {{
    worker_connections 1024;
}}
http {{
    log_format tfgate escape=json '{log_format}';
    access_log {work / "access.log"} tfgate buffer=64k flush=100ms;
{temp}
    upstream backends {{
{servers}
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen {HOST}:{port} ssl;
        {tls}
        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Request-ID $request_id;
            proxy_set_header X-Forwarded-For $remote_addr;
            add_header X-Request-ID $request_id always;
        }}
    }}{grpc}
}}
"""


class CpuMeter:
    """CPU time of server processes (each with its direct children: nginx's worker) over a `with` block, as a share
    of one core: `shares[name]`, None where /proc cannot tell (not Linux, or the process is gone). Also
    `shares["host_steal"]`: the share of the whole machine's CPU time its hypervisor gave to other guests meanwhile.
    On these shared machines a run with steal above ~1% often shows doubled p50 and tripled p99, so a reader can
    tell a noisy row from a slow server."""

    def __init__(self, processes: Mapping[str, ServerProcess]) -> None:
        self._pids = {name: process.process.pid if process.process else None for name, process in processes.items()}
        self._start: dict[str, float | None] = {}
        self._host_start: tuple[int, int] | None = None
        self._wall = 0.0
        self.shares: dict[str, float | None] = {}

    def __enter__(self) -> Self:
        self._start = {name: _tree_cpu_s(pid) for name, pid in self._pids.items()}
        self._host_start = _host_steal_and_total()
        self._wall = time.monotonic()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        wall = time.monotonic() - self._wall
        for name, pid in self._pids.items():
            start, end = self._start[name], _tree_cpu_s(pid)
            self.shares[name] = None if start is None or end is None or wall <= 0 else (end - start) / wall
        host_end = _host_steal_and_total()
        if self._host_start is None or host_end is None or host_end[1] <= self._host_start[1]:
            self.shares["host_steal"] = None
        else:
            self.shares["host_steal"] = (host_end[0] - self._host_start[0]) / (host_end[1] - self._host_start[1])


def _host_steal_and_total() -> tuple[int, int] | None:
    """(steal, all) CPU ticks of the machine so far, from /proc/stat's first line; None where there is none."""
    try:
        ticks = [int(field) for field in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return (ticks[7], sum(ticks[:8])) if len(ticks) >= 8 else None  # user … steal; guest time is inside user


def _tree_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of `pid` (all its threads) and of its live direct children."""
    if pid is None:
        return None
    own = _stat(pid)
    if own is None:
        return None
    total = own[1]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(pid):
            child = _stat(int(entry.name))
            if child is not None and child[0] == pid:
                total += child[1]
    return total


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds) from /proc/PID/stat; fields after the command name, which may hold spaces."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
