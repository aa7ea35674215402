"""The daemon's lifecycle: start-up -> main loop -> shutdown (modelled on uvicorn's Server).

Signal handlers only set flags; the main loop notices them and shuts down in order.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType

from daemon.backend import backend_info
from daemon.config import ConfigSources, Settings
from daemon.logging import get_logger
from daemon.models import ModelPair, load_pair

log = get_logger("server")

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Server:
    """Loads the models and keeps them resident until asked to stop."""

    def __init__(self, settings: Settings, sources: ConfigSources) -> None:
        self.settings = settings
        self.sources = sources
        self.should_exit = False
        self.force_exit = False
        self.started = False
        self.pair: ModelPair | None = None
        self._wake = threading.Event()

    def run(self) -> int:
        """Run until SIGINT/SIGTERM; returns the process exit code."""
        self.install_signal_handlers()
        self.startup()
        if not self.should_exit:
            self.main_loop()
        self.shutdown()
        return 0

    def install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # tests may run the server in a thread; signals only reach the main thread
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self.handle_exit)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True
        self._wake.set()

    def startup(self) -> None:
        s = self.settings
        log.info(
            "starting",
            config_sources=self.sources.describe() or ["defaults"],
            data_dir=str(s.paths.data_dir),
            log_file=str(s.log_file),
        )
        t0 = time.perf_counter()
        self.pair = pair = load_pair(s)
        info = backend_info()
        log.info(
            "models_loaded",
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
        self.started = True
        log.info("ready")

    def main_loop(self) -> None:
        while not self.should_exit:
            self._wake.wait(0.5)

    def shutdown(self) -> None:
        log.info("shutting_down")
        self.pair = None
        log.info("stopped")
