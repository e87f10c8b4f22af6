"""Throwaway PostgreSQL and Redis servers on loopback, for the tests and the benchmarks.

PostgreSQL refuses to run as root, so when this runs as root the server runs
as the ``postgres`` system account (``runuser``) on a data folder that account
owns. As an ordinary user it runs as that user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    """Return *predicate()* once it is truthy; raise TimeoutError naming *what* after *timeout*."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def postgres_bindir() -> Path:
    """Return the folder of the machine's PostgreSQL server binaries (pg_ctl, initdb)."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not candidates:
        raise RuntimeError(
            "PostgreSQL server binaries (pg_ctl, initdb) were not found on PATH or in "
            "/usr/lib/postgresql/*/bin; install the PostgreSQL server package."
        )
    return Path(candidates[-1]).parent


class PostgresServer:
    """One PostgreSQL cluster on 127.0.0.1, in a temporary folder, for one test session."""

    def __init__(self, *, durable: bool = False) -> None:
        """Create the folder; *durable* keeps PostgreSQL's default fsync settings."""
        self.durable = durable
        self.bindir = postgres_bindir()
        self.base = Path(tempfile.mkdtemp(prefix="dedup-celery-pg-"))
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        self.port = free_port()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            account = pwd.getpwnam("postgres")
            os.chown(self.base, account.pw_uid, account.pw_gid)

    def _run(self, *args: str) -> None:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def init(self) -> None:
        """Create the cluster (initdb), trusting local connections."""
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
            "--locale=C",
        )

    def start(self) -> None:
        """Start the server on its port and wait until it accepts connections."""
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.base} "
        options += "-c max_connections=300"
        if not self.durable:
            # Tests need no crash safety; benchmarks keep the defaults.
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (pg_ctl stop -m *mode*)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        """Stop the server at once and remove its folder."""
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)


class RedisServer:
    """A redis-server of its own on loopback; *persistent* keeps an fsynced append-only file.

    With persistence a restart keeps the data, as the outage tests need.
    """

    def __init__(self, *, persistent: bool = True) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="dedup-celery-redis-"))
        self.port = free_port()
        self.persistent = persistent
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The server's URL, without a database number."""
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> RedisServer:
        """Start redis-server and wait until it answers PING."""
        executable = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.process = subprocess.Popen(
            [
                executable,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.base),
                *(
                    ("--appendonly", "yes", "--appendfsync", "always")
                    if self.persistent
                    else ("--appendonly", "no")
                ),
                "--save",
                "",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self._up, 20, what="redis-server to accept connections")
        return self

    def _up(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server (its data folder stays, so a start finds the data again)."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(20)
            self.process = None

    def destroy(self) -> None:
        """Stop the server and remove its folder."""
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


class MariaDBServer:
    """One MariaDB server on 127.0.0.1, in a temporary folder, for one test session.

    Like PostgreSQL, mariadbd will not run as root without being told to, so as
    root it runs as the ``mysql`` system account on a folder that account owns.
    Authentication is off (``--skip-grant-tables``): the server is throwaway and
    listens on loopback only. Its own clock runs in UTC (``--default-time-zone``),
    so anything that follows the session time zone shows up only where a test
    sets another one.
    """

    def __init__(self) -> None:
        """Create the folder and pick a port."""
        self.base = Path(tempfile.mkdtemp(prefix="dedup-celery-mariadb-"))
        self.data = self.base / "data"
        self.socket = self.base / "mariadb.sock"
        self.log = self.base / "server.log"
        self.tmp = self.base / "tmp"
        self.tmp.mkdir()
        self.port = free_port()
        self.as_root = os.geteuid() == 0
        self.process: subprocess.Popen | None = None
        if self.as_root:
            account = pwd.getpwnam("mysql")
            for path in (self.base, self.tmp):
                os.chown(path, account.pw_uid, account.pw_gid)

    def _command(self, *args: str) -> list[str]:
        # A temporary folder of its own: two servers bootstrapping at once in one
        # /tmp collide on their temporary tables.
        command = ["env", f"TMPDIR={self.tmp}", *args]
        return ["runuser", "-u", "mysql", "--", *command] if self.as_root else command

    def init(self) -> None:
        """Create the data folder (mariadb-install-db)."""
        installer = shutil.which("mariadb-install-db") or "/usr/bin/mariadb-install-db"
        if not os.path.exists(installer) or not os.path.exists("/usr/sbin/mariadbd"):
            raise RuntimeError(
                "MariaDB (mariadb-install-db, /usr/sbin/mariadbd) is not installed; "
                "'make test' installs Debian's mariadb-server (.ci/install-packages)."
            )
        done = subprocess.run(
            self._command(
                installer,
                "--no-defaults",
                f"--datadir={self.data}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ),
            check=False,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"mariadb-install-db failed ({done.returncode}):\n{done.stdout[-2000:]}"
                f"\n{done.stderr[-2000:]}"
            )

    def start(self, timeout: float = 60) -> None:
        """Start mariadbd on its port and socket, and wait until it answers."""
        self._log = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            self._command(
                "/usr/sbin/mariadbd",
                "--no-defaults",
                f"--datadir={self.data}",
                f"--socket={self.socket}",
                f"--port={self.port}",
                "--bind-address=127.0.0.1",
                f"--pid-file={self.base / 'mariadb.pid'}",
                f"--tmpdir={self.tmp}",
                "--skip-grant-tables",
                "--skip-name-resolve",
                "--default-time-zone=+00:00",
                "--character-set-server=utf8mb4",
                "--collation-server=utf8mb4_unicode_ci",
                "--innodb-buffer-pool-size=128M",
                "--innodb-flush-log-at-trx-commit=2",
                "--max-connections=300",
                "--log-error=" + str(self.log),
            ),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

        def accepting() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"mariadbd exited at start:\n{self.log.read_text()[-3000:]}")
            with socket.socket() as sock:
                sock.settimeout(0.5)
                return sock.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for(accepting, timeout, interval=0.2, what="MariaDB to accept connections")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL)."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self._log.close()
        self.process = None

    def destroy(self) -> None:
        """Stop the server and remove its folder."""
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)
