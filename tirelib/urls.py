"""URL helpers written once: masking credentials, and naming database drivers.

The lowest floor of the library: it imports nothing of tirelib, so every module may use it.
"""

from __future__ import annotations

import importlib.util
import re

# userinfo in any scheme://user:password@host URL, wherever it appears in a text.
_USERINFO_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):[^@/\s]*@")


def masked_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, for logs and messages."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, _, host = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{host}"


def mask_credentials(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` URL in it masked."""
    return _USERINFO_RE.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


def sqlalchemy_url(url: str) -> str:
    """``url`` with a PostgreSQL driver SQLAlchemy can load.

    SQLAlchemy 2.1 reads a bare ``postgresql://`` as psycopg 3; where only psycopg2 is
    installed, name it explicitly. URLs that name a driver, and other databases, pass unchanged.
    """
    scheme, sep, rest = url.partition("://")
    if sep and scheme in {"postgresql", "postgres"}:
        has_psycopg3 = importlib.util.find_spec("psycopg") is not None
        if not has_psycopg3 and importlib.util.find_spec("psycopg2") is not None:
            return f"postgresql+psycopg2://{rest}"
    return url


def libpq_url(url: str) -> str:
    """A SQLAlchemy URL (``postgresql+psycopg2://...``) as libpq reads it (``postgresql://``)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    base = scheme.split("+", 1)[0]
    return f"{'postgresql' if base == 'postgres' else base}://{rest}"


def is_postgresql(url: str | None) -> bool:
    """Whether ``url`` names a PostgreSQL database (any driver)."""
    return bool(url) and str(url).split("://", 1)[0].split("+", 1)[0] in {"postgresql", "postgres"}


def with_address(url: str, host: str, port: int) -> str:
    """``url`` pointed at ``host:port`` instead, keeping its scheme, user, password and path."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"not a URL with a host: {masked_url(url)!r}")
    authority, slash, path = rest.partition("/")
    userinfo, at, _ = authority.rpartition("@")
    return f"{scheme}://{userinfo}{at}{host}:{port}{slash}{path}"
