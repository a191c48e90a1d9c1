"""URL helpers written once: masking credentials, and naming database drivers.

The lowest floor of the library: it imports nothing of tirelib, so every module may use it.

Masking is done by one :class:`Redactor`, :data:`REDACTOR`, for the whole process. It knows
three kinds of credential: the password of any ``scheme://user:password@host`` URL, the values
of query parameters and ``key=value`` pairs that name a secret (``password=``,
``X-Amz-Signature=``, ...) and the path of a Slack webhook, all found by their shape; and the
literal values of the secret settings, which :func:`tirelib.settings.load_settings` adds with
:func:`add_secrets`, so a bare AWS secret key or a database password in a driver's message is
masked as well.
"""

from __future__ import annotations

import importlib.util
import re
import threading
from collections.abc import Iterable
from urllib.parse import quote, unquote, urlsplit

MASK = "***"
# userinfo in any scheme://user:password@host URL, wherever it appears in a text.
_USERINFO_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):[^@/\s]*@")
# Query parameters and libpq-style key=value pairs whose value is a credential.
_SECRET_PARAM_RE = re.compile(
    r"(?i)(?P<key>\b(?:password|passwd|pwd|secret|secret_access_key|token|access_token|"
    r"security_token|api_key|apikey|signature|x-amz-signature|x-amz-credential|"
    r"x-amz-security-token)=)(?P<quote>['\"]?)[^&\s'\",;)]+"
)
# A Slack webhook's path is its secret.
_SLACK_WEBHOOK_RE = re.compile(
    r"(?P<keep>hooks\.slack(?:-gov)?\.com/(?:services|workflows|triggers)/)[^\s'\"]+"
)


class Redactor:
    """Masks credentials in a text: by their shape in URLs, and by the values it was given.

    Values shorter than :attr:`MIN_LENGTH` are not matched literally (they would mask ordinary
    words); the URL they sit in is still masked by its shape. Thread-safe.
    """

    MIN_LENGTH = 4

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        self._lock = threading.Lock()
        # The known values and the pattern that finds them, replaced together.
        self._known: tuple[frozenset[str], re.Pattern[str] | None] = (frozenset(), None)
        self.add(*secrets)

    @property
    def secrets(self) -> frozenset[str]:
        """The literal values masked (each also percent-encoded and -decoded)."""
        return self._known[0]

    def add(self, *values: str | None) -> None:
        """Mask ``values`` from now on, wherever they appear."""
        with self._lock:
            known = set(self._known[0])
            for value in values:
                if value:
                    forms = {value, unquote(value), quote(value, safe="")}
                    known.update(form for form in forms if len(form) >= self.MIN_LENGTH)
            if known != self._known[0]:
                # Longest first, so a secret that contains another is masked whole.
                ordered = sorted(known, key=len, reverse=True)
                self._known = (frozenset(known), re.compile("|".join(map(re.escape, ordered))))

    def __call__(self, text: str) -> str:
        _, pattern = self._known
        if pattern is not None:
            text = pattern.sub(MASK, text)
        text = _USERINFO_RE.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
        text = _SECRET_PARAM_RE.sub(lambda m: f"{m['key']}{m['quote']}{MASK}", text)
        return _SLACK_WEBHOOK_RE.sub(lambda m: f"{m['keep']}{MASK}", text)


REDACTOR = Redactor()
"""The process's redactor: every message, answer, log line and Slack text passes through it."""


def add_secrets(*values: str | None) -> None:
    """Mask ``values`` (passwords, keys, webhook URLs) in everything this process says."""
    REDACTOR.add(*values)


def url_secrets(url: str | None) -> list[str]:
    """The password inside ``url``, if it has one (as written, percent-encoded or not)."""
    if not url:
        return []
    try:
        password = urlsplit(url).password
    except ValueError:  # not a URL urllib can split; its shape is still masked
        return []
    return [password] if password else []


def masked_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, for logs and messages."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return REDACTOR(url)
    userinfo, _, host = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    return REDACTOR(f"{scheme}://{user}{':' + MASK if colon else ''}@{host}")


def mask_credentials(text: str) -> str:
    """``text`` with every credential :data:`REDACTOR` knows masked (see :class:`Redactor`)."""
    return REDACTOR(text)


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
