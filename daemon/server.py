"""The daemon's lifecycle: start-up -> main loop -> shutdown (modelled on uvicorn's Server).

Signal handlers only set flags; the main loop notices them and shuts down in order.

Start-up
    1. refuse a non-loopback ``server.host`` without ``server.api_key`` (unless
       ``server.allow_insecure_bind``), then bind the socket (``--port 0`` picks a free port);
    2. load the models (or take a `ModelPair` given to the constructor) and start the
       `daemon.serving.service.Service`: replay-buffer writer, engine and generation worker;
       after each request it records it in the buffer and runs every hook in ``finished_hooks``;
    3. start uvicorn on that socket in a thread (uvicorn installs no signal handlers there);
    4. once it listens, write ``runtime.json`` (pid, host, port, url, started, version; atomic,
       mode 0600) into the data directory and log ``ready`` with the actual port.

Main loop
    Waits for a signal flag (or for the HTTP thread to die, which is an error).

Shutdown (SIGTERM/SIGINT; a second SIGINT skips the waiting)
    1. ``accepting = False``: new generation requests get 503, ``/health`` says so;
    2. wait for in-flight requests to finish (bounded by ``server.shutdown_timeout``);
    3. stop uvicorn, stop the worker, flush the buffer writer, remove ``runtime.json``.

Hooks for other components
    ``finished_hooks``: ``(request, result, queue_s, total_s)`` on the worker thread after each
    request with a result (cancelled ones included). ``status_providers``: callables returning a
    dict merged into ``GET /status``. ``adapter_version``: reported by ``/status`` and the
    ``specd_adapter_version`` gauge. ``metrics.buffer_records.set_function(fn)`` (or ``.set``)
    feeds the ``specd_buffer_records`` gauge.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from daemon import __version__
from daemon.config import ConfigError, ConfigSources, Settings, default_config_file
from daemon.core.backend import backend_info
from daemon.core.distributed import Group
from daemon.core.heads import pruned_head
from daemon.core.models import ModelPair, discover_models, load_pair
from daemon.logging import get_logger
from daemon.serving import notify
from daemon.serving.api.state import served_model
from daemon.serving.distributed import RankZero, fit_settings
from daemon.serving.endpoint import (
    bind_socket,
    check_bind_security,
    remove_runtime_file,
    write_runtime_file,
)
from daemon.serving.metrics import SpecdMetrics
from daemon.serving.requests import FinishedHook

if TYPE_CHECKING:  # imported lazily at run time: `specd --help` need not load MLX
    from daemon.adaptation.loop import AdaptationLoop
    from daemon.serving.api.state import ModelListing, ServedModel
    from daemon.serving.runtime import ModelRuntime
    from daemon.serving.service import Service
    from daemon.store.history import StatusHistory

log = get_logger("server")

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Server:
    """Loads the models, serves HTTP and keeps them resident until asked to stop.

    ``pair``: an already loaded `ModelPair` (tests, embedding); None loads the configured one.
    """

    def __init__(
        self,
        settings: Settings,
        sources: ConfigSources,
        pair: ModelPair | None = None,
        overrides: dict[str, Any] | None = None,
        adaptation: bool = True,
        group: Group | None = None,
    ) -> None:
        self.settings = settings
        self.sources = sources
        self.overrides = dict(overrides or {})
        self.adaptation_enabled = adaptation
        self.adaptation: AdaptationLoop | None = None  # models.target's
        self.adaptations: dict[str, AdaptationLoop] = {}  # the other served models'
        self._slot: Any = None  # their shared RunSlot, once the loops run
        self.reloader: Any = None
        self.reload_requested = False
        self.should_exit = False
        self.force_exit = False
        self.started = False
        self.exit_code = 0
        self.pair: ModelPair | None = pair
        self.engine: Any = None
        self.worker: Any = None
        self.app: Any = None
        self._switch: Any = None  # the HTTP front (daemon.serving.api.loading.LoadingSwitch)
        self.app_state: Any = None
        self.metrics = SpecdMetrics()
        self.service: Service | None = None
        # what the API knows of each other served model, once loaded (models.targets)
        self._served_models: dict[str, ServedModel] = {}
        self.finished_hooks: list[FinishedHook] = [self.metrics.observe_generation]
        self.status_providers: list[Callable[[], dict[str, Any]]] = []
        self.host: str | None = None
        self.port: int | None = None
        self.ready = threading.Event()  # set once serving (runtime.json written)
        self._wake = threading.Event()
        self._socket: socket.socket | None = None
        self._http: Any = None  # uvicorn.Server
        self._http_thread: threading.Thread | None = None
        self._old_handlers: dict[int, Any] = {}
        self._runtime_written = False
        # rank 0 of a group started by mlx.launch (daemon.serving.distributed); None: alone
        self.group = group
        self.rank0: RankZero | None = None

    @property
    def url(self) -> str | None:
        if self.port is None or self.host is None:
            return None
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def run(self) -> int:
        """Run until SIGINT/SIGTERM; returns the process exit code."""
        self.install_signal_handlers()
        try:
            self.startup()
            if not self.should_exit:
                self.main_loop()
        finally:
            self.shutdown()
            self.restore_signal_handlers()
        return self.exit_code

    def install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # tests may run the server in a thread; signals only reach the main thread
        for sig in HANDLED_SIGNALS:
            self._old_handlers[sig] = signal.signal(sig, self.handle_exit)
        if hasattr(signal, "SIGHUP"):
            self._old_handlers[signal.SIGHUP] = signal.signal(signal.SIGHUP, self.handle_reload)

    def restore_signal_handlers(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    def handle_reload(self, sig: int, frame: FrameType | None) -> None:
        self.reload_requested = True
        self._wake.set()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:  # a second signal: stop waiting for anything
            self.force_exit = True
        self.should_exit = True
        self._wake.set()

    # --- start-up ----------------------------------------------------------------------------

    def startup(self) -> None:
        s = self.settings
        log.info(
            "starting",
            config_sources=self.sources.describe() or ["defaults"],
            data_dir=str(s.paths.data_dir),
            log_file=str(s.log_file),
        )
        check_bind_security(self.settings.server)
        # Bind and serve before the (slow) model load: a busy port fails at once, and /health
        # answers 503 "loading" meanwhile (daemon.serving.api.loading).
        self._socket = bind_socket(s.server.host, s.server.port)
        self.host = s.server.host
        self.port = self._socket.getsockname()[1]
        self._start_http()
        if self.should_exit:
            return

        t0 = time.perf_counter()
        if self.group is None:  # models found by directory join the configured ones
            s = self.settings = s.with_models(discover_models(s))
        else:
            if s.models.targets:
                raise ConfigError(
                    "models.targets: a group of ranks serves models.target only (for now); "
                    "serve the other models from a daemon of their own"
                )
            s = self.settings = fit_settings(s)
            self.rank0 = RankZero(self.group, s, self._group_lost, self._rank_timeout)
            self.status_providers.append(self.rank0.status)
        if self.pair is None:
            self.pair = load_pair(s, self.group)
        pair = self.pair
        if self.rank0 is not None:
            self.rank0.wrap(pair)
        info = backend_info()
        log.info(
            "models_loaded",
            split=pair.split or None,
            group=self.group.info.to_dict() if self.group is not None else None,
            target=pair.target_id,
            target_path=pair.target_path,
            draft=pair.draft_id,
            draft_kind=pair.draft_kind,
            dtype=pair.dtype,
            dequantized=pair.dequantized,
            backend=info["device"],
            blas=info["blas"],
            mlx_version=info["mlx_version"],
            load_s=round(time.perf_counter() - t0, 2),
        )
        self._start_worker()
        if self.adaptation_enabled and s.training.enabled:
            self._start_adaptation()
        self._open_api()
        self._write_runtime()
        self._start_reloader()
        self.started = True
        self.ready.set()
        notify.ready(f"serving on {self.url}")
        log.info("ready", host=self.host, port=self.port, url=self.url, pid=os.getpid())

    @property
    def config_file(self) -> Path:
        return self.sources.main_file or default_config_file()

    def _start_adaptation(self) -> None:
        """An adaptive loop per served model, one training run at a time among them."""
        from daemon.adaptation.loop import AdaptationLoop, RunSlot

        service = self.service
        assert service is not None, "the service starts first"
        slot = self._slot = RunSlot()
        adaptation = self.adaptation = AdaptationLoop(service, slot)
        adaptation.start()
        self.status_providers.append(lambda: {"training": adaptation.status().to_dict()})
        for name in list(service.runtimes)[1:]:
            loop = self.adaptations[name] = AdaptationLoop(service.port(name), slot)
            loop.start()
        self.status_providers.append(self._other_training)

    def _other_training(self) -> dict[str, Any]:
        """The other served models' loops, by name (none: nothing to add to /status)."""
        loops = dict(self.adaptations)
        if not loops:
            return {}
        return {"training_models": {n: a.status().to_dict() for n, a in loops.items()}}

    def _start_reloader(self) -> None:
        from daemon.serving.reload import ConfigReloader

        self.reloader = reloader = ConfigReloader(
            self.config_file, self.overrides, self.settings, self.apply_settings
        )
        # keys the files changed that wait for a restart (the running values stay in force)
        self.status_providers.append(lambda: {"pending_restart": list(reloader.pending_restart)})
        try:
            self.reloader.start()
        except OSError as e:  # e.g. inotify limits: SIGHUP still reloads
            log.warning("config_watch_failed", error=str(e))

    def reload_config(self) -> bool:
        """Re-read the config files now (SIGHUP); invalid files leave everything as it was."""
        notify.reloading()
        try:
            return self.reloader.reload() if self.reloader is not None else False
        finally:
            notify.ready(f"serving on {self.url}")

    def _group_lost(self, error: Exception) -> None:
        """A collective failed: another rank is gone. Shut down with status 1 so the service
        manager restarts the group (requests in flight end with the error)."""
        log.error("rank_lost", error=str(error))
        self.exit_code = 1
        self.force_exit = True
        self.should_exit = True
        self._wake.set()

    def _rank_timeout(self, what: str, seconds: float) -> None:
        """The watchdog's last word before it ends the process (the worker is stuck inside a
        collective that will never finish)."""
        assert self.group is not None
        log.error(
            "rank_timeout",
            error=f"{self.group.info.others()} did not answer for {seconds:.1f} s ({what}); "
            "exiting so the service manager restarts the group",
        )
        if self._runtime_written:
            remove_runtime_file(self.settings.runtime_file, os.getpid())

    def apply_settings(self, new: Settings, live_keys: list[str]) -> None:
        """Make reloaded settings take effect (keys that need a restart are only logged)."""
        from daemon.logging import set_level

        if self.rank0 is not None:
            new = fit_settings(new)  # what a group cannot apply stays fixed, logged
            self.rank0.set_timeout(new.server.rank_timeout_seconds)
        else:
            new = new.with_models(discover_models(new))  # the directory is looked at again
        self.settings = new
        if self.app_state is not None:
            self.app_state.settings = new  # API key, limits, sampling defaults per request
        if any(k.startswith("logging.level") for k in live_keys):
            set_level(new.logging.level)
        service = self.service
        if service is None or service.worker is None:
            return
        if any(k.startswith("models.targets.") for k in live_keys):
            self._update_models(new)
        service.apply_settings(new, live_keys)

    def _update_models(self, new: Settings) -> None:
        """A reload changed models.targets: serve the entries added, stop serving those
        removed (an entry changed is both), with their adaptive loops; the rest untouched."""
        service = self.service
        assert service is not None
        if self.rank0 is not None:
            log.error("models_targets_ignored", reason="a group serves models.target only")
            return
        before = {n: r.entry for n, r in service.runtimes.items() if r.entry is not None}
        after = new.models.targets
        changed = {n for n in before if n in after and not before[n].same_weights(after[n])}
        removed = [n for n in before if n not in after or n in changed]
        added = [n for n in after if n not in before or n in changed]
        for name in after.keys() & before.keys() - changed:  # the rest applies in place
            service.runtimes[name].entry = after[name]
        for name in removed:
            loop = self.adaptations.pop(name, None)
            if loop is not None:
                loop.stop()
            service.remove_model(name)
            self._served_models.pop(name, None)
        for name in added:
            service.add_model(name, new)
            if self._slot is not None:  # the adaptation loops run
                from daemon.adaptation.loop import AdaptationLoop

                loop = self.adaptations[name] = AdaptationLoop(service.port(name), self._slot)
                loop.start()
        if self.app_state is not None:
            self.app_state.admins = dict(self.adaptations)
        if added or removed:
            log.info("models_changed", added=added, removed=removed, served=list(service.runtimes))

    def _start_worker(self) -> None:
        from daemon.serving.service import Service

        assert self.pair is not None
        # The same Service that in-process `specd collect` uses: requests are encoded,
        # generated and recorded in the replay buffer identically whoever sends them.
        self.service = service = Service(self.settings, self.pair)
        service.finished_hooks.append(self._on_finished)
        if self.rank0 is not None:
            service.idle_tick = (self.rank0.heartbeat_every, self.rank0.heartbeat)
        service.start()
        self.engine, self.worker = service.engine, service.worker
        self.metrics.queue_depth.set_function(lambda: self.worker.queue_depth)
        self.metrics.batched.set_function(lambda: self.worker.batched)
        self.metrics.adapter_version.set_function(lambda: self.adapter_version)
        self.metrics.buffer_records.set_function(
            lambda: service.buffer.count() if service.buffer is not None else 0
        )
        writer = service.writer
        if writer is not None:
            self.metrics.buffer_unsaved.set_function(lambda: writer.retry_backlog)
            self.metrics.buffer_dropped.set_function(lambda: writer.dropped)
        self.status_providers.append(service.buffer_status)
        # the suffix drafting index: past outputs held (daemon.core.drafting.SuffixIndex)
        self.status_providers.append(lambda: {"suffix_index": service.suffix.stats()})
        assert service.engine is not None
        prompt_cache = service.engine.prompt_cache
        self.metrics.prompt_cache_bytes.set_function(lambda: prompt_cache.nbytes)
        self.status_providers.append(lambda: {"prompt_cache": prompt_cache.status()})
        # what the round policy measured: the costs and acceptances behind every choice
        engine = service.engine
        self.status_providers.append(lambda: {"speculation": _measured(engine)})

    @property
    def adapter_version(self) -> int:
        return self.service.adapter_version if self.service is not None else 0

    def _model_listings(self) -> list[ModelListing]:
        """Every served model (models.target first): loaded or not, its adapter."""
        from daemon.serving.api.state import ModelListing

        assert self.service is not None
        now = time.monotonic()
        return [
            ModelListing(
                name=runtime.name,
                loaded=runtime.resident,
                adapter_version=runtime.adapter_version,
                served=self._served_models.get(runtime.name),
                expires_in=None if (at := runtime.unload_at()) is None else max(0.0, at - now),
            )
            for runtime in self.service.runtimes.values()
        ]

    def _history(self, name: str, since: float, until: float, step: float | None) -> StatusHistory:
        """The status page's figures for served model ``name`` (read from the files)."""
        from daemon.store.history import status_history

        service = self.service
        assert service is not None and service.buffer is not None
        runtime = service.runtimes[name]
        loop = self.adaptation if runtime is service.primary else self.adaptations.get(name)
        return status_history(
            name,
            service.buffer.for_target(runtime.target_id),
            service.state_dir_of(runtime),
            self.settings.training.keep_adapters,
            since,
            until,
            step,
            admin=loop is not None,
        )

    def _load_model(self, name: str) -> Future[ServedModel]:
        """Get another served model ready for its first request: loaded on the worker, then
        described for the API (kept: its next requests need no load to be encoded)."""
        assert self.service is not None
        done: Future[ServedModel] = Future()

        def loaded(fut: Future[ModelRuntime]) -> None:
            try:
                served = served_model(fut.result())
            except BaseException as e:  # noqa: BLE001 - the request that asked gets it
                done.set_exception(e)
                return
            self._served_models[name] = served
            done.set_result(served)

        self.service.prepare(name).add_done_callback(loaded)
        return done

    def _draft_head_tokens(self) -> int | None:
        head = pruned_head(self.service.draft) if self.service is not None else None
        return head.size if head is not None else None

    def _on_finished(self, request: Any, result: Any, queue_s: float, total_s: float) -> None:
        """The worker's ``on_finished``: every hook, in order; one failing stops no other."""
        for hook in list(self.finished_hooks):
            try:
                hook(request, result, queue_s, total_s)
            except Exception:
                log.exception("finished_hook_failed", hook=getattr(hook, "__qualname__", "?"))

    def _open_api(self) -> None:
        """Attach the API to the running HTTP server: the models are ready."""
        from daemon.serving.api import AppState, create_app

        assert self.service is not None
        primary = served_model(self.service.primary)
        self.app_state = AppState(
            settings=self.settings,
            worker=self.worker,
            tokenizer=primary.tokenizer,
            metrics=self.metrics,
            model_id=primary.name,
            draft_head_tokens=self._draft_head_tokens,
            status_providers=self.status_providers,
            admin=self.adaptation,
            admins=dict(self.adaptations),
            models=self._model_listings,
            load_model=self._load_model,
            keep_alive=self.service.set_keep_alive,
            history=self._history,
        ).serving(primary)  # models.target's tokenizer, limits and names, as any model's
        self.app = create_app(self.app_state)
        state = self.app_state
        self.metrics.in_flight.set_function(lambda: state.in_flight)
        self._switch.app = self.app

    def _start_http(self) -> None:
        """Serve HTTP on the bound socket; until `_open_api`, only the loading answers."""
        import uvicorn

        from daemon.serving.api.loading import LoadingSwitch

        s = self.settings
        self._switch = LoadingSwitch()
        config = uvicorn.Config(
            self._switch,
            log_config=None,  # keep specd's logging configuration
            access_log=False,
            lifespan="off",
            http="h11",
            ws="none",
            timeout_graceful_shutdown=max(1, math.ceil(s.server.shutdown_timeout)),  # int: uvicorn
        )
        self._http = uvicorn.Server(config)
        sock = self._socket
        self._http_thread = threading.Thread(
            target=self._http.run, kwargs={"sockets": [sock]}, name="specd-http", daemon=True
        )
        self._http_thread.start()
        while not self._http.started:
            if not self._http_thread.is_alive():
                raise RuntimeError("the HTTP server failed to start (see the log)")
            if self.should_exit:
                return
            time.sleep(0.01)

    def _write_runtime(self) -> None:
        data = {
            "pid": os.getpid(),
            "host": self.host,
            "port": self.port,
            "url": self.url,
            "started": datetime.now(UTC).isoformat(),
            "version": __version__,
        }
        write_runtime_file(self.settings.runtime_file, data)
        self._runtime_written = True

    # --- main loop ---------------------------------------------------------------------------

    def main_loop(self) -> None:
        while not self.should_exit:
            self._wake.wait(0.5)
            self._wake.clear()
            if self.reload_requested and not self.should_exit:
                self.reload_requested = False
                self.reload_config()
            if self._http_thread is not None and not self._http_thread.is_alive():
                log.error("http_server_stopped_unexpectedly")
                self.exit_code = 1
                break

    # --- shutdown ----------------------------------------------------------------------------

    def shutdown(self) -> None:
        notify.stopping()
        if self.reloader is not None:
            self.reloader.stop()
        for loop in [self.adaptation, *self.adaptations.values()]:
            if loop is not None:
                loop.stop()  # no new runs; a running one is stopped cleanly
        state = self.app_state
        timeout = self.settings.server.shutdown_timeout
        deadline = time.monotonic() + timeout
        log.info(
            "shutting_down",
            in_flight=state.in_flight if state is not None else 0,
            queued=self.worker.queue_depth if self.worker is not None else 0,
        )
        if state is not None:
            state.accepting = False
            while state.in_flight > 0 and not self.force_exit and time.monotonic() < deadline:
                time.sleep(0.05)
            if state.in_flight > 0:
                log.warning(
                    "shutdown_timeout", in_flight=state.in_flight, shutdown_timeout_s=timeout
                )
        forced = self.force_exit or time.monotonic() >= deadline
        if forced and self.worker is not None:
            # Stop the generations themselves: their handlers answer 503 if they still can,
            # and nothing runs on to finish a request nobody waits for.
            self.worker.abort()
        if self._http is not None:
            self._http.should_exit = True
            if forced:
                self._http.force_exit = True
        if self._http_thread is not None:
            self._http_thread.join(max(1.0, deadline - time.monotonic()) + 5.0)
        elif self._socket is not None:
            self._socket.close()
        if self.service is not None:
            remaining = 0.1 if self.force_exit else max(0.1, deadline - time.monotonic())
            # Stops the worker, then flushes every recorded request to the buffer.
            if not self.service.stop(remaining):
                log.warning("worker_still_busy_at_exit")
        if self.rank0 is not None:
            self.rank0.stop()  # the other ranks exit too
        if self._runtime_written:
            remove_runtime_file(self.settings.runtime_file, os.getpid())
            self._runtime_written = False
        self.ready.clear()
        self.pair = None
        self.engine = None
        log.info("stopped")


def _measured(engine: Any) -> dict[str, Any] | None:
    measured = engine.measured()
    return measured.to_dict() if measured is not None else None
