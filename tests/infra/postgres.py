"""A throwaway PostgreSQL server from Debian's postgresql package (infra/local/system-deps.sh installs
it): initdb into a temp folder, started on a free loopback port with password authentication, stopped
and removed after. PostgreSQL refuses to run as root, so as root the server runs as the `postgres`
user the package creates."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.conftest import free_port


def postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: run infra/local/system-deps.sh (make test does)")
    return Path(found[-1]).parent


def _as_server_user(cmd: list[str]) -> list[str]:
    if os.getuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


@contextlib.contextmanager
def postgres_server(databases: tuple[str, ...] = ()):
    """Yields `postgresql+psycopg://postgres:PASSWORD@127.0.0.1:PORT` (no database name)."""
    bindir, port, password = postgres_bin(), free_port(), secrets.token_hex(12)
    root = Path(tempfile.mkdtemp(prefix="uniformer-pg."))
    data, sockets = root / "data", root / "sockets"
    sockets.mkdir()
    (root / "pw").write_text(password)
    if os.getuid() == 0:
        user = pwd.getpwnam("postgres")
        for path in (root, sockets, root / "pw"):
            os.chown(path, user.pw_uid, user.pw_gid)
    run = lambda *cmd: subprocess.run(_as_server_user([str(c) for c in cmd]), check=True,  # noqa: E731
                                      capture_output=True, text=True, timeout=120)
    try:
        run(bindir / "initdb", "-D", data, "-U", "postgres", "--auth-host=scram-sha-256", "--auth-local=peer",
            f"--pwfile={root / 'pw'}", "--no-sync")
        run(bindir / "pg_ctl", "-D", data, "-l", root / "server.log", "-w", "-t", "60", "-o",
            f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        uri = f"postgresql+psycopg://postgres:{password}@127.0.0.1:{port}"
        import psycopg

        with psycopg.connect(f"postgresql://postgres:{password}@127.0.0.1:{port}/postgres", autocommit=True) as conn:
            for name in databases:
                conn.execute(f'CREATE DATABASE "{name}"')
        yield uri
    finally:
        if data.exists():
            subprocess.run(_as_server_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                           capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)
