"""The backend process's lifecycle: configure TensorFlow, load every configured model, then open the ports.

Order (as TF Serving, so "port open" means "ready"): read the model config → load each model's wanted versions
(warm-up included) → fail at start if a version cannot load, wait while a model has no version on disk → open the
REST port → poll base paths and the config file in the background → on SIGTERM/SIGINT stop accepting, let in-flight
requests finish within the grace period, cancel the pollers and exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from pathlib import Path

import tensorflow as tf
from aiohttp import web

from backend.flags import ServerFlags
from backend.model_config import ModelConfig, ModelConfigError, read_model_config_file, single_model
from backend.models import LoadPolicy, ModelManager
from backend.rest import RestOptions, make_app
from backend.servable import Servable, load_servable
from backend.warmup import run_warmup

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """The server cannot start; the message says why."""


def _configure_tensorflow(flags: ServerFlags) -> tf.compat.v1.ConfigProto:
    """Thread pools sized by the flags; 0 keeps TensorFlow's choice (all cores), as in TF Serving."""
    tf.config.threading.set_intra_op_parallelism_threads(flags.tensorflow_intra_op_parallelism)
    tf.config.threading.set_inter_op_parallelism_threads(flags.tensorflow_inter_op_parallelism)
    return tf.compat.v1.ConfigProto(intra_op_parallelism_threads=flags.tensorflow_intra_op_parallelism,
                                    inter_op_parallelism_threads=flags.tensorflow_inter_op_parallelism)


def _model_configs(flags: ServerFlags) -> tuple[ModelConfig, ...]:
    if flags.model_config_file:
        return read_model_config_file(flags.model_config_file)
    return single_model(flags)


async def serve(flags: ServerFlags) -> None:
    session_config = _configure_tensorflow(flags)

    def load(name: str, version: int, path: Path) -> Servable:
        servable = load_servable(name, version, path, flags.tags, session_config)
        if flags.enable_model_warmup:
            run_warmup(servable, path)
        return servable

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
        manager = ModelManager(load, load_executor, policy)
        if not await _load_initial_models(manager, flags, stop):
            return
        tasks = [asyncio.create_task(_poll_file_system(manager, flags.file_system_poll_wait_seconds))]
        if flags.model_config_file and flags.model_config_file_poll_wait_seconds > 0:
            tasks.append(asyncio.create_task(_poll_config(manager, flags)))
        stack.push_async_callback(_cancel_all, tasks)
        if flags.rest_api_port:
            app = make_app(manager, inference_executor,
                           RestOptions(timeout_s=flags.rest_api_timeout_in_ms / 1000,
                                       max_body_bytes=flags.rest_api_max_body_bytes))
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=flags.grace_period_s)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            await web.TCPSite(runner, flags.bind_address, flags.rest_api_port, reuse_address=True).start()
            log.info("Exporting HTTP/REST API at:%s:%d ...", flags.bind_address, flags.rest_api_port)
        log.info("serving models: %s", ", ".join(manager.model_names()))
        await stop.wait()
        log.info("shutting down: draining in-flight requests (grace %.0fs)", flags.grace_period_s)


async def _load_initial_models(manager: ModelManager, flags: ServerFlags, stop: asyncio.Event) -> bool:
    """Load what the config wants; False if stopped while waiting. Raises StartupError if a version fails."""
    try:
        await manager.apply(_model_configs(flags), strict_labels=True)
    except ModelConfigError as error:
        raise StartupError(str(error)) from None
    failed = manager.failed_versions()
    if failed:
        details = "; ".join(f"{name} version {version}: {error.message}"
                            for name, versions in failed.items() for version, error in versions.items())
        raise StartupError(f"Failed to load initial models: {details}")
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


async def _poll_config(manager: ModelManager, flags: ServerFlags) -> None:
    path = Path(flags.model_config_file)
    last = path.read_bytes()
    while True:
        await asyncio.sleep(flags.model_config_file_poll_wait_seconds)
        try:
            current = path.read_bytes()
            if current == last:
                continue
            last = current
            configs = read_model_config_file(path)
        except (OSError, ModelConfigError) as error:
            log.error("model config %s not applied, keeping the current one: %s", path, error)
            continue
        log.info("model config %s changed: applying it", path)
        await manager.apply(configs)


async def _cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
