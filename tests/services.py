"""Celery worker processes of the test project; the servers come from the harness.

PostgreSQL and Redis are started by :mod:`harness.servers`, which the
benchmarks share; this module adds what only the tests need.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import subprocess
import sys
from pathlib import Path

from harness.servers import REPO, MariaDBServer, PostgresServer, RedisServer, free_port, wait_for

__all__ = [
    "REPO",
    "MariaDBServer",
    "PostgresServer",
    "RedisServer",
    "Worker",
    "free_port",
    "wait_for",
]


class Worker:
    """A real ``celery worker`` process (prefork pool) of the test project."""

    def __init__(
        self,
        name: str,
        queue: str,
        env: dict[str, str],
        concurrency: int = 4,
        *,
        python: str = sys.executable,
        cwd: Path = REPO,
        args: tuple[str, ...] = (),
    ):
        """A worker of *python* (this venv's by default) importing the project from *cwd*.

        *args* go to ``celery worker`` after the test defaults (``-E``, say).
        """
        self.name = name
        self.args = args
        self.python = python
        self.cwd = cwd
        self.queue = queue
        self.log_path = Path(os.environ["DEDUP_TEST_TMP"]) / f"worker-{name}.log"
        self.env = {
            **os.environ,
            "PYTHONPATH": str(cwd),
            **env,
            "DJANGO_SETTINGS_MODULE": "tests.settings",
        }
        self.concurrency = concurrency
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> Worker:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        # A restarted worker appends to the same log: look for "ready" after this point.
        self._log_start = self._log.tell()
        self.started_at = datetime.datetime.now()
        self.process = subprocess.Popen(
            [
                self.python,
                "-m",
                "celery",
                "-A",
                "tests.celery_app",
                "worker",
                "-P",
                "prefork",
                "-c",
                str(self.concurrency),
                "-Q",
                self.queue,
                "-n",
                f"{self.name}@%h",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-l",
                "INFO",
                "--prefetch-multiplier",
                "1",
                *self.args,
            ],
            cwd=self.cwd,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(lambda: self._ready(), timeout, what=f"worker {self.name} to be ready")
        return self

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"worker {self.name} exited at start:\n{self.log_text()[-3000:]}")
        with open(self.log_path, "rb") as fh:
            fh.seek(self._log_start)
            return b" ready." in fh.read()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the whole worker: the main process and every pool child at once."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(15)
        self._log.close()
        self.process = None

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is not None:  # it exited by itself; children may remain
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self._log.close()
            self.process = None
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(15)
        self._log.close()
        self.process = None
