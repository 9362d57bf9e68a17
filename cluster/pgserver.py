"""A PostgreSQL server on 127.0.0.1 for tests: the database a shared Iceberg SQL catalog lives in.

Debian's ``postgresql`` package (``make system-deps`` installs it) provides the binaries under
``/usr/lib/postgresql/<version>/bin``. ``PostgresServer`` makes a fresh cluster in a temporary folder with
``initdb``, runs ``postgres`` on a free loopback port with no Unix socket outside that folder, and creates
one login role and one database owned by it; every connection, the superuser's too, authenticates with a
password (SCRAM-SHA-256). PostgreSQL refuses to run as root, so under root the server runs as the
``postgres`` system user the package creates. ``stop()`` shuts it down and deletes the folder.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg import sql

from cluster.s3server import HOST, free_ports

BIN_GLOB = "/usr/lib/postgresql/*/bin"
SYSTEM_USER = "postgres"  # who runs the server when this process is root


class PostgresError(RuntimeError):
    """The server could not be set up or did not start; the message ends with the tail of its log."""


def bin_dir() -> Path:
    """The newest PostgreSQL's binaries; an error naming the package when there are none."""
    found = [
        p
        for p in Path("/").glob(BIN_GLOB.lstrip("/"))
        if (p / "initdb").exists() and (p / "postgres").exists()
    ]
    found.sort(key=lambda p: [int(part) for part in p.parent.name.split(".") if part.isdigit()])
    if not found:
        raise PostgresError(f"no PostgreSQL in {BIN_GLOB}: install Debian's postgresql (make system-deps)")
    return found[-1]


class PostgresServer:
    """A PostgreSQL server on 127.0.0.1 in a temporary folder; a context manager that starts and stops it.

    ``uri`` is the SQLAlchemy URL of its database for the login role ``user`` (with the password);
    ``connect()`` opens a psycopg connection as that role.
    """

    def __init__(self, user: str = "musiclib", database: str = "iceberg", start_timeout: float = 60.0):
        self.user = user
        self.database = database
        self.password = secrets.token_hex(16)
        self._superuser_password = secrets.token_hex(16)
        self.port = free_ports(1)[0]
        self.start_timeout = start_timeout
        self.folder: Path | None = None
        self.process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return self.database_uri(self.database)

    def database_uri(self, database: str) -> str:
        """The SQLAlchemy URL of ``database`` for the login role, password included."""
        return f"postgresql://{self.user}:{self.password}@{HOST}:{self.port}/{database}"

    def create_database(self, database: str) -> str:
        """A new database owned by the login role (the role itself may not create one); returns its URL."""
        with self._superuser() as conn:
            owner = sql.Identifier(self.user)
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(database), owner))
        return self.database_uri(database)

    @property
    def log(self) -> Path:
        return (self.folder or Path(".")) / "postgres.log"

    def connect(self, database: str = "", **kwargs) -> psycopg.Connection:
        """A psycopg connection as the login role to ``database`` (default: the server's own)."""
        return psycopg.connect(
            host=HOST,
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=database or self.database,
            **kwargs,
        )

    def _run_as(self) -> dict:
        """``subprocess`` arguments that run a command as the server's user (``postgres`` under root)."""
        if os.geteuid() != 0:
            return {}
        try:
            account = pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            raise PostgresError(
                f"running as root, and there is no {SYSTEM_USER!r} user to run PostgreSQL as "
                f"(Debian's postgresql package creates it)"
            ) from None
        return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}

    def start(self) -> None:
        """Make the cluster, start the server, create the role and the database; fail with the log's tail."""
        if self.process is not None:
            raise PostgresError(f"PostgreSQL on {HOST}:{self.port} is already running")
        binaries = bin_dir()
        as_user = self._run_as()
        self.folder = Path(tempfile.mkdtemp(prefix="musiclib-pg-"))
        data = self.folder / "data"
        pwfile = self.folder / "superuser.pw"
        pwfile.write_text(self._superuser_password + "\n")
        if as_user:
            for path in (self.folder, pwfile):
                os.chown(path, as_user["user"], as_user["group"])
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8", "HOME": str(self.folder)}
        initdb = [str(binaries / "initdb"), "-D", str(data), "-U", "postgres", f"--pwfile={pwfile}"]
        initdb += ["--auth=scram-sha-256", "-E", "UTF8", "--no-sync", "--no-instructions"]
        done = subprocess.run(initdb, env=env, cwd=self.folder, capture_output=True, text=True, **as_user)
        pwfile.unlink()
        if done.returncode != 0:
            self._remove()
            raise PostgresError(f"initdb failed ({done.returncode}):\n{done.stderr[-3000:]}")
        server = [str(binaries / "postgres"), "-D", str(data), "-h", HOST, "-p", str(self.port)]
        server += ["-k", str(self.folder), "-c", "fsync=off"]  # a throwaway test database
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                server, env=env, cwd=self.folder, stdout=log, stderr=subprocess.STDOUT, **as_user
            )
        deadline = time.monotonic() + self.start_timeout
        while not self._answers():
            if self.process.poll() is not None:
                code = self.process.returncode
                tail = self.log_tail()
                self.stop()
                raise PostgresError(f"postgres exited with status {code}\n{tail}")
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise PostgresError(f"PostgreSQL on {HOST}:{self.port} did not answer in time\n{tail}")
            time.sleep(0.2)
        self._create_role_and_database()

    def _superuser(self) -> psycopg.Connection:
        return psycopg.connect(
            host=HOST,
            port=self.port,
            user="postgres",
            password=self._superuser_password,
            dbname="postgres",
            autocommit=True,
            connect_timeout=2,
        )

    def _answers(self) -> bool:
        try:
            with self._superuser():
                return True
        except psycopg.OperationalError:
            return False

    def _create_role_and_database(self) -> None:
        with self._superuser() as conn:
            role = sql.Identifier(self.user)
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(role, sql.Literal(self.password)))
        self.create_database(self.database)

    def stop(self) -> None:
        """Fast shutdown (SIGINT: open sessions are ended), SIGKILL after 10 s; the folder is deleted."""
        if self.process is not None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        self._remove()

    def _remove(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no log)"

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
