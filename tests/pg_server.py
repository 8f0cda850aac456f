"""A throwaway PostgreSQL server for the tests (no conftest: import the fixtures you need).

    from tests.pg_server import postgres_server, postgres_url  # noqa: F401  (fixtures)

`postgres_server` (session) is the admin URL of a server: `PARLEY_TEST_POSTGRES_URL` when set
(a `postgresql+asyncpg://` URL of a role that may CREATE DATABASE), else a server started once per
test process: `initdb` into a temporary folder and `pg_ctl start` on a free port of 127.0.0.1, as
an unprivileged user when the tests run as root (PostgreSQL refuses to run as root). Where
neither is possible the tests that need it are skipped, saying why. `postgres_url` (per test) is
a fresh, empty database on that server, dropped afterwards. `stop_server()` and `start_server()`
take a locally started server down and up again (on the same port and data), for tests of a
database restart under a running app.
"""

from __future__ import annotations

import asyncio
import atexit
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ENV_URL = "PARLEY_TEST_POSTGRES_URL"
_BINARIES = ("initdb", "pg_ctl", "postgres")

_server: str | None = None
_failure: str | None = None
_control: dict[str, list[str]] = {}  # "stop" / "start": the pg_ctl command lines of the local server
_counter = itertools.count(1)


def _find_bindir() -> Path | None:
    candidates: list[Path] = []
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(os.path.realpath(on_path)).parent)
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10).stdout.strip()
            if out:
                candidates.append(Path(out))
        except (OSError, subprocess.SubprocessError):
            pass
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for folder in candidates:
        if all((folder / name).is_file() and os.access(folder / name, os.X_OK) for name in _BINARIES):
            return folder
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_local_server() -> str:
    """Start a server; its admin URL. Raises RuntimeError saying why it could not."""
    bindir = _find_bindir()
    if bindir is None:
        raise RuntimeError(
            "no PostgreSQL server binaries (initdb, pg_ctl, postgres) found on PATH or in /usr/lib/postgresql/*/bin; "
            f"install PostgreSQL (apt-get install postgresql) or set {ENV_URL}"
        )
    prefix: list[str] = []
    user: pwd.struct_passwd | None = None
    if os.geteuid() == 0:
        for name in ("postgres", "nobody"):
            try:
                user = pwd.getpwnam(name)
                break
            except KeyError:
                continue
        runuser = shutil.which("runuser")
        if user is None or runuser is None:
            raise RuntimeError(
                "running as root and there is no unprivileged 'postgres' or 'nobody' user (or no runuser) "
                f"to run PostgreSQL as; set {ENV_URL}"
            )
        prefix = [runuser, "-u", user.pw_name, "--"]
    root = Path(tempfile.mkdtemp(prefix="parley-pg-"))
    data = root / "data"
    log = root / "server.log"
    if user is not None:
        os.chmod(root, 0o755)
        os.chown(root, user.pw_uid, user.pw_gid)
    port = _free_port()

    def run(*args: str, timeout: float = 120) -> None:
        result = subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=timeout, cwd=root)
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            if log.exists():
                detail += log.read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"{Path(args[0]).name} failed ({result.returncode}): {' | '.join(detail)}")

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
            "--locale=C", "--no-sync")
        options = (
            f"-p {port} -c listen_addresses=127.0.0.1 -k {root} -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c max_connections=100"
        )
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start")
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"could not start a throwaway PostgreSQL from {bindir}: {exc}") from None

    def stop() -> None:
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=60, cwd=root)
        shutil.rmtree(root, ignore_errors=True)

    pg_ctl = [*prefix, str(bindir / "pg_ctl"), "-D", str(data)]
    _control["stop"] = [*pg_ctl, "-m", "fast", "-w", "-t", "60", "stop"]
    _control["start"] = [*pg_ctl, "-l", str(log), "-o", options, "-w", "-t", "60", "start"]
    _control["cwd"] = [str(root)]

    atexit.register(stop)
    return f"postgresql+asyncpg://postgres@127.0.0.1:{port}/postgres"


def server_url() -> str:
    """The admin URL (started on first call, once per process); `pytest.skip` saying why not."""
    global _server, _failure
    if _server is None and _failure is None:
        try:
            import asyncpg  # noqa: F401
        except ImportError:
            _failure = "the asyncpg driver is not installed (pip install -e '.[test]')"
        else:
            env = os.environ.get(ENV_URL, "").strip()
            if env:
                _server = env
            else:
                try:
                    _server = _start_local_server()
                except RuntimeError as exc:
                    _failure = str(exc)
    if _server is None:
        pytest.skip(f"PostgreSQL tests skipped: {_failure}")
    return _server


def can_restart() -> bool:
    """Whether `stop_server()`/`start_server()` work: the server was started by these tests."""
    return bool(_control)


def _pg_ctl(action: str) -> None:
    if not _control:
        raise RuntimeError(f"only a server started by the tests can be restarted (not one from {ENV_URL})")
    result = subprocess.run(_control[action], capture_output=True, text=True, timeout=90, cwd=_control["cwd"][0])
    if result.returncode != 0:
        raise RuntimeError(f"pg_ctl {action} failed ({result.returncode}): {(result.stderr or result.stdout).strip()}")


def stop_server() -> None:
    """Take the local server down (fast shutdown: every client connection is cut). Blocking."""
    _pg_ctl("stop")


def start_server() -> None:
    """Bring the local server up again after `stop_server()`, on the same port and data. Blocking."""
    _pg_ctl("start")


def _asyncpg_dsn(url: str, database: str | None = None) -> str:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if database is not None:
        parsed = parsed.set(database=database)
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


async def create_database(admin_url: str) -> str:
    """A new empty database on the server; its URL."""
    import asyncpg
    from sqlalchemy.engine import make_url

    name = f"parley_test_{os.getpid()}_{next(_counter)}"
    conn = await asyncpg.connect(_asyncpg_dsn(admin_url))
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return make_url(admin_url).set(drivername="postgresql+asyncpg", database=name).render_as_string(
        hide_password=False
    )


async def drop_database(admin_url: str, url: str) -> None:
    import asyncpg
    from sqlalchemy.engine import make_url

    name = make_url(url).database
    conn = await asyncpg.connect(_asyncpg_dsn(admin_url))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The admin URL of a PostgreSQL server (skips the test where there is none)."""
    return server_url()


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh, empty database for one test, dropped afterwards (a sync fixture: usable from any
    fixture through `request.getfixturevalue`)."""
    url = asyncio.run(create_database(postgres_server))
    try:
        yield url
    finally:
        asyncio.run(drop_database(postgres_server, url))
