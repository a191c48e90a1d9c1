"""PgPool-II in front of the MLflow database: connection pooling, one backend, on 127.0.0.1.

With ``TIRE_PGPOOL=1`` the stack starts ``pgpool`` (Debian's ``pgpool2``, 4.3) before MLflow,
and MLflow's backend and the registry lock connect to it instead of to ``TIRE_DATABASE_URL``'s
host (:attr:`tirelib.settings.Settings.client_database_url`). Facts that shape the
configuration:

- ``backend_clustering_mode = 'raw'`` with one backend: no replication, no load balancing, no
  failover. PgPool only keeps backend connections open between clients (``connection_cache``).
- PgPool pools *sessions*, not transactions: a client keeps one backend connection from its
  startup to its end, so session state (``SET``, prepared statements, and the registry's
  ``pg_advisory_lock``) behaves as on a direct connection. When the client leaves, cleanly or
  not, PgPool runs ``reset_query_list`` before it hands the backend connection to the next
  client; ``DISCARD ALL`` releases every advisory lock (``pg_advisory_unlock_all``), so a lock
  is never inherited through the pool. The rendered file says so explicitly, as a guard against
  a changed default.
- Authentication is ``trust`` from 127.0.0.1, matching a local PostgreSQL with trust auth; a
  production PgPool uses ``scram-sha-256`` in ``pool_hba.conf`` with the users' secrets in
  ``pool_passwd`` (``pg_enc``), and its PCP port for administration with a ``pcp.conf`` user.
- ``pgpool -n`` stays in the foreground and logs to stderr, so it is a
  :class:`~tirelib.stack.process.ManagedProcess` like the other servers. ``-D`` forgets the
  backend status file, so a backend once marked down is not remembered across restarts.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from tirelib.errors import ConfigurationError, StackError
from tirelib.settings import Settings
from tirelib.stack.ports import HOST, free_port
from tirelib.stack.process import Component, ManagedProcess, find_executable, inherited_env
from tirelib.urls import is_postgresql, libpq_url, masked_url, with_address

# What PgPool runs on a backend connection before the next client gets it: end any open
# transaction, then drop all session state, advisory locks included.
RESET_QUERY_LIST = "ABORT; DISCARD ALL"
# Clients served at once (more wait in the listen queue) and cached (user, database) pairs per
# child: at most NUM_INIT_CHILDREN * MAX_POOL backend connections.
NUM_INIT_CHILDREN = 32
MAX_POOL = 1
# sun_path holds 108 bytes, with ".s.PGSQL.<port>" appended to the folder.
_MAX_SOCKET_DIR = 90


def pgpool_binary() -> Path:
    """The ``pgpool`` executable (Debian's ``pgpool2`` installs it in /usr/sbin)."""
    path = find_executable("pgpool")
    if path is None:
        for folder in ("/usr/sbin", "/usr/local/sbin"):
            candidate = Path(folder) / "pgpool"
            if candidate.is_file():
                return candidate
        raise StackError(
            "PgPool-II's 'pgpool' was not found on PATH; install it with: "
            "apt-get install pgpool2 (or `make system-deps` as root)"
        )
    return path


def pgpool_url(settings: Settings) -> str:
    """Where the local PgPool answers, for ``tirelib stack status``."""
    return f"postgresql://{HOST}:{settings.pgpool_port}"


def _backend_address(database_url: str) -> tuple[str, int]:
    parts = urlsplit(libpq_url(database_url))
    try:
        port = parts.port or 5432
    except ValueError as error:
        raise ConfigurationError(
            f"TIRE_DATABASE_URL has an invalid port: {masked_url(database_url)}"
        ) from error
    return parts.hostname or "localhost", port


def _quote(value: object) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def render_pgpool_config(
    *,
    backend_host: str,
    backend_port: int,
    port: int,
    pcp_port: int,
    state_dir: Path,
    socket_dir: Path,
) -> str:
    """The text of ``pgpool.conf``: PgPool on ``HOST:port`` in front of one PostgreSQL."""
    settings = {
        "backend_clustering_mode": _quote("raw"),
        "listen_addresses": _quote(HOST),
        "port": port,
        "socket_dir": _quote(socket_dir),
        "pcp_listen_addresses": _quote(""),  # PCP on its Unix socket only
        "pcp_port": pcp_port,
        "pcp_socket_dir": _quote(socket_dir),
        "backend_hostname0": _quote(backend_host),
        "backend_port0": backend_port,
        "backend_weight0": 1,
        "backend_flag0": _quote("DISALLOW_TO_FAILOVER"),
        "enable_pool_hba": "on",
        "pool_passwd": _quote(""),
        "num_init_children": NUM_INIT_CHILDREN,
        "max_pool": MAX_POOL,
        "child_life_time": 300,
        "connection_life_time": 0,
        "client_idle_limit": 0,
        "connection_cache": "on",
        "reset_query_list": _quote(RESET_QUERY_LIST),
        "load_balance_mode": "off",
        "health_check_period": 0,
        "sr_check_period": 0,
        "failover_on_backend_error": "off",
        "use_watchdog": "off",
        "memory_cache_enabled": "off",
        "log_destination": _quote("stderr"),
        "logging_collector": "off",
        "log_min_messages": _quote("warning"),
        "pid_file_name": _quote(state_dir / "pgpool.pid"),
        "logdir": _quote(state_dir),
    }
    lines = [
        "# PgPool-II for the local stack: connection pooling in front of one PostgreSQL.",
        "# Pooled backend connections are reset with DISCARD ALL between clients, which",
        "# releases session advisory locks (the registry's promotion lock).",
        *(f"{name} = {value}" for name, value in settings.items()),
    ]
    return "\n".join(lines) + "\n"


# Who may connect: trust from loopback, like the local PostgreSQL. Production: scram-sha-256.
POOL_HBA = """\
# TYPE  DATABASE  USER  ADDRESS        METHOD
local   all       all                  trust
host    all       all   127.0.0.1/32   trust
"""

# No PCP user: the administration interface is not used by the local stack.
PCP_CONF = "# user:md5 password hash, one a line (pg_md5); none for the local stack\n"


@dataclass(frozen=True)
class PgCheck:
    """Readiness: ``SELECT 1`` answers through ``url`` (a libpq URL)."""

    url: str
    timeout: int = 2

    def __call__(self) -> bool:
        import psycopg2

        try:
            connection = psycopg2.connect(self.url, connect_timeout=self.timeout)
        except psycopg2.Error:
            return False
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
                return cursor.fetchone() == (1,)
        except psycopg2.Error:
            return False
        finally:
            connection.close()


def pgpool_component(settings: Settings) -> Component:
    """``pgpool`` on 127.0.0.1:``settings.pgpool_port`` in front of ``settings.database_url``.

    Its configuration, pid file, status file and (when the path is short enough) sockets live
    in ``<stack_dir>/pgpool``; the configuration is written anew at each start.
    """
    database_url = settings.database_url
    if not database_url or not is_postgresql(database_url):
        raise ConfigurationError(
            "TIRE_PGPOOL=1 needs TIRE_DATABASE_URL naming a PostgreSQL database "
            f"(got {masked_url(database_url) if database_url else 'nothing'})"
        )
    backend_host, backend_port = _backend_address(database_url)
    state_dir = settings.stack_dir.absolute()
    pool_dir = state_dir / "pgpool"
    socket_dir = pool_dir if len(str(pool_dir)) <= _MAX_SOCKET_DIR else Path(tempfile.gettempdir())
    config = pool_dir / "pgpool.conf"
    hba = pool_dir / "pool_hba.conf"
    pcp = pool_dir / "pcp.conf"

    def argv() -> list[str]:
        pool_dir.mkdir(parents=True, exist_ok=True)
        config.write_text(
            render_pgpool_config(
                backend_host=backend_host,
                backend_port=backend_port,
                port=settings.pgpool_port,
                pcp_port=free_port(),
                state_dir=pool_dir,
                socket_dir=socket_dir,
            )
        )
        hba.write_text(POOL_HBA)
        pcp.write_text(PCP_CONF)
        return [str(pgpool_binary()), "-n", "-D", "-f", str(config), "-F", str(pcp), "-a", str(hba)]

    client_url = with_address(database_url, HOST, settings.pgpool_port)
    process = ManagedProcess(
        "pgpool",
        argv,
        state_dir=state_dir,
        ready=PgCheck(libpq_url(client_url)),
        env=inherited_env(),
        cwd=pool_dir,
        title="PgPool",
        url=pgpool_url(settings),
        ports=(settings.pgpool_port,),
    )
    return Component(process, ready_timeout=30.0)
