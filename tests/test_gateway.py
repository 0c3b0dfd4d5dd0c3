"""The real gateway over TLS in front of real backend subprocesses (through the bench's delay proxies, which make
one slow or dead on demand): routing, splits, balancing, health, retries, reloads, limits and TLS."""

from __future__ import annotations

import asyncio
import collections
import gc
import io
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from bench.backend_process import REPO, free_port
from backend.http_server import HttpRequest, HttpResponse, HttpServer
from bench.delay_proxy import DelayProxy
from gateway.app import Gateway, StartupError
from gateway.certs import CertPaths
from gateway.reloading import Lifecycle
from tests.gateway_support import ADMIN, MODEL, config_document

V1_ANSWER, V2_ANSWER = [3.0], [4.0]  # predict of [2.0]: v1 is x/2 + 2, v2 x/2 + 3


class Running:
    """A started in-process gateway, a TLS client session, and the config file it reloads from."""

    def __init__(self, gateway: Gateway, session: aiohttp.ClientSession, path: Path) -> None:
        self.gateway, self.session, self.path = gateway, session, path

    @property
    def url(self) -> str:
        return f"https://localhost:{self.gateway.https_port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.gateway.admin_port}"

    async def predict(self, path: str = f"/v1/models/{MODEL}:predict", body: Any = None) -> tuple[int, Any, str]:
        async with self.session.post(self.url + path, json=body or {"instances": [2.0]}) as response:
            return response.status, await response.json(content_type=None), response.headers.get(
                "x-tfgate-upstream", "")

    def write(self, document: dict[str, Any]) -> None:
        self.path.write_text(yaml.safe_dump(document))


@pytest.fixture
async def start_gateway(tmp_path: Path, certs: CertPaths) -> AsyncIterator[Any]:
    running: list[Running] = []

    async def start(document: dict[str, Any], watch_file: bool = False) -> Running:
        path = tmp_path / f"gateway-{len(running)}.yaml"
        path.write_text(yaml.safe_dump(document))
        gateway = Gateway(path, watch_file=watch_file)
        await gateway.start()
        client_tls = ssl.create_default_context(cafile=certs.ca_cert)
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_tls, limit=64))
        running.append(Running(gateway, session, path))
        return running[-1]

    yield start
    for each in running:
        await each.session.close()
        await each.gateway.stop(1.0)


async def test_predict_routes_to_a_backend_and_answers_untouched(start_gateway: Any, certs: CertPaths,
                                                                   proxies: list[DelayProxy]) -> None:
    gw = await start_gateway(config_document(certs, proxies))
    status, body, upstream = await gw.predict()
    assert status == 200 and body["predictions"] in (V1_ANSWER, V2_ANSWER)
    assert upstream in {proxy.address for proxy in proxies}
    assert (await gw.predict(f"/v1/models/{MODEL}/versions/1:predict"))[:2] == (200, {"predictions": V1_ANSWER})
    assert (await gw.predict(f"/v1/models/{MODEL}/labels/canary:predict"))[:2] == (200, {"predictions": V2_ANSWER})
    async with gw.session.get(f"{gw.url}/v1/models/{MODEL}", headers={"x-request-id": "abc-123"}) as response:
        assert response.status == 200
        assert response.headers["x-request-id"] == "abc-123"
        assert [v["version"] for v in (await response.json())["model_version_status"]] == ["2", "1"]


async def test_errors_in_tf_serving_shape(start_gateway: Any, certs: CertPaths, proxies: list[DelayProxy]) -> None:
    gw = await start_gateway(config_document(certs, proxies))
    status, body, _ = await gw.predict("/v1/models/nope:predict")
    assert status == 404 and "nope" in body["error"]
    async with gw.session.post(gw.url + f"/v1/models/{MODEL}:predict", data=b"{not json") as response:
        assert response.status == 400  # the backend's own 4xx passes through
        assert "error" in await response.json(content_type=None)
    async with gw.session.post(gw.url + f"/v1/models/{MODEL}:predict", data=io.BytesIO(b"[" + b"1," * (1 << 20) + b"1]")) as r:
        assert r.status == 413
        assert "error" in await r.json(content_type=None)
    async with gw.session.get(gw.url + "/nowhere") as response:
        assert response.status == 404 and "error" in await response.json(content_type=None)


async def test_weighted_split_follows_the_weights(start_gateway: Any, certs: CertPaths,
                                                  proxies: list[DelayProxy]) -> None:
    document = config_document(certs, proxies, routes=[
        {"model": MODEL, "pool": "cpu", "split": [{"version": 1, "weight": 80}, {"label": "canary", "weight": 20}]}])
    gw = await start_gateway(document)
    answers = await asyncio.gather(*(gw.predict() for _ in range(400)))
    share = sum(body == {"predictions": V2_ANSWER} for _, body, _ in answers) / len(answers)
    assert all(status == 200 for status, _, _ in answers)
    assert 0.13 <= share <= 0.27, share  # 20% ± about 3.5 standard deviations for 400 draws


async def test_answered_requests_leave_no_cyclic_garbage(start_gateway: Any, certs: CertPaths,
                                                          proxies: list[DelayProxy]) -> None:
    """A request's objects are freed as soon as it is answered (reference counting), not left in cycles for the
    garbage collector: measured, one cycle per request cost the gateway ~3% of its instructions per request."""
    gw = await start_gateway(config_document(certs, proxies))
    assert (await gw.predict())[0] == 200
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds is kept in gc.garbage instead of freed
    try:
        for _ in range(20):
            assert (await gw.predict())[0] == 200
        gc.collect()
        kinds = {type(found).__name__ for found in gc.garbage}
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert not kinds & {"HttpRequest", "HttpResponse", "AccessRecord", "Attempts", "UpstreamResponse"}, kinds


async def test_round_robin_is_even(start_gateway: Any, certs: CertPaths, proxies: list[DelayProxy]) -> None:
    gw = await start_gateway(config_document(certs, proxies))
    counts = collections.Counter([(await gw.predict())[2] for _ in range(40)])
    assert sorted(counts.values()) == [20, 20], counts


async def test_least_latency_avoids_a_slow_backend_and_returns_when_it_heals(
        start_gateway: Any, certs: CertPaths, proxies: list[DelayProxy]) -> None:
    gw = await start_gateway(config_document(certs, proxies, pool={"balancer": "least_latency"}))
    slow = proxies[0]
    slow.delay_s = 0.05

    async def shares(seconds: float) -> collections.Counter[str]:
        counts: collections.Counter[str] = collections.Counter()
        deadline = time.monotonic() + seconds

        async def client() -> None:
            while time.monotonic() < deadline:
                status, _, upstream = await gw.predict()
                assert status == 200
                counts[upstream] += 1

        await asyncio.gather(*(client() for _ in range(4)))
        return counts

    await shares(1.0)  # learn
    slowed = await shares(2.0)
    assert slowed[slow.address] / sum(slowed.values()) < 0.2, slowed
    slow.delay_s = 0.0
    await asyncio.sleep(1.0)
    for _ in range(10):  # its latency estimate decays, it is tried again, and its fast answers win it traffic back
        healed = await shares(1.0)
        if healed[slow.address] / sum(healed.values()) > 0.3:
            break
    else:
        pytest.fail(f"the healed backend did not get its share back: {healed}")


async def test_a_killed_backend_costs_no_client_error(start_gateway: Any, certs: CertPaths,
                                                      proxies: list[DelayProxy]) -> None:
    gw = await start_gateway(config_document(certs, proxies))
    dead, alive = proxies
    await dead.kill()
    answers = [await gw.predict() for _ in range(30)]
    assert {(status, upstream) for status, _, upstream in answers} == {(200, alive.address)}
    async with gw.session.get(gw.admin + "/admin/backends", headers=ADMIN) as response:
        states = {b["rest"]: b["state"] for b in (await response.json())["pools"]["cpu"]}
    assert states[dead.address] in ("unhealthy", "ejected") and states[alive.address] == "healthy"
    await dead.revive()
    for _ in range(50):
        await asyncio.sleep(0.1)
        async with gw.session.get(gw.admin + "/admin/backends", headers=ADMIN) as response:
            if {b["state"] for b in (await response.json())["pools"]["cpu"]} == {"healthy"}:
                break
    else:
        pytest.fail("the revived backend never became healthy again")


async def test_no_healthy_backend_is_503_and_slow_backend_is_504(start_gateway: Any, certs: CertPaths,
                                                                  proxies: list[DelayProxy]) -> None:
    gw = await start_gateway(config_document(certs, proxies, limits={"request_timeout_s": 0.3}))
    for proxy in proxies:
        proxy.delay_s = 1.0
    status, body, _ = await gw.predict()
    assert status == 504 and "error" in body
    for proxy in proxies:
        proxy.delay_s = 0.0
        await proxy.kill()
    await asyncio.sleep(0.6)  # the health checks (every 0.2 s, unhealthy after 1 failure) notice
    status, body, _ = await gw.predict()
    assert status == 503 and "No healthy backend" in body["error"]


async def test_reload_under_load_loses_no_request(start_gateway: Any, certs: CertPaths,
                                                  proxies: list[DelayProxy]) -> None:
    document = config_document(certs, proxies[:1])
    gw = await start_gateway(document, watch_file=True)
    statuses: collections.Counter[int] = collections.Counter()
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            statuses[(await gw.predict())[0]] += 1

    clients = [asyncio.create_task(client()) for _ in range(8)]
    for generation in range(6):  # alternate between one and two backends, by file change and by admin call
        document = config_document(certs, proxies[: 1 + generation % 2])
        gw.write(document)
        if generation % 2:
            async with gw.session.post(gw.admin + "/admin/reload", headers=ADMIN) as response:
                assert response.status == 200, await response.text()
        await asyncio.sleep(0.4)
    stop.set()
    await asyncio.gather(*clients)
    assert set(statuses) == {200} and statuses[200] > 50, statuses
    assert gw.gateway.snapshot.generation >= 4
    async with gw.session.get(gw.admin + "/admin/backends", headers=ADMIN) as response:
        kept = next(b for b in (await response.json())["pools"]["cpu"] if b["rest"] == proxies[0].address)
    assert kept["requests"] >= statuses[200] / 2  # in every generation, and its counters never started over


async def test_a_broken_config_is_rejected_and_serving_goes_on(start_gateway: Any, certs: CertPaths,
                                                               proxies: list[DelayProxy]) -> None:
    gw = await start_gateway(config_document(certs, proxies))
    good = gw.path.read_text()
    for broken in ("pools: [", yaml.safe_dump(config_document(certs, proxies, pool={"balancer": "fastest"}))):
        gw.path.write_text(broken)
        async with gw.session.post(gw.admin + "/admin/reload", headers=ADMIN) as response:
            assert response.status == 400
            message = (await response.json())["error"]
            assert "still serving generation 1" in message
        assert (await gw.predict())[0] == 200
    assert "pools.cpu.balancer" in message
    gw.path.write_text(good)
    async with gw.session.get(gw.admin + "/metrics") as response:
        assert 'tfgate_gateway_config_reloads_total{result="failure"} 2.0' in await response.text()
    async with gw.session.get(gw.admin + "/admin/config", headers=ADMIN) as response:
        document = await response.json()
        assert document["generation"] == 1 and document["config"]["pools"]["cpu"]["balancer"] == "round_robin"


async def test_admin_endpoints(start_gateway: Any, certs: CertPaths, proxies: list[DelayProxy]) -> None:
    gw = await start_gateway(config_document(certs, proxies))
    await gw.predict()
    async with gw.session.get(gw.admin + "/healthz") as response:
        assert response.status == 200
    async with gw.session.get(gw.admin + "/readyz") as response:
        assert response.status == 200
    async with gw.session.get(gw.admin + "/admin/backends", headers=ADMIN) as response:
        backends = (await response.json())["pools"]["cpu"]
    assert {b["rest"] for b in backends} == {p.address for p in proxies}
    assert set(backends[0]) >= {"rest", "grpc", "state", "ewma_ms", "in_flight", "requests", "failures"}
    async with gw.session.get(gw.admin + "/metrics") as response:
        text = await response.text()
    assert f'tfgate_gateway_requests_total{{code="200",model="{MODEL}"' in text
    assert "tfgate_gateway_upstream_state" in text
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (.ci/run installs it)")
    result = await asyncio.to_thread(subprocess.run, [promtool, "check", "metrics"], input=text, capture_output=True,
                                     text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


async def test_slow_clients_do_not_block_others(start_gateway: Any, certs: CertPaths,
                                                proxies: list[DelayProxy]) -> None:
    gw = await start_gateway(config_document(certs, proxies))
    context = ssl.create_default_context(cafile=certs.ca_cert)
    slow = []
    for _ in range(50):  # slowloris: a request head that never completes
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.https_port, ssl=context,
                                                       server_hostname="localhost")
        writer.write(b"POST /v1/models/half_plus_two:predict HTTP/1.1\r\nHost: x\r\n")
        slow.append((reader, writer))
    assert (await gw.predict())[0] == 200
    for reader, writer in slow:  # closed by the header timeout (1 s), not held open
        assert await asyncio.wait_for(reader.read(), 5) is not None
        writer.close()


async def test_tls_below_1_2_is_refused(start_gateway: Any, certs: CertPaths, proxies: list[DelayProxy]) -> None:
    gw = await start_gateway(config_document(certs, proxies))
    for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(certs.ca_cert)
        context.set_ciphers("ALL:@SECLEVEL=0")
        with warnings.catch_warnings():  # offering the old protocols is deprecated: that is the point here
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = context.maximum_version = version
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.open_connection("127.0.0.1", gw.gateway.https_port, ssl=context, server_hostname="localhost")
    context = ssl.create_default_context(cafile=certs.ca_cert)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    _, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.https_port, ssl=context,
                                              server_hostname="localhost")
    assert writer.get_extra_info("ssl_object").version() == "TLSv1.2"
    writer.close()


async def test_bad_config_or_certificate_stops_the_start(tmp_path: Path, certs: CertPaths,
                                                          proxies: list[DelayProxy]) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(json.dumps(config_document(certs, proxies, routes=[{"model": MODEL, "pool": "gpu"}])))
    with pytest.raises(StartupError, match="gpu"):
        await Gateway(path, watch_file=False).start()
    document = config_document(certs, proxies)
    document["tls"]["cert"] = str(tmp_path / "missing.pem")
    path.write_text(json.dumps(document))
    with pytest.raises(StartupError, match="missing.pem"):
        await Gateway(path, watch_file=False).start()
    document = config_document(certs, proxies)  # a fleet whose ports would take a pool backend's
    (tmp_path / "models.config").write_text("model_config_list {}")
    base = proxies[0].port - 1
    document["fleet"] = {"pool": "cpu", "model_config_file": str(tmp_path / "models.config"), "gpus": "none",
                         "replicas": 1, "base_port": base, "log_dir": str(tmp_path / "logs")}
    path.write_text(json.dumps(document))
    with pytest.raises(StartupError, match=rf"fleet: .* need ports {base}-{base + 3}, but the config already uses "
                                           rf"([0-9]+, )*{proxies[0].port}(, [0-9]+)* on this host"):
        await Gateway(path, watch_file=False).start()  # the other proxy's port may be in the range too


async def test_the_gateway_command_reloads_on_sighup_and_drains_on_sigterm(
        tmp_path: Path, certs: CertPaths, proxies: list[DelayProxy]) -> None:
    """`python -m gateway` as users run it: JSON access lines on stdout, SIGHUP reload, SIGTERM drain."""
    ports = [free_port(), free_port()]
    document = config_document(certs, proxies, listen={"https": f"127.0.0.1:{ports[0]}",
                                                       "admin": f"127.0.0.1:{ports[1]}"})
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(document))
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway", "--config", str(path),
                                                   "--grace-s", "5", stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE, cwd=REPO)
    client_tls = ssl.create_default_context(cafile=certs.ca_cert)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_tls)) as session:
            url = f"https://localhost:{ports[0]}/v1/models/{MODEL}:predict"
            for _ in range(100):
                try:
                    async with session.post(url, json={"instances": [2.0]}) as response:
                        assert response.status == 200
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
            document["pools"]["cpu"]["balancer"] = "least_latency"
            path.write_text(yaml.safe_dump(document))
            await wait_for_generation(session, ports[1], 2)  # the file watcher saw the change
            process.send_signal(signal.SIGHUP)
            await wait_for_generation(session, ports[1], 3)
            for proxy in proxies:
                proxy.delay_s = 1.0
            in_flight = asyncio.ensure_future(session.post(url, json={"instances": [2.0]}))
            await asyncio.sleep(0.3)
            process.send_signal(signal.SIGTERM)
            async with await in_flight as response:  # drained: answered, not cut off
                assert response.status == 200
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    lines = [json.loads(line) for line in (await process.stdout.read()).decode().splitlines()]  # type: ignore[union-attr]
    assert lines and {"request_id", "model", "upstream", "status", "duration_ms"} <= set(lines[-1])
    assert lines[-1]["model"] == MODEL and lines[-1]["status"] == 200


async def test_a_sighup_while_the_gateway_starts_neither_kills_it_nor_is_lost(
        tmp_path: Path, certs: CertPaths, proxies: list[DelayProxy]) -> None:
    """SIGHUP's default action ends a process. Sent while the gateway starts (the primary's admin API answers, its
    two workers are not ready yet), it used to kill the primary and so its workers; now the reload waits until the
    gateway serves."""
    ports = [free_port(), free_port()]
    document = config_document(certs, proxies, listen={"https": f"127.0.0.1:{ports[0]}",
                                                       "admin": f"127.0.0.1:{ports[1]}"}, workers=2)
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(document))
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway", "--config", str(path),
                                                   stdout=asyncio.subprocess.DEVNULL, cwd=REPO)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl.create_default_context(
                cafile=certs.ca_cert))) as session:
            for _ in range(1000):
                try:
                    async with session.get(f"http://127.0.0.1:{ports[1]}/readyz") as response:
                        ready = response.status == 200
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.01)
            assert not ready, "the gateway was ready before the test could signal it while it starts"
            process.send_signal(signal.SIGHUP)
            await wait_for_generation(session, ports[1], 2)
            assert process.returncode is None
            async with session.post(f"https://localhost:{ports[0]}/v1/models/{MODEL}:predict",
                                    json={"instances": [2.0]}) as response:
                assert response.status == 200
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_sighup_reloads_wait_for_the_start_and_are_ignored_while_stopping() -> None:
    """The handler itself, with real signals to this process: before the gateway serves a SIGHUP's reload waits;
    once it serves, it runs; while it stops, a SIGHUP starts nothing. Removed, or after a failed start, SIGHUP is
    the default again."""
    reasons: list[str] = []
    tasks: list[asyncio.Task[Any]] = []

    async def reload(reason: str) -> None:
        reasons.append(reason)

    sighup = Lifecycle(tasks, reload)
    await sighup.starting(asyncio.sleep(0))
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        await asyncio.sleep(0.1)
        assert len(tasks) == 1 and reasons == []  # waiting for the start
        sighup.serving.set()
        await asyncio.gather(*tasks)
        assert reasons == ["SIGHUP"] and tasks == []
        sighup.stopping = True
        os.kill(os.getpid(), signal.SIGHUP)
        await asyncio.sleep(0.1)
        assert tasks == [] and reasons == ["SIGHUP"]
    finally:
        sighup.remove()
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL

    async def failing_start() -> None:
        raise StartupError("no")

    with pytest.raises(StartupError):
        await sighup.starting(failing_start())
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL  # a failed start leaves SIGHUP as it was


async def wait_for_generation(session: aiohttp.ClientSession, admin_port: int, generation: int) -> None:
    for _ in range(50):
        async with session.get(f"http://127.0.0.1:{admin_port}/admin/config", headers=ADMIN) as response:
            if (await response.json())["generation"] == generation:
                return
        await asyncio.sleep(0.1)
    pytest.fail(f"the config never reached generation {generation}")


async def test_a_backends_own_503_reaches_the_client_when_no_retry_follows(start_gateway: Any,
                                                                            certs: CertPaths) -> None:
    """A backend that is up (its readiness probe says so) but answers 503: with no other backend to retry on, the
    client gets that answer, not an error the gateway makes up."""
    async def overloaded(request: HttpRequest) -> HttpResponse:
        if request.path == "/v2/health/ready":
            return HttpResponse(200, b'{"ready":true}')
        return HttpResponse(503, b'{"error": "the backend is overloaded"}')

    backend = HttpServer(overloaded, max_body_bytes=1 << 20)
    await backend.start("127.0.0.1", 0)
    try:
        document = config_document(certs, [])
        document["pools"]["cpu"]["backends"] = [{"rest": f"127.0.0.1:{backend.port}"}]
        gw = await start_gateway(document)
        status, body, upstream = await gw.predict()
        assert (status, body, upstream) == (503, {"error": "the backend is overloaded"}, f"127.0.0.1:{backend.port}")
    finally:
        await backend.shutdown(1.0)


async def test_a_reload_cannot_change_client_certificate_checks(start_gateway: Any, certs: CertPaths,
                                                                proxies: list[DelayProxy]) -> None:
    gw = await start_gateway(config_document(certs, proxies))
    document = config_document(certs, proxies)
    document["tls"]["client_cert"] = "required"
    gw.write(document)
    async with gw.session.post(gw.admin + "/admin/reload", headers=ADMIN) as response:
        assert response.status == 400 and "needs a restart" in (await response.json())["error"]
