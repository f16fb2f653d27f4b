"""Real servers for the tests, started on 127.0.0.1 by the tests themselves and stopped after them:
PostgreSQL in a temporary data folder (``initdb``, ``pg_ctl``) and ``mlflow server``. .ci/run
installs Debian's postgresql when ``initdb`` is missing."""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin(name: str) -> str | None:
    """``initdb``/``pg_ctl`` on the PATH or in Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _as_postgres_user(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the postgres user the package made."""
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", "postgres", "--", *command]


@contextlib.contextmanager
def postgres_server(databases: tuple[str, ...] = ("optuna", "mlflow")):
    """A PostgreSQL server on 127.0.0.1 (trust authentication, user ``workbench``) holding
    ``databases``; yields ``{name: URL}``. The data folder is removed afterwards."""
    initdb, pg_ctl = postgres_bin("initdb"), postgres_bin("pg_ctl")
    if not (initdb and pg_ctl):
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql; .ci/run does this)")
    folder = Path(tempfile.mkdtemp(prefix="wb-postgres-"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    data, port = folder / "data", free_port()
    try:
        subprocess.run(_as_postgres_user([initdb, "-D", str(data), "-U", "workbench", "--auth=trust",
                                          "--no-sync", "-E", "UTF8"]),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        subprocess.run(_as_postgres_user([pg_ctl, "-D", str(data), "-o", options, "-l", str(folder / "log"),
                                          "-w", "-t", "60", "start"]),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            import sqlalchemy

            engine = sqlalchemy.create_engine(f"postgresql+psycopg://workbench@127.0.0.1:{port}/postgres",
                                              isolation_level="AUTOCOMMIT")
            with engine.connect() as connection:
                for name in databases:
                    connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
            engine.dispose()
            yield {name: f"postgresql://workbench@127.0.0.1:{port}/{name}" for name in databases}
        finally:
            subprocess.run(_as_postgres_user([pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"]),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def start_mlflow_server(backend_uri: str, artifacts: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """``mlflow server`` over ``backend_uri`` storing artifacts in ``artifacts``, once it answers
    /health; returns (process, http URL). Stop it with ``stop_server``."""
    port = port or free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
         "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if urllib.request.urlopen(f"{uri}/health", timeout=2).read() == b"OK":
                return server, uri
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                stop_server(server)
                raise RuntimeError(f"mlflow server over {backend_uri} did not start")
            time.sleep(0.5)


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (its workers too), SIGKILL after 60 s."""
    if server.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()
