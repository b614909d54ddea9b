"""Which model versions are loaded, their readiness, and hot swap.

A version is registered only after it loaded and warmed up; a failed load is kept
as UNAVAILABLE with its reason, never served.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from enum import Enum

import numpy as np

from edgeserve.errors import InvalidInput, ModelNotFound, ModelNotReady
from edgeserve.protocol.integers import parse_uint
from edgeserve.runtime import Runtime, RuntimeLoadError, TensorSpec, ThreadPlan, create_runtime
from edgeserve.runtime.datatypes import V2_TO_NUMPY
from edgeserve.serving.autocomplete import completed, describe
from edgeserve.serving.batcher import BatchPolicy, build_scheduler
from edgeserve.serving.cache import CachedScheduler, ResponseCache
from edgeserve.serving.repository import ModelConfig
from edgeserve.serving.scheduler import RunResult, Scheduler, rows_of
from edgeserve.serving.statistics import VersionStats
from edgeserve.serving.verdicts import Passed

log = logging.getLogger(__name__)


UNLOADED = "unloaded"  # the reason of a version unloaded on request, as Triton reports it


class VersionState(str, Enum):
    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"


# (runtime, its config, the shared executor, that executor's thread count)
SchedulerFactory = Callable[[Runtime, ModelConfig, Executor, int], Scheduler]


def batching_scheduler(
    runtime: Runtime, config: ModelConfig, executor: Executor, slots: int
) -> Scheduler:
    """A dynamic batcher when the model has a batch dimension, behind the cache if enabled."""
    b = config.batching
    policy = BatchPolicy(
        max_batch_size=config.max_batch_size,
        max_queue_delay_s=b.max_queue_delay_ms / 1000,
        max_queue_size=b.max_queue_size,
        max_concurrent=min(b.max_concurrent_batches or slots, slots),
        wait_when_idle=b.wait_when_idle,
        max_queue_wait_s=b.max_queue_wait_ms / 1000,
        overload_queue_wait_s=b.overload_queue_wait_ms / 1000,
        preferred_batch_size=b.preferred_batch_size,
    )
    scheduler: Scheduler = build_scheduler(runtime.run, executor, policy)
    if config.cache.enabled:
        scheduler = CachedScheduler(scheduler, ResponseCache(config.cache.max_bytes))
    return scheduler


def concurrent_calls(config: ModelConfig, slots: int) -> int:
    """Runtime calls one model version may have running at once (the runtime's streams):
    its executor slots, or fewer batches when [batching] max_concurrent_batches says so."""
    if config.max_batch_size > 1:  # batching_scheduler runs at most this many batches
        return min(config.batching.max_concurrent_batches or slots, slots)
    return slots


@dataclass
class ModelVersion:
    """One loaded, warmed-up version of a model, ready to take requests."""

    name: str
    version: int
    config: ModelConfig
    runtime: Runtime
    scheduler: Scheduler
    platform: str
    digest: str = ""  # of the model files and config, to skip reloading what has not changed
    stats: VersionStats = field(default_factory=VersionStats)

    def __post_init__(self) -> None:
        self._inputs = {s.name: s for s in self.runtime.inputs}
        self._outputs = {s.name for s in self.runtime.outputs}
        self.declared_passed = Passed()  # edgeserve/serving/checks.py's check_declared
        self._inputs_passed = Passed()  # check_inputs: (name, datatype, shape) per input

    @property
    def inputs(self) -> list[TensorSpec]:
        return self.runtime.inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self.runtime.outputs

    def check_inputs(self, named: Mapping[str, tuple[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Match request tensors (name -> (datatype, array)) to the model's signature;
        the arrays in the model's input order."""
        key = tuple([(name, datatype, array.shape) for name, (datatype, array) in named.items()])
        if key in self._inputs_passed:
            return {name: named[name][1] for name in self._inputs}  # the model's order
        feed = self._checked_inputs(named)
        self._inputs_passed.add(key)
        return feed

    def _checked_inputs(self, named: Mapping[str, tuple[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """check_inputs' rules, one input at a time."""
        for name in named:
            if name not in self._inputs:
                raise InvalidInput(
                    f"unknown input '{name}' for model '{self.name}' (expects "
                    f"{', '.join(self._inputs)})"
                )
        feed = {}
        for spec in self.runtime.inputs:
            if spec.name not in named:
                raise InvalidInput(f"missing input '{spec.name}' for model '{self.name}'")
            datatype, array = named[spec.name]
            if datatype != spec.datatype:
                raise InvalidInput(f"input '{spec.name}' must be {spec.datatype}, got {datatype}")
            if not _shape_fits(array.shape, spec.shape):
                raise InvalidInput(
                    f"input '{spec.name}' has shape {list(array.shape)}, model "
                    f"expects {list(spec.shape)} (-1 = any)"
                )
            check_batch(spec.name, array.shape, self.config.max_batch_size)
            feed[spec.name] = array
        return feed

    def check_outputs(self, names: Sequence[str] | None) -> None:
        for name in names or ():
            if name not in self._outputs:
                raise InvalidInput(f"unknown output '{name}' for model '{self.name}'")

    async def infer(
        self,
        feed: dict[str, np.ndarray],
        outputs: Sequence[str] | None,
        deadline: float | None = None,
        input_s: float = 0.0,
    ) -> RunResult:
        """Run one request through the scheduler and count it as Triton's statistics
        extension does; `input_s` is the caller's time spent decoding the inputs."""
        started = time.perf_counter()
        try:
            result = await self.scheduler.submit(feed, outputs, deadline)
        except Exception:
            self.stats.fail.add(time.perf_counter() - started + input_s)
            raise
        took = time.perf_counter() - started + input_s
        self.stats.succeeded(took, input_s, result, rows_of(feed))
        return result


@dataclass
class VersionStatus:
    state: VersionState
    reason: str = ""


class Registry:
    """The loaded versions of every model; request handlers look versions up here."""

    def __init__(
        self,
        executor: Executor,
        executor_threads: int,
        threads: ThreadPlan,
        default_backend: str = "auto",
        scheduler_factory: SchedulerFactory = batching_scheduler,
        warmup: bool = True,
    ) -> None:
        self._executor = executor
        self._slots = executor_threads  # calls that can run at once on the executor
        self._threads = threads
        self._default_backend = default_backend
        self._scheduler_factory = scheduler_factory
        self._warmup = warmup
        self._versions: dict[str, dict[int, ModelVersion]] = {}
        self._status: dict[str, dict[int, VersionStatus]] = {}
        self._configs: dict[str, ModelConfig] = {}
        self._default_override: dict[str, int] = {}
        self._unloaded: set[str] = set()  # unloaded on request: out of readiness until loaded
        # out of readiness while their default does not serve: a failed explicit load, and
        # folders without model.toml (a file dropped in must not take the server out)
        self._excused: set[str] = set()
        self._derived: set[str] = set()
        # What `get(name)` answered, while nothing has changed since: every request that
        # names no version asks, and the answer moves only with the methods below, each
        # of which forgets it (`_moved`).
        self._defaults: dict[str, ModelVersion] = {}
        self.changing = asyncio.Lock()  # one repository change (load, unload, reload) at a time
        # Called after a version is loaded or retired (app.py: the GC heap settler).
        self.on_change: Callable[[], None] | None = None

    # -- lookup -----------------------------------------------------------------
    def get(self, name: str, version: str | None = None) -> ModelVersion:
        """The version to serve; the default version when `version` is None."""
        if version is None:
            remembered = self._defaults.get(name)
            if remembered is not None:
                return remembered
        statuses = self._status.get(name)
        if statuses is None:
            raise ModelNotFound(f"unknown model '{name}'")
        if version is None:
            number = self.default_version(name)
        else:
            parsed = parse_uint(version)
            if parsed is None:
                raise ModelNotFound(f"unknown version '{version[:32]}' of model '{name}'")
            number = parsed
        loaded = self._versions.get(name, {}).get(number)
        if loaded is not None:
            if version is None:
                self._defaults[name] = loaded
            return loaded
        status = statuses.get(number)
        if status is None:
            raise ModelNotFound(f"unknown version '{number}' of model '{name}'")
        if status.state is VersionState.LOADING:
            raise ModelNotReady(
                f"model '{name}' version {number} is loading", headers={"Retry-After": "1"}
            )
        raise ModelNotReady(f"model '{name}' version {number} is unavailable: {status.reason}")

    def set_default_version(self, name: str, version: int | None) -> None:
        """Serve `version` to requests that name none (a promotion, an installed slot);
        None goes back to model.toml's default_version or the highest ready version."""
        if version is None:
            self._default_override.pop(name, None)
        else:
            self._default_override[name] = version
        self._moved()

    def default_version(self, name: str) -> int:
        override = self._default_override.get(name)
        if override is not None:
            return override
        config = self._configs[name]
        if config.default_version is not None:
            return config.default_version
        ready = self._versions.get(name, {})
        if ready:
            return max(ready)
        return max(self._status[name])

    def names(self) -> list[str]:
        return sorted(self._status)

    def statuses(self, name: str) -> dict[int, VersionStatus]:
        return dict(self._status.get(name, {}))

    def loaded(self, name: str) -> dict[int, ModelVersion]:
        return dict(self._versions.get(name, {}))

    @property
    def ready(self) -> bool:
        """Every declared version has finished loading, and each model's default serves
        (but for models unloaded on request, models whose explicit load failed and models
        configured from their file alone: those report their failure as models)."""
        if not self._status:
            return False
        for name, statuses in self._status.items():
            if name in self._unloaded:
                continue
            if any(s.state is VersionState.LOADING for s in statuses.values()):
                return False
            if not self.serves(name) and name not in self._excused | self._derived:
                return False
        return True

    def serves(self, name: str) -> bool:
        """Whether a request naming no version of `name` would be served now."""
        try:
            self.get(name)
        except (ModelNotReady, ModelNotFound):
            return False
        return True

    def queue_depth(self) -> int:
        return sum(v.scheduler.depth for vs in self._versions.values() for v in vs.values())

    def shed_counts(self) -> dict[tuple[str, ...], float]:
        """Per model: requests refused because its queue was full, before any endpoint ran
        (every loaded model is listed, so a rate over it exists before the first refusal)."""
        return {
            (name,): sum(v.stats.shed for v in versions.values())
            for name, versions in self._versions.items()
        }

    # -- loading ----------------------------------------------------------------
    def declare(self, name: str, config: ModelConfig, versions: Sequence[int]) -> None:
        """Announce versions before they load, so they report LOADING (503) meanwhile."""
        self._configs[name] = config
        statuses = self._status.setdefault(name, {})
        for v in versions:
            statuses.setdefault(v, VersionStatus(VersionState.LOADING))
        self._moved()

    async def load(
        self,
        name: str,
        version: int,
        config: ModelConfig,
        files: Mapping[str, bytes],
        *,
        derive: bool = False,
    ) -> ModelVersion | None:
        """Load, check and warm one version off the event loop, then serve it.

        A version that is already serving keeps serving until the new one is ready;
        the old one is then closed once its in-flight requests have finished. `derive`
        completes the configuration from the model file (a folder without model.toml).
        """
        if derive:
            self._derived.add(name)
        else:
            self._derived.discard(name)
        digest = files_digest(files, config)
        current = self._versions.get(name, {}).get(version)
        if current is not None and current.digest == digest:
            return current
        self.declare(name, config, [version])
        loop = asyncio.get_running_loop()
        try:
            runtime, config = await loop.run_in_executor(
                self._executor, self._prepare, name, config, files, derive
            )
        except (RuntimeLoadError, InvalidInput) as exc:
            log.error("model load failed model=%s version=%s reason=%r", name, version, str(exc))
            if version not in self._versions.get(name, {}):
                self._status[name][version] = VersionStatus(VersionState.UNAVAILABLE, str(exc))
                self._moved()
            return None
        if derive:
            log.info("model config derived model=%s version=%s %s", name, version, describe(config))
        loaded = ModelVersion(
            name,
            version,
            config,
            runtime,
            self._scheduler_factory(runtime, config, self._executor, self._slots),
            platform=_platform(runtime),
            digest=digest,
        )
        old = self._versions.setdefault(name, {}).get(version)
        self._versions[name][version] = loaded
        self._status[name][version] = VersionStatus(VersionState.READY)
        self._moved()
        log.info("model ready model=%s version=%s backend=%s", name, version, runtime.backend)
        if old is not None:
            await self._retire(old)
        self._changed()
        return loaded

    def unloaded(self, name: str) -> bool:
        """Whether `name` was unloaded on request (and not loaded since)."""
        return name in self._unloaded

    async def unload_model(self, name: str) -> None:
        """Triton's explicit unload: every version stops serving once its in-flight requests
        finish, and reports UNAVAILABLE "unloaded" until the model is loaded again."""
        if name not in self._status:
            raise ModelNotFound(f"unknown model '{name[:64]}'")
        self._unloaded.add(name)
        old = self._versions.pop(name, {})
        self._status[name] = {
            v: VersionStatus(VersionState.UNAVAILABLE, UNLOADED) for v in self._status[name]
        }
        self._moved()
        for version in old.values():
            await self._retire(version)
        if old:
            self._changed()

    def reinstate(self, name: str) -> None:
        """Before an explicit load: its unloaded versions are forgotten so that the load
        declares them LOADING afresh (`name` stays out of readiness until `settle`)."""
        statuses = self._status.get(name, {})
        for version, status in list(statuses.items()):
            if status.reason == UNLOADED:
                del statuses[version]
        self._moved()

    def settle(self, name: str) -> None:
        """After an explicit load: `name` counts for readiness again once its default
        version serves; else it stays out (an unloaded model stays unloaded), so that one
        failed load does not take the whole server out of its load balancer."""
        if self.serves(name):
            self._unloaded.discard(name)
            self._excused.discard(name)
        else:
            self._excused.add(name)

    async def unload(self, name: str, version: int) -> None:
        old = self._versions.get(name, {}).pop(version, None)
        self._status.get(name, {}).pop(version, None)
        self._moved()
        if old is not None:
            await self._retire(old)
            self._changed()

    async def close(self) -> None:
        for versions in self._versions.values():
            for v in versions.values():
                await v.scheduler.close()
                v.runtime.close()
        self._versions.clear()
        self._moved()

    def _moved(self) -> None:
        """The versions, their states or a default changed: `get` asks afresh."""
        self._defaults.clear()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    async def _retire(self, old: ModelVersion) -> None:
        await old.scheduler.close()  # waits for in-flight work of the old version
        old.runtime.close()

    def _prepare(
        self, name: str, config: ModelConfig, files: Mapping[str, bytes], derive: bool
    ) -> tuple[Runtime, ModelConfig]:
        backend = config.backend if config.backend != "auto" else self._default_backend
        # a derived config batches with the default max_concurrent_batches: same streams
        threads = replace(self._threads, streams=concurrent_calls(config, self._slots))
        if config.threads.intra_op_threads:  # keeps the server's precision
            threads = replace(threads, intra_op=config.threads.intra_op_threads)

        def warmup_inputs(runtime: Runtime) -> list[dict[str, np.ndarray]]:
            settings = completed(config, runtime) if derive else config
            batched = settings.max_batch_size > 0
            return [_warmup_inputs(runtime, rows, batched) for rows in config.warmup.batch_sizes]

        # `auto` times both backends on the warm-up inputs and keeps the faster
        samples = warmup_inputs if self._warmup else None
        runtime = create_runtime(backend, files, threads, model=name, samples=samples)
        try:
            if derive:
                config = completed(config, runtime)
            _check_declared(name, config, runtime)
            if self._warmup:
                for feed in warmup_inputs(runtime):
                    runtime.run(feed, None)
        except Exception:
            runtime.close()
            raise
        return runtime, config


def check_batch(name: str, shape: Sequence[int], max_batch_size: int) -> None:
    """Refuse (400) a batched input of more rows than `max_batch_size`, or of none (as
    Triton, "batch-size must be >= 1": nothing to compute, and a batcher must not time an
    empty call). The declared shape is checked before decoding, the array after."""
    if max_batch_size and shape:
        if shape[0] > max_batch_size:
            raise InvalidInput(
                f"input '{name}': batch of {shape[0]} exceeds max_batch_size {max_batch_size}"
            )
        if shape[0] < 1:
            raise InvalidInput(
                f"input '{name}' has 0 rows: the batch dimension (shape[0]) must be at least 1"
            )


def files_digest(files: Mapping[str, bytes], config: ModelConfig) -> str:
    """A digest of what defines a loaded version: its files and its config."""
    h = hashlib.sha256(repr(config).encode())
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return h.hexdigest()


def _shape_fits(shape: tuple[int, ...], spec: tuple[int, ...]) -> bool:
    if len(shape) != len(spec):
        return False
    return all(want == -1 or got == want for got, want in zip(shape, spec, strict=True))


def _check_declared(name: str, config: ModelConfig, runtime: Runtime) -> None:
    """model.toml's declared signature must match what the model file really takes."""
    actual = {s.name: s for s in runtime.inputs + runtime.outputs}
    for declared in [*config.inputs, *config.outputs]:
        spec = actual.get(declared.name)
        if spec is None:
            raise RuntimeLoadError(
                f"{name}: model.toml declares '{declared.name}', which the model file does not have"
            )
        if spec.datatype != declared.datatype:
            raise RuntimeLoadError(
                f"{name}: '{declared.name}' is {spec.datatype} in the model "
                f"file but {declared.datatype} in model.toml"
            )


def _warmup_inputs(runtime: Runtime, rows: int, batched: bool) -> dict[str, np.ndarray]:
    feed = {}
    for spec in runtime.inputs:
        shape = [1 if d == -1 else d for d in spec.shape]
        if batched and shape:
            shape[0] = rows
        dtype = V2_TO_NUMPY[spec.datatype]
        if spec.datatype == "BYTES":
            feed[spec.name] = np.full(shape, b"warm up", dtype=object)
        else:
            feed[spec.name] = np.zeros(shape, dtype=dtype)
    return feed


def _platform(runtime: Runtime) -> str:
    return {"onnxruntime": "onnxruntime_onnx", "openvino": "openvino"}.get(
        runtime.backend, runtime.backend
    )
