"""The model manager: which versions of which models are loaded, and which one a request gets.

How it works: the manager holds the configured models. `apply()` takes a new model config (added, removed or changed
models, policies, labels) and `sync()` rescans each base path; both compute the wanted versions with the model's
policy, load the new ones (with retries, off the event loop), and only then unload the ones no longer wanted, so a
client sending requests during a swap never sees an error. One lock serialises apply/sync; request lookups never
wait for it: they read per-model dicts that are replaced whole, never mutated in place.

Guarantees: a version that fails to load is retried `max_load_retries` times, then marked END with its error and not
retried until it leaves and re-enters the wanted set; it never unloads a version that is serving.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Awaitable, Callable, Iterable, Mapping, Protocol

from backend import errors
from backend.model_config import ModelConfig, ModelConfigError
from backend.servable import Servable
from backend.version_policy import version_directories, versions_to_unload

log = logging.getLogger(__name__)

Loader = Callable[[str, int, Path], Servable]


class VersionState(enum.Enum):
    """TF Serving's `ModelVersionStatus.State`, with the same names and numbers."""

    START = 10
    LOADING = 20
    AVAILABLE = 30
    UNLOADING = 40
    END = 50


@dataclass(frozen=True, slots=True)
class VersionStatus:
    version: int
    state: VersionState
    error: errors.ServingError | None = None


@dataclass(frozen=True, slots=True)
class LoadPolicy:
    max_load_retries: int = 5
    load_retry_interval_s: float = 60.0
    allow_labels_for_unavailable: bool = False


@dataclass
class _Model:
    config: ModelConfig
    serving: Mapping[int, Servable] = field(default_factory=lambda: MappingProxyType({}))
    labels: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    statuses: dict[int, VersionStatus] = field(default_factory=dict)
    failed: set[int] = field(default_factory=set)
    missing_path_logged: bool = False
    clashes_logged: set[tuple[int, str, str]] = field(default_factory=set)  # warned of once, not at every poll


class UnavailableLabelError(ModelConfigError):
    """A label naming a version that does not serve: TF Serving answers a reload with FAILED_PRECONDITION."""


class ServingObserver(Protocol):
    """Told how many versions of each model serve (the metrics implement it)."""

    def set_available_versions(self, model: str, count: int) -> None: ...

    def forget_model(self, model: str) -> None: ...


class ModelManager:
    def __init__(self, loader: Loader, executor: Executor, policy: LoadPolicy = LoadPolicy(),
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 observer: ServingObserver | None = None) -> None:
        self._observer = observer
        self._loader = loader
        self._executor = executor
        self._policy = policy
        self._sleep = sleep
        self._models: Mapping[str, _Model] = MappingProxyType({})
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------------------------------------ requests

    def resolve(self, name: str, version: int | None = None, label: str | None = None) -> Servable:
        """The servable a request names: latest when neither version nor label is given."""
        if label is not None:
            version = self.label_version(name, label)
        model = self._models.get(name)
        serving = model.serving if model is not None else {}
        if version is None:
            if not serving:
                raise errors.NotFound(f"Servable not found for request: Latest({name})")
            return serving[max(serving)]
        servable = serving.get(version)
        if servable is None:
            raise errors.NotFound(f"Servable not found for request: Specific({name}, {version})")
        return servable

    def label_version(self, name: str, label: str) -> int:
        model = self._models.get(name)
        if model is None or label not in model.labels:
            raise errors.InvalidArgument(f"Unrecognized servable version label: {label}")
        return model.labels[label]

    def status(self, name: str, version: int | None = None, label: str | None = None) -> list[VersionStatus]:
        """Version states, newest first, as TF Serving's GetModelStatus reports them: an unknown label is an error,
        a known one lists every version (as TF Serving does)."""
        if label is not None:
            self.label_version(name, label)
        model = self._models.get(name)
        if model is None or not model.statuses:
            raise errors.NotFound(f"Could not find any versions of model {name}")
        if version is None:
            return [model.statuses[v] for v in sorted(model.statuses, reverse=True)]
        if version not in model.statuses:
            raise errors.NotFound(f"Could not find version {version} of model {name}")
        return [model.statuses[version]]

    def model_names(self) -> list[str]:
        return sorted(self._models)

    def is_ready(self) -> bool:
        """Every configured model serves every version its policy wants (failed ones aside) and at least one."""
        return all(self._model_ready(model) for model in self._models.values())

    def version_ready(self, name: str, version: int | None = None) -> bool:
        model = self._models.get(name)
        if model is None:
            return False
        if version is None:
            return self._model_ready(model)
        return version in model.serving

    def load_failures(self, names: Iterable[str] | None = None, *, only_unserved: bool = False) -> str:
        """The versions that failed to load, with their errors, as one line ("" when none failed).

        `only_unserved` keeps only models serving no version at all (a reload that added a broken model).
        """
        wanted = set(self._models) if names is None else set(names)
        failures = [f"{name} version {version}: {status.error.message}"
                    for name, model in sorted(self._models.items())
                    if name in wanted and not (only_unserved and model.serving)
                    for version, status in sorted(model.statuses.items())
                    if version in model.failed and status.error is not None]
        return "; ".join(failures)

    @staticmethod
    def _model_ready(model: _Model) -> bool:
        if not model.serving:
            return False
        return not any(status.state in (VersionState.START, VersionState.LOADING)
                       for status in model.statuses.values())

    # ------------------------------------------------------------------------------------------------ changes

    async def apply(self, configs: tuple[ModelConfig, ...], *, strict_labels: bool = False) -> None:
        """Serve exactly these models; returns once added models' wanted versions loaded (or failed).

        With strict_labels (start-up), a label that cannot be applied raises ModelConfigError; on a reload it is
        logged and the model keeps its previous labels.
        """
        async with self._lock:
            current = dict(self._models)
            for name in set(current) - {config.name for config in configs}:
                log.info("model %s removed from the config: unloading it", name)
                del current[name]
                if self._observer is not None:
                    self._observer.forget_model(name)
            for config in configs:
                model = current.get(config.name)
                if model is None:
                    current[config.name] = _Model(config=config)
                else:
                    model.config = config
            self._models = MappingProxyType(current)
            await self._sync_locked()
            for model in current.values():
                self._apply_labels(model, strict_labels)

    async def sync(self) -> None:
        """Rescan every base path and load/unload to match the policies."""
        async with self._lock:
            await self._sync_locked()

    async def _sync_locked(self) -> None:
        await asyncio.gather(*(self._sync_model(model) for model in self._models.values()))

    async def _sync_model(self, model: _Model) -> None:
        on_disk = self._scan(model)
        desired = model.config.policy.select(on_disk)
        model.failed &= desired
        to_load = sorted(desired - set(model.serving) - model.failed)
        for version in to_load:
            model.statuses[version] = VersionStatus(version, VersionState.START)
        results = await asyncio.gather(*(self._load_with_retries(model, version, model.config.base_path /
                                                                 on_disk[version]) for version in to_load))
        serving = dict(model.serving)
        for version, servable in zip(to_load, results):
            if servable is not None:
                serving[version] = servable
        for version in versions_to_unload(desired, frozenset(serving)):
            log.info("unloading %s version %d", model.config.name, version)
            del serving[version]
            model.statuses[version] = VersionStatus(version, VersionState.END)
        model.serving = MappingProxyType(serving)
        if self._observer is not None:
            self._observer.set_available_versions(model.config.name, len(serving))

    def _scan(self, model: _Model) -> dict[int, str]:
        """The versions under the model's base path, each with the directory it is read from."""
        base = model.config.base_path
        try:
            with os.scandir(base) as listing:  # the entry's type comes with the listing: no stat per entry
                entries = [entry.name for entry in listing if entry.is_dir()]
        except OSError as error:
            if not model.missing_path_logged:
                log.warning("model %s: cannot read base path %s (%s); no versions found", model.config.name, base,
                            error.strerror)
                model.missing_path_logged = True
            return {}
        model.missing_path_logged = False
        directories, clashes = version_directories(entries)
        for version, read, ignored in clashes:
            if (version, read, ignored) not in model.clashes_logged:
                log.warning("model %s: directories %s and %s are both version %d; %s is read, as TF Serving does",
                            model.config.name, read, ignored, version, read)
        model.clashes_logged = set(clashes)
        return directories

    async def _load_with_retries(self, model: _Model, version: int, path: Path) -> Servable | None:
        name = model.config.name
        attempts = self._policy.max_load_retries + 1
        loop = asyncio.get_running_loop()
        for attempt in range(1, attempts + 1):
            model.statuses[version] = VersionStatus(version, VersionState.LOADING)
            started = time.monotonic()
            log.info("loading %s version %d from %s (attempt %d of %d)", name, version, path, attempt, attempts)
            try:
                servable = await loop.run_in_executor(self._executor, self._loader, name, version, path)
            except errors.ServingError as error:
                failure = error
            except Exception as error:  # a loader bug must fail this version, never the manager
                log.exception("unexpected error loading %s version %d", name, version)
                failure = errors.Internal(f"Loading {name} version {version} failed: {error}")
            else:
                log.info("%s version %d is AVAILABLE (loaded in %.2fs)", name, version, time.monotonic() - started)
                model.statuses[version] = VersionStatus(version, VersionState.AVAILABLE)
                return servable
            log.warning("loading %s version %d failed: %s", name, version, failure.message)
            if attempt < attempts:
                await self._sleep(self._policy.load_retry_interval_s)
        model.statuses[version] = VersionStatus(version, VersionState.END, failure)
        model.failed.add(version)
        return None

    def _apply_labels(self, model: _Model, strict: bool) -> None:
        wanted = dict(model.config.labels)
        if wanted == dict(model.labels):
            return
        for label, version in wanted.items():
            if version not in model.serving and not self._policy.allow_labels_for_unavailable:
                message = (f"Request to assign label {label!r} to version {version} of model {model.config.name}, "
                           "which is not currently available for inference")
                if strict:
                    raise UnavailableLabelError(message)
                log.error("%s; keeping the model's previous labels", message)
                return
        model.labels = MappingProxyType(wanted)
