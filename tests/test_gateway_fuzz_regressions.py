"""What fuzzing the gateway's HTTPS edge and admin API found, kept as regressions, each failing on the code before its
fix: the real gateway over TLS in front of real backends, and the config watcher on a real file system with a reload
that raises (the one way left to make a reload fail unexpectedly)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.delay_proxy import DelayProxy
from gateway.app import Gateway, StartupError
from gateway.certs import CertPaths
from gateway.config_watch import watch_config
from tests.gateway_support import ADMIN, MODEL, config_document
from tests.test_gateway import start_gateway  # noqa: F401  (a fixture)
from tests.test_gateway_auth import token
from tests.test_gateway_auth_e2e import auth_document, bearer, gateway, jwks  # noqa: F401  (fixtures)


async def _reload(gw: Any) -> tuple[int, dict[str, Any]]:
    async with gw.session.post(gw.admin + "/admin/reload", headers=ADMIN) as response:
        return response.status, await response.json(content_type=None)


async def test_configs_too_deep_or_with_numbers_beyond_64_bits_are_refused_and_the_watch_goes_on(
        start_gateway: Any, certs: CertPaths, proxies: list[DelayProxy]) -> None:  # noqa: F811
    """Found: 2,000 nested brackets made PyYAML raise RecursionError, a 500 from /admin/reload that also ended the
    file watcher for good; a split weight of 10**400 was applied, then every request to the route failed with a 500
    (a float overflow); a split version of 10**30 was applied, then no request's access line could be written."""
    gw = await start_gateway(config_document(certs, proxies), watch_file=True)
    split = {"model": MODEL, "pool": "cpu"}
    for broken, key in (
            ("routes: " + "[" * 2000 + "]" * 2000 + "\n", "nested too deeply"),
            (yaml.safe_dump(config_document(certs, proxies, routes=[
                {**split, "split": [{"version": 1, "weight": 10**400}, {"version": 2, "weight": 1}]}])),
             "routes[0].split[0].weight"),
            (yaml.safe_dump(config_document(certs, proxies, routes=[
                {**split, "split": [{"version": 10**30, "weight": 1}]}])), "routes[0].split[0].version")):
        gw.path.write_text(broken)
        status, body = await _reload(gw)
        assert status == 400 and "still serving generation 1" in body["error"] and key in body["error"], body
        assert (await gw.predict())[0] == 200
    await asyncio.sleep(0.5)  # the watcher has seen the last broken file too
    gw.write(config_document(certs, proxies, pool={"balancer": "least_latency"}))
    for _ in range(50):  # a good change on disk is still picked up without being asked
        if gw.gateway.snapshot.generation > 1:
            break
        await asyncio.sleep(0.1)
    assert gw.gateway.snapshot.config.pools["cpu"].balancer == "least_latency"
    assert (await gw.predict())[0] == 200


@pytest.mark.parametrize("value", ["2024-13-45", "9" * 5000])
async def test_a_yaml_value_its_loader_refuses_stops_the_start_with_a_message(
        tmp_path: Path, certs: CertPaths, proxies: list[DelayProxy], value: str) -> None:
    """Found: a date YAML cannot build (month 13) or an integer too long for Python's int() escaped as a ValueError
    with a traceback instead of the one-line refusal every other bad config gets."""
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config_document(certs, proxies)) + f"workers: {value}\n")
    with pytest.raises(StartupError, match="invalid YAML"):
        await Gateway(path, watch_file=False).start()


async def test_a_token_subject_that_is_not_unicode_keeps_its_access_line(
        gateway: Any, certs: CertPaths, proxies: list[DelayProxy], jwks: Path) -> None:  # noqa: F811
    """Found: a valid JWT whose `sub` is a lone surrogate ("\\ud800" in its JSON) was served, but orjson refused the
    access record, so the request's line was lost (and a traceback logged for each such request)."""
    start, access = gateway
    gw, client = await start(auth_document(certs, proxies, jwks))
    status, _, body = await client.call(bearer(token(models=[MODEL], sub="x\ud800y")))
    assert status == 200, body
    await gw.access_log.drain()
    lines = [json.loads(line) for line in access.getvalue().splitlines()]
    assert [(line["status"], line["principal"]) for line in lines] == [(200, "x\\ud800y")]


async def test_a_signed_token_expiring_past_any_float_is_a_401(
        gateway: Any, certs: CertPaths, proxies: list[DelayProxy], jwks: Path) -> None:  # noqa: F811
    """Found: pyjwt accepts any integer `exp`; one of 10**400 then overflowed float() in the gateway: a 500."""
    start, _ = gateway
    _, client = await start(auth_document(certs, proxies, jwks))
    status, headers, body = await client.call(bearer(token(models=[MODEL], exp=10**400)))
    assert status == 401 and body == {"error": "invalid credentials: malformed token"}
    assert "invalid_token" in headers["www-authenticate"]
    assert (await client.call(bearer(token(models=[MODEL]))))[0] == 200


async def test_a_reload_that_raises_does_not_end_the_file_watch(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """Found: an exception out of a reload (a RecursionError, before the config reader caught it) ended the watcher
    task silently: no log line, and no later edit of the file was ever applied."""
    path = tmp_path / "gateway.yaml"
    path.write_text("first")
    seen: list[str] = []
    changed = asyncio.Event()

    async def reload(reason: str) -> None:
        seen.append(path.read_text())
        changed.set()
        if len(seen) == 1:
            raise RuntimeError("a bug while reloading")

    task = asyncio.create_task(watch_config(path, reload))
    try:
        await asyncio.sleep(0.5)  # the watcher is up
        for text in ("second", "third"):
            changed.clear()
            path.write_text(text)
            await asyncio.wait_for(changed.wait(), 10)
            await asyncio.sleep(0.3)  # past the debounce, so the next edit is a change of its own
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert seen == ["second", "third"]
    assert "config reload (file changed) failed" in caplog.text and "a bug while reloading" in caplog.text


async def test_a_version_in_the_url_is_ascii_digits(start_gateway: Any, certs: CertPaths,  # noqa: F811
                                                    proxies: list[DelayProxy]) -> None:
    """Found: /versions/١ (an Arabic-Indic one) was served as version 1, by the gateway and the backend alike:
    Python's \\d takes any Unicode digit, TF Serving's RE2 pattern only 0-9."""
    gw = await start_gateway(config_document(certs, proxies))
    status, body, _ = await gw.predict(f"/v1/models/{MODEL}/versions/%D9%A1:predict")
    assert status == 404 and "No such endpoint" in body["error"], body
    assert (await gw.predict(f"/v1/models/{MODEL}/versions/1:predict"))[0] == 200


def test_fields_the_connection_header_names_are_not_forwarded() -> None:
    """Found: a client's `Connection: x-internal` still sent X-Internal upstream; hop-by-hop fields stop at the
    gateway (RFC 9110 7.6.1), as they do at nginx and Envoy."""
    from gateway.http_edge import _forwarded_headers

    headers = {"connection": "keep-alive, X-Internal ,x-other", "x-internal": "1", "x-other": "2", "x-kept": "3",
               "content-type": "application/json", "authorization": "Bearer secret", "te": "trailers"}
    assert _forwarded_headers(headers) == [("x-kept", "3"), ("content-type", "application/json")]
    assert _forwarded_headers({"x-kept": "3"}) == [("x-kept", "3")]
