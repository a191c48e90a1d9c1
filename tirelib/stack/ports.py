"""Ports on 127.0.0.1 and readiness checks: what a server needs before and after it starts.

A port is free when a server could bind it now. Connections a stopped server left in
``TIME_WAIT`` do not count: servers bind with ``SO_REUSEADDR`` (Go, uvicorn and gunicorn all
do), which the kernel lets through past ``TIME_WAIT`` but never past a listening socket, so the
check binds the same way. Without it a ``stack down`` followed by ``stack up`` would see
"port in use" for about a minute.
"""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from dataclasses import dataclass

from tirelib.errors import StackError

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Whether a server could bind ``port`` on 127.0.0.1 now.

    Binds as servers do, with ``SO_REUSEADDR``: a listening socket makes the port taken,
    connections lingering in ``TIME_WAIT`` after a server stopped do not.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def free_port_pair(offset: int, attempts: int = 100) -> int:
    """A free port ``p`` such that ``p + offset`` is free too (a SeaweedFS HTTP/gRPC pair)."""
    for _ in range(attempts):
        port = free_port()
        if port + offset <= 65535 and port_is_free(port + offset):
            return port
    raise StackError(f"found no free pair of ports {offset} apart on {HOST}")


@dataclass(frozen=True)
class HttpCheck:
    """Readiness: ``url`` answers a GET, with ``status`` when given, with anything when None."""

    url: str
    status: int | None = 200
    timeout: float = 2.0

    def __call__(self) -> bool:
        # No proxies: a loopback check must not travel through $http_proxy.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(self.url, timeout=self.timeout) as response:
                code = int(response.status)
        except urllib.error.HTTPError as error:
            code = error.code
        except (urllib.error.URLError, OSError):
            return False
        return self.status is None or code == self.status
