"""Authentication, authorization and rate limits through the real gateway over TLS (mTLS too), in front of real
backends: what a client sees (401/403/429 with their headers), what a reload changes, and that no secret reaches a
log line."""

from __future__ import annotations

import asyncio
import collections
import io
import json
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from bench.delay_proxy import DelayProxy
from gateway.accesslog import AccessLog
from gateway.app import Gateway
from gateway.certs import CertPaths, write_client_cert, write_dev_certs
from gateway.keys import digest, new_key
from tests.gateway_support import ADMIN, ADMIN_KEY, MODEL, config_document
from tests.test_gateway_auth import EC_KEY, claims, hs256_with_public_key, token, write_jwks

KEY_A, KEY_B, KEY_C = "tfg_alpha-secret-key", "tfg_beta-secret-key", "tfg_gamma-secret-key"
ISSUER, AUDIENCE = "https://issuer.example", "tfgate"  # as tests/test_gateway_auth.py signs its tokens
PREDICT = f"/v1/models/{MODEL}:predict"
BODY = {"instances": [2.0]}


def auth_document(certs: CertPaths, proxies: list[DelayProxy], jwks: Path, **auth: Any) -> dict[str, Any]:
    document = config_document(certs, proxies)
    document["tls"]["client_cert"] = "optional"
    document["auth"] = {
        "api_keys": [{"name": "alpha", "sha256": digest(KEY_A), "rate": {"per_second": 5, "burst": 5}},
                     {"name": "beta", "sha256": digest(KEY_B), "models": ["other-*"]},
                     {"name": "gamma", "sha256": digest(KEY_C), "methods": ["status", "metadata"]}],
        "jwt": {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": str(jwks), "models_claim": "models"},
        "client_certs": [{"subject": "CN=batch-job", "models": [MODEL]}],
        "admin_keys": [{"name": "ops", "sha256": digest(ADMIN_KEY)}],
        **auth,
    }
    return document


class Client:
    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session, self.url = session, url

    async def call(self, headers: dict[str, str] | None = None, path: str = PREDICT) -> tuple[int, dict[str, Any], Any]:
        method = self.session.post if path.endswith(":predict") else self.session.get
        async with method(self.url + path, json=BODY if method == self.session.post else None,
                          headers=headers or {}) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, \
                await response.json(content_type=None)


@pytest.fixture
async def gateway(tmp_path: Path, certs: CertPaths, proxies: list[DelayProxy]) -> AsyncIterator[Any]:
    """Start a gateway for a config document; yields (start, access log buffer)."""
    started: list[tuple[Gateway, aiohttp.ClientSession]] = []
    access = io.BytesIO()

    async def start(document: dict[str, Any], client_cert: tuple[Path, Path] | None = None) -> tuple[Gateway, Client]:
        path = tmp_path / "gateway.yaml"
        path.write_text(yaml.safe_dump(document))
        gw = Gateway(path, watch_file=False, access_log=AccessLog(access))
        await gw.start()
        context = ssl.create_default_context(cafile=certs.ca_cert)
        if client_cert is not None:
            context.load_cert_chain(*client_cert)
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context))
        started.append((gw, session))
        return gw, Client(session, f"https://localhost:{gw.https_port}")

    yield start, access
    for gw, session in started:
        await session.close()
        await gw.stop(1.0)


@pytest.fixture
def jwks(tmp_path: Path) -> Path:
    return write_jwks(tmp_path / "jwks.json")


def bearer(credential: str) -> dict[str, str]:
    return {"authorization": f"Bearer {credential}"}


async def test_credentials_decide_401_403_or_200(gateway: Any, certs: CertPaths, proxies: list[DelayProxy],
                                                 jwks: Path) -> None:
    start, _ = gateway
    _, client = await start(auth_document(certs, proxies, jwks))
    status, headers, body = await client.call()
    assert status == 401 and headers["www-authenticate"].startswith("Bearer") and "missing credentials" in body["error"]
    for wrong in (bearer("tfg_not-a-key"), {"x-api-key": "tfg_not-a-key"}):
        status, headers, body = await client.call(wrong)
        assert (status, body["error"]) == (401, "invalid credentials") and "invalid_token" in headers["www-authenticate"]
    assert (await client.call(bearer(KEY_A)))[0] == 200
    assert (await client.call({"x-api-key": KEY_A}))[0] == 200
    status, _, body = await client.call(bearer(KEY_B))  # beta is granted other-* models only
    assert status == 403 and body["error"] == f"principal 'beta' may not call predict on model '{MODEL}'"
    assert (await client.call(bearer(KEY_C)))[0] == 403  # gamma: status and metadata only
    assert (await client.call(bearer(KEY_C), path=f"/v1/models/{MODEL}"))[0] == 200
    status, _, body = await client.call(bearer(KEY_A), path="/v1/models/unknown:predict")
    assert status == 404  # only an authenticated caller learns which models exist
    assert (await client.call(path="/v1/models/unknown:predict"))[0] == 401


@pytest.mark.parametrize(("make", "reason"), [
    (lambda: token(exp=int(time.time()) - 3600), "expired"),
    (lambda: token(aud="someone-else"), "audience"),
    (lambda: token(iss="https://evil.example"), "issuer"),
    (lambda: token(key=EC_KEY, alg="ES256", kid="rsa1"), ""),  # signed by another key than its kid names
    (hs256_with_public_key, ""),
    (lambda: ".".join(token().split(".")[:2]) + ".", ""),  # signature stripped
])
async def test_bad_tokens_get_401(gateway: Any, certs: CertPaths, proxies: list[DelayProxy], jwks: Path,
                                  make: Any, reason: str) -> None:
    start, _ = gateway
    _, client = await start(auth_document(certs, proxies, jwks))
    status, headers, body = await client.call(bearer(make()))
    assert status == 401 and reason in body["error"] and "invalid_token" in headers["www-authenticate"]


async def test_alg_none_and_valid_tokens(gateway: Any, certs: CertPaths, proxies: list[DelayProxy],
                                         jwks: Path) -> None:
    import jwt

    start, _ = gateway
    _, client = await start(auth_document(certs, proxies, jwks))
    unsigned = jwt.encode(claims(models=[MODEL]), key=None, algorithm="none", headers={"kid": "rsa1"})
    assert (await client.call(bearer(unsigned)))[0] == 401
    assert (await client.call(bearer(token(models=[MODEL]))))[0] == 200
    assert (await client.call(bearer(token(models=["other"]))))[0] == 403


async def test_client_certificates(gateway: Any, tmp_path: Path, certs: CertPaths, proxies: list[DelayProxy],
                                   jwks: Path) -> None:
    start, _ = gateway
    document = auth_document(certs, proxies, jwks)
    _, known = await start(document, client_cert=write_client_cert(certs, "batch-job", tmp_path))
    assert (await known.call())[0] == 200
    _, unknown = await start(document, client_cert=write_client_cert(certs, "stranger", tmp_path))
    assert (await unknown.call())[0] == 401  # a trusted certificate, but no rule names its subject
    other_ca = write_dev_certs(tmp_path / "other-ca")
    _, untrusted = await start(document, client_cert=(other_ca.client_cert, other_ca.client_key))
    with pytest.raises(aiohttp.ClientError):  # the handshake refuses a certificate our CA did not sign
        await untrusted.call()


async def test_rate_limits_per_principal_and_per_model(gateway: Any, certs: CertPaths, proxies: list[DelayProxy],
                                                       jwks: Path) -> None:
    start, _ = gateway
    document = auth_document(certs, proxies, jwks)
    document["auth"]["api_keys"].append({"name": "delta", "sha256": digest("tfg_delta-key")})
    _, client = await start(document)
    answers = [await client.call(bearer(KEY_A)) for _ in range(8)]  # burst 5 at 5/s: the last ones are refused
    statuses = [status for status, _, _ in answers]
    assert statuses[:5] == [200] * 5 and 429 in statuses[5:]
    _, headers, body = next(answer for answer in answers if answer[0] == 429)
    assert int(headers["retry-after"]) >= 1 and headers["ratelimit-limit"] == "5"
    assert headers["ratelimit-remaining"] == "0" and int(headers["ratelimit-reset"]) >= 1
    assert "Rate limit exceeded" in body["error"]
    assert answers[0][1]["ratelimit-limit"] == "5" and answers[0][1]["ratelimit-remaining"] == "4"
    assert [(await client.call(bearer("tfg_delta-key")))[0] for _ in range(8)] == [200] * 8  # unaffected

    document["rate_limits"] = {"models": {MODEL: {"per_second": 1, "burst": 3}}}  # a cap across principals
    _, capped = await start(document)
    statuses = [(await capped.call(bearer(key)))[0] for key in ("tfg_delta-key", KEY_A, "tfg_delta-key", KEY_A)]
    assert statuses == [200, 200, 200, 429]


async def test_admitted_rate_is_the_configured_rate(gateway: Any, certs: CertPaths, proxies: list[DelayProxy],
                                                    jwks: Path) -> None:
    start, _ = gateway
    document = auth_document(certs, proxies, jwks)
    # A burst of 1 would measure the scheduler: a token left waiting while the gateway is off the CPU is lost, and
    # under load that cost 17% of the rate. A burst of 10 keeps a token earned in any pause shorter than 250 ms.
    document["auth"]["api_keys"][0]["rate"] = {"per_second": 40, "burst": 10}
    _, client = await start(document)
    admitted, started = 0, time.monotonic()
    seen = collections.Counter()

    async def caller() -> None:
        nonlocal admitted
        while time.monotonic() - started < 3.0:
            status = (await client.call(bearer(KEY_A)))[0]
            seen[status] += 1
            admitted += status == 200

    await asyncio.gather(*(caller() for _ in range(8)))
    elapsed = time.monotonic() - started
    assert abs(admitted - (40 * elapsed + 10)) <= 0.1 * 40 * elapsed, (admitted, elapsed, seen)


async def test_a_reload_that_revokes_a_key_applies_at_once(gateway: Any, tmp_path: Path, certs: CertPaths,
                                                           proxies: list[DelayProxy], jwks: Path) -> None:
    start, _ = gateway
    document = auth_document(certs, proxies, jwks)
    gw, client = await start(document)
    assert (await client.call({"x-api-key": KEY_C}, path=f"/v1/models/{MODEL}"))[0] == 200
    document["auth"]["api_keys"] = [key for key in document["auth"]["api_keys"] if key["name"] != "gamma"]
    gw.config_path.write_text(yaml.safe_dump(document))
    async with client.session.post(f"http://127.0.0.1:{gw.admin_port}/admin/reload", headers=ADMIN) as response:
        assert response.status == 200
    assert (await client.call({"x-api-key": KEY_C}, path=f"/v1/models/{MODEL}"))[0] == 401


async def test_admin_api_needs_its_key_but_probes_do_not(gateway: Any, certs: CertPaths, proxies: list[DelayProxy],
                                                        jwks: Path) -> None:
    start, _ = gateway
    gw, client = await start(auth_document(certs, proxies, jwks))
    admin = f"http://127.0.0.1:{gw.admin_port}"
    for path in ("/healthz", "/readyz", "/metrics"):
        async with client.session.get(admin + path) as response:
            assert response.status == 200
    for method, path in (("GET", "/admin/backends"), ("GET", "/admin/config"), ("POST", "/admin/reload")):
        for headers in ({}, bearer(KEY_A)):  # an API key is not an admin key
            async with client.session.request(method, admin + path, headers=headers) as response:
                assert response.status == 401 and "WWW-Authenticate" in response.headers
    async with client.session.get(admin + "/admin/config", headers=ADMIN) as response:
        config = (await response.json())["config"]
    assert {key["sha256"] for key in config["auth"]["api_keys"]} == {"<redacted>"}


async def test_required_auth_without_credentials_refuses_everything(
        gateway: Any, certs: CertPaths, proxies: list[DelayProxy], caplog: pytest.LogCaptureFixture) -> None:
    start, _ = gateway
    document = config_document(certs, proxies)
    document["auth"] = {"admin_keys": [{"name": "ops", "sha256": digest(ADMIN_KEY)}]}  # required by default
    with caplog.at_level(logging.ERROR, logger="tfgate.gateway"):
        _, client = await start(document)
    assert "every request will get 401" in caplog.text
    assert (await client.call())[0] == 401 and (await client.call(bearer(KEY_A)))[0] == 401


async def test_no_secret_reaches_any_log_line(gateway: Any, certs: CertPaths, proxies: list[DelayProxy], jwks: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    start, access = gateway
    a_token = token(models=[MODEL])
    with caplog.at_level(logging.DEBUG):
        gw, client = await start(auth_document(certs, proxies, jwks))
        for headers in (bearer(KEY_A), {"x-api-key": KEY_B}, bearer(a_token), bearer("tfg_wrong-secret"),
                        bearer(a_token[:-4] + "AAAA")):
            await client.call(headers)
        async with client.session.post(f"http://127.0.0.1:{gw.admin_port}/admin/reload", headers=ADMIN):
            pass
        await gw.access_log.drain()
    logged = caplog.text + access.getvalue().decode()
    assert '"principal":"alpha"' in logged  # the access log names who called...
    for secret in (KEY_A, KEY_B, a_token, a_token.split(".")[2], "tfg_wrong-secret", ADMIN_KEY):
        assert secret not in logged  # ...never with what


def _upload_head(port: int, ca_cert: Path, length: int, *headers: str) -> tuple[ssl.SSLSocket, bytes]:
    """A predict's head announcing `length` bytes and awaiting 100 Continue, sent over TLS; the connection, and all
    the gateway answered before the client sends any of the body."""
    sock = ssl.create_default_context(cafile=ca_cert).wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost")
    head = [f"POST {PREDICT} HTTP/1.1", "Host: localhost", "Content-Type: application/json",
            f"Content-Length: {length}", "Expect: 100-continue", *headers]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    answer = b""
    while b"\r\n\r\n" not in answer or (answer.startswith(b"HTTP/1.1 4") and not answer.endswith(b"}")):
        chunk = sock.recv(65536)
        if not chunk:
            break
        answer += chunk
    return sock, answer


async def test_an_upload_without_credentials_is_refused_before_its_body_is_sent(
        gateway: Any, certs: CertPaths, proxies: list[DelayProxy], jwks: Path) -> None:
    start, access = gateway
    gw, _ = await start(auth_document(certs, proxies, jwks))
    sock, answer = await asyncio.to_thread(_upload_head, gw.https_port, certs.ca_cert, 1_000_000)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 401 ") and b"Connection: close" in answer and b"100 Continue" not in answer
    assert b"www-authenticate: Bearer" in answer and b'{"error":"missing credentials: ' in answer
    body = json.dumps(BODY).encode()
    sock, answer = await asyncio.to_thread(_upload_head, gw.https_port, certs.ca_cert, len(body),
                                           f"Authorization: Bearer {KEY_A}")
    with sock:
        assert answer == b"HTTP/1.1 100 Continue\r\n\r\n"
        await asyncio.to_thread(sock.sendall, body)
        assert (await asyncio.to_thread(sock.recv, 65536)).startswith(b"HTTP/1.1 200 ")
    await gw.access_log.drain()
    lines = [json.loads(line) for line in access.getvalue().splitlines()]
    assert [(line["status"], line["principal"], line["bytes_in"]) for line in lines] == [(401, "", 0),
                                                                                         (200, "alpha", len(body))]


def test_keys_new_prints_a_key_once_and_its_config_line(capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main

    assert main(["keys", "new", "ci-bot"]) == 0
    out = capsys.readouterr().out
    key = next(line.split()[-1] for line in out.splitlines() if line.startswith("key:"))
    entry = yaml.safe_load(next(line for line in out.splitlines() if "sha256" in line).strip())[0]
    assert entry["name"] == "ci-bot" and entry["sha256"] == digest(key) and key.startswith("tfg_")
    assert new_key("ci-bot")[0] != key
