"""The backend process's lifecycle: configure TensorFlow, load every configured model, then open the ports.

Order (as TF Serving, so "port open" means "ready"): read every config file (a bad one fails the start) → load each
model's wanted versions (warm-up included) → fail at start if a version cannot load, wait while a model has no
version on disk → open the gRPC and REST ports → poll base paths and the model config in the background.

Shutdown on SIGTERM/SIGINT: report not-ready (REST readiness 503, gRPC health NOT_SERVING) → stop accepting →
let in-flight REST and gRPC requests finish within the grace period → cancel the pollers → exit 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import logging
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc
import tensorflow as tf
from google.protobuf.message import DecodeError
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2
from tensorflow_serving.config import model_server_config_pb2

from backend import errors
from backend.batcher import Batcher
from backend.batching_config import (
    BatchingConfigError,
    BatchingParameters,
    read_batching_parameters,
    read_model_batching_parameters,
    schedulable_cpus,
)
from backend.flags import ServerFlags
from backend.grpc_health_service import add_health
from backend.grpc_service import GrpcContext, add_services, apply_config
from backend.health import Health, InFlight
from backend.http_server import HttpServer
from backend.metrics import BackendMetrics
from backend.model_config import (
    ModelConfig,
    ModelConfigError,
    configs_from_proto,
    read_model_config_file,
    single_model,
)
from backend.models import LoadPolicy, ModelManager
from backend.monitoring_config import (
    MonitoringConfigError,
    PrometheusSettings,
    read_monitoring_config,
)
from backend.rest import RestApi, RestOptions
from backend.runners import CallRunner, DirectRunner
from backend.servable import CALLER_THREAD, Servable, load_servable, session_config
from backend.siblings import Siblings, WorkerRole
from backend.ssl_config import SSLConfig, SSLConfigError, read_ssl_config
from backend.warmup import run_warmup

log = logging.getLogger(__name__)

GRPC_MAX_MESSAGE_BYTES = 2**31 - 1  # as TF Serving: not gRPC's 4 MB default
GRPC_SERVICES = ("tensorflow.serving.PredictionService", "tensorflow.serving.ModelService")


class StartupError(RuntimeError):
    """The server cannot start; the message says why."""


@dataclass(frozen=True, slots=True)
class _Settings:
    """Every file the flags name, read once before anything loads, so a typo fails in the first second."""

    models: tuple[ModelConfig, ...]
    prometheus: PrometheusSettings
    ssl: SSLConfig | None
    batching: BatchingParameters | None  # None: batching is off


def _read_settings(flags: ServerFlags, role: WorkerRole | None) -> _Settings:
    try:
        if role is not None and role.kept_config.exists():  # a restarted worker: the group's config has changed
            models = configs_from_proto(_parse_config(role.kept_config.read_bytes()), str(role.kept_config))
        elif flags.model_config_file:
            models = read_model_config_file(flags.model_config_file)
        else:
            models = single_model(flags)
        prometheus = (read_monitoring_config(flags.monitoring_config_file) if flags.monitoring_config_file
                      else PrometheusSettings(enabled=False, path=""))
        ssl = read_ssl_config(flags.ssl_config_file) if flags.ssl_config_file else None
        batching = _batching_parameters(flags)
    except (ModelConfigError, MonitoringConfigError, SSLConfigError, BatchingConfigError) as error:
        raise StartupError(str(error)) from None
    return _Settings(models=models, prometheus=prometheus, ssl=ssl, batching=batching)


def _batching_parameters(flags: ServerFlags) -> BatchingParameters | None:
    if not flags.enable_batching:
        return None
    if not flags.batching_parameters_file:
        return BatchingParameters()
    parameters = read_batching_parameters(flags.batching_parameters_file)
    if parameters.ignored_fields:
        log.warning("%s: tfgate ignores these batching fields: %s", flags.batching_parameters_file,
                    ", ".join(parameters.ignored_fields))
    return parameters


# How long a Python thread may hold the GIL while another waits for it. CPython's default, 5 ms, is a convoy here:
# an inference thread needs the GIL briefly before and after each TensorFlow run, and while the event loop is busy
# it waited a median 6.7 ms for it just to start a batch (measured on 32-row batches under 64 REST clients). At
# 100 µs that wait is ~0.3 ms; the event loop, the only thread running Python for long, loses next to nothing.
GIL_SWITCH_INTERVAL_S = 100e-6


def _configure_tensorflow(flags: ServerFlags, batching: BatchingParameters | None) -> tf.compat.v1.ConfigProto:
    """Thread pools sized by the flags (fixed at start, as every Session's pools are): see `session_config`; the
    intra-op pool at 0 is TensorFlow's choice, as in TF Serving, except when batching is on (see
    BatchingParameters.intra_op_threads). Also shortens the GIL switch interval, so inference threads are not starved
    by the event loop."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    intra_op = flags.tensorflow_intra_op_parallelism
    cpus = max(1, schedulable_cpus() // flags.workers)  # this process's share of the machine
    if not intra_op and batching is not None:
        intra_op = batching.intra_op_threads(cpus)
        log.info("TensorFlow intra-op threads: %d per op (%d CPUs, num_batch_threads %d)", intra_op, cpus,
                 batching.num_batch_threads)
    elif not intra_op and flags.workers > 1:
        intra_op = cpus
        log.info("TensorFlow intra-op threads: %d per op (this worker's share of the CPUs)", intra_op)
    config = session_config(intra_op, flags.tensorflow_inter_op_parallelism)
    if config.inter_op_parallelism_threads == CALLER_THREAD:
        log.info("TensorFlow inter-op: each step runs its ops in the calling thread "
                 "(--tensorflow_inter_op_parallelism=N > 0 gives it a pool of N threads)")
    tf.config.threading.set_intra_op_parallelism_threads(intra_op)
    # Eager ops, if any run, have no caller-thread mode: at 0 they keep TensorFlow's own pool.
    tf.config.threading.set_inter_op_parallelism_threads(max(config.inter_op_parallelism_threads, 0))
    return config


def _loader(flags: ServerFlags, metrics: BackendMetrics,
            batching: BatchingParameters | None) -> Callable[[str, int, Path], Servable]:
    session_config = _configure_tensorflow(flags, batching)

    def load(name: str, version: int, path: Path) -> Servable:
        started = time.perf_counter()
        try:
            servable = load_servable(name, version, path, flags.tags, session_config)
            if flags.enable_batching:
                servable = dataclasses.replace(servable, batching=read_model_batching_parameters(path))
            if flags.enable_model_warmup:
                warmup_started = time.perf_counter()
                if run_warmup(servable, path):
                    metrics.observe_warmup(path=str(path), seconds=time.perf_counter() - warmup_started)
        except Exception:
            metrics.observe_load(model=name, version=version, path=str(path),
                                 seconds=time.perf_counter() - started, ok=False)
            raise
        metrics.observe_load(model=name, version=version, path=str(path), seconds=time.perf_counter() - started,
                             ok=True)
        # TensorFlow and a loaded model are ~300k long-lived objects; a full collection walked them all (167 ms
        # measured under load, every request stalled). Frozen, they are left out of collections (~1 ms).
        gc.freeze()
        return servable
    return load


async def serve(flags: ServerFlags) -> None:
    role = WorkerRole.from_env(os.environ)  # set when this process is one of a `--workers` group's
    settings = _read_settings(flags, role)
    metrics = BackendMetrics()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with AsyncExitStack() as stack:
        load_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="load")
        stack.callback(load_executor.shutdown, wait=False, cancel_futures=True)
        inference_executor = ThreadPoolExecutor(max_workers=max(4, 2 * (os.cpu_count() or 1)),
                                                thread_name_prefix="infer")
        stack.callback(inference_executor.shutdown, wait=False, cancel_futures=True)
        policy = LoadPolicy(max_load_retries=flags.max_num_load_retries,
                            load_retry_interval_s=flags.load_retry_interval_micros / 1e6,
                            allow_labels_for_unavailable=flags.allow_version_labels_for_unavailable_models)
        manager = ModelManager(_loader(flags, metrics, settings.batching), load_executor, policy, observer=metrics)
        if not await _load_initial_models(manager, settings.models, flags, stop):
            return
        if role is not None and not await role.wait_for_group(flags.workers, stop):
            return
        runner: CallRunner = DirectRunner(inference_executor)
        batcher = None
        if settings.batching is not None:
            runner = batcher = Batcher(settings.batching, inference_executor, metrics)
            stack.push_async_callback(batcher.close)
        tasks = [asyncio.create_task(_poll_file_system(manager, flags.file_system_poll_wait_seconds))]
        if flags.model_config_file and flags.model_config_file_poll_wait_seconds > 0:
            tasks.append(asyncio.create_task(_poll_config(manager, flags, batcher)))
        stack.push_async_callback(_cancel_all, tasks)

        core = _Core(manager=manager, executor=inference_executor, runner=runner, metrics=metrics,
                     health=Health(manager))
        siblings = None
        if role is not None:
            siblings = Siblings(role, metrics.exposition, functools.partial(_apply_serialized_config, manager))
        grpc_calls = InFlight()
        grpc_server, health_service = await _start_grpc(flags, settings, core, grpc_calls, siblings)
        rest_server = await _start_rest(flags, settings, core, siblings)
        if siblings is not None:
            await siblings.start()
            stack.push_async_callback(siblings.close)
        log.info("serving models: %s%s", ", ".join(manager.model_names()),
                 f" (worker {role.index} of {flags.workers})" if role is not None else "")
        await stop.wait()

        log.info("shutting down: not ready; draining in-flight requests (grace %gs)", flags.grace_period_s)
        core.health.draining = True
        if siblings is not None:
            await siblings.close()  # the other workers stop calling this one; the exit stack's close is then a no-op
        if health_service is not None:
            await health_service.enter_graceful_shutdown()
        await asyncio.gather(*([_drain_grpc(grpc_server, grpc_calls, flags.grace_period_s)]
                               if grpc_server is not None else []),
                             *([rest_server.shutdown(flags.grace_period_s)] if rest_server is not None else []))
        log.info("drained; exiting")


async def _drain_grpc(server: grpc.aio.Server, calls: InFlight, grace_s: float) -> None:
    """Let accepted calls finish (new ones are refused with UNAVAILABLE meanwhile), then stop the server."""
    started = time.monotonic()
    if not await calls.wait_idle(grace_s):
        log.warning("gRPC calls still running after the %gs grace period are cancelled", grace_s)
    await server.stop(max(0.0, grace_s - (time.monotonic() - started)))


@dataclass(frozen=True, slots=True)
class _Core:
    """What both APIs serve from."""

    manager: ModelManager
    executor: ThreadPoolExecutor
    runner: CallRunner
    metrics: BackendMetrics
    health: Health


async def _start_grpc(flags: ServerFlags, settings: _Settings, core: _Core, calls: InFlight, siblings: Siblings | None
                      ) -> tuple[grpc.aio.Server | None, grpc_health.aio.HealthServicer | None]:
    if not flags.port:
        return None, None
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", GRPC_MAX_MESSAGE_BYTES),
                                      ("grpc.so_reuseport", int(siblings is not None))])
    reload_group = None
    if siblings is not None:
        reload_group = lambda config: siblings.reload_group(config.SerializeToString())
    add_services(server, GrpcContext(manager=core.manager, executor=core.executor, runner=core.runner,
                                     metrics=core.metrics, health=core.health, in_flight=calls,
                                     tensor_content=flags.enable_serialization_as_tensor_content,
                                     reload_group=reload_group))
    health_service = None
    if flags.enable_grpc_healthcheck_service:
        health_service = add_health(server)
        for service in ("", *GRPC_SERVICES):
            await health_service.set(service, health_pb2.HealthCheckResponse.SERVING)
    address = f"{flags.bind_address}:{flags.port}"
    try:
        if settings.ssl is not None:
            server.add_secure_port(address, settings.ssl.server_credentials())
        else:
            server.add_insecure_port(address)
    except RuntimeError as error:  # grpc's "Failed to bind to address ...": the port is taken, or not an address
        raise StartupError(f"cannot serve gRPC (--port): {error}") from None
    await server.start()
    log.info("Running gRPC ModelServer at %s%s ...", address, " (TLS)" if settings.ssl is not None else "")
    return server, health_service


async def _start_rest(flags: ServerFlags, settings: _Settings, core: _Core, siblings: Siblings | None
                      ) -> HttpServer | None:
    if not flags.rest_api_port:
        return None
    options = RestOptions(timeout_s=flags.rest_api_timeout_in_ms / 1000, max_body_bytes=flags.rest_api_max_body_bytes,
                          metrics_path=settings.prometheus.path if settings.prometheus.enabled else None)
    api = RestApi(core.manager, core.executor, core.runner, options, core.metrics, core.health,
                  exposition=siblings.exposition if siblings is not None else None)
    server = HttpServer(api.handle, max_body_bytes=flags.rest_api_max_body_bytes)
    try:
        await server.start(flags.bind_address, flags.rest_api_port, reuse_port=siblings is not None)
    except OSError as error:  # the port is taken, or the address is not this host's
        raise StartupError(f"cannot serve REST (--rest_api_port): {error.strerror or error}") from None
    log.info("Exporting HTTP/REST API at:%s:%d ...", flags.bind_address, flags.rest_api_port)
    return server


def _parse_config(serialized: bytes) -> model_server_config_pb2.ModelServerConfig:
    try:
        return model_server_config_pb2.ModelServerConfig.FromString(serialized)
    except DecodeError as error:
        raise ModelConfigError(f"not a serialized ModelServerConfig: {error}") from None


async def _apply_serialized_config(manager: ModelManager, serialized: bytes) -> None:
    """A config another worker of the group applied (backend/siblings.py), applied here as it was there."""
    try:
        config = _parse_config(serialized)
    except ModelConfigError as error:
        raise errors.InvalidArgument(str(error)) from None
    await apply_config(manager, config)


async def _load_initial_models(manager: ModelManager, models: tuple[ModelConfig, ...], flags: ServerFlags,
                               stop: asyncio.Event) -> bool:
    """Load what the config wants; False if stopped while waiting. Raises StartupError if a version fails."""
    try:
        await manager.apply(models, strict_labels=True)
    except ModelConfigError as error:
        raise StartupError(str(error)) from None
    failures = manager.load_failures()
    if failures:
        raise StartupError(f"Failed to load initial models: {failures}")
    interval = max(flags.file_system_poll_wait_seconds, 1)
    while not manager.is_ready():
        waiting = [name for name in manager.model_names() if not manager.version_ready(name)]
        log.warning("waiting for models with no version loaded yet: %s (rescanning every %ds)",
                    ", ".join(waiting), interval)
        try:
            await asyncio.wait_for(stop.wait(), interval)
            return False
        except TimeoutError:
            await manager.sync()
    return True


async def _poll_file_system(manager: ModelManager, interval_s: int) -> None:
    if interval_s <= 0:
        return
    while True:
        await asyncio.sleep(interval_s)
        try:
            await manager.sync()
        except Exception:  # a poll that fails is logged and retried at the next interval
            log.exception("file system poll failed")


async def _poll_config(manager: ModelManager, flags: ServerFlags, batcher: Batcher | None) -> None:
    """Re-read the model config (and the batching parameters, which reload with it) when either file changes."""
    watched = [Path(flags.model_config_file)]
    if batcher is not None and flags.batching_parameters_file:
        watched.append(Path(flags.batching_parameters_file))
    last = [path.read_bytes() for path in watched]
    while True:
        await asyncio.sleep(flags.model_config_file_poll_wait_seconds)
        try:
            current = [path.read_bytes() for path in watched]
            if current == last:
                continue
            last = current
            configs = read_model_config_file(watched[0])
            batching = _batching_parameters(flags)
        except (OSError, ModelConfigError, BatchingConfigError) as error:
            log.error("config not applied, keeping the current one: %s", error)
            continue
        log.info("model config %s or batching parameters changed: applying them", watched[0])
        if batcher is not None and batching is not None:
            batcher.configure(batching)
        await manager.apply(configs)


async def _cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
