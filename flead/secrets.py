"""Credentials and keys: taken from the environment, else generated once into the state folder.

Every secret has a name (``model_signing_key``, ``db_password``, ...). Its value is, in order:

1. the environment variable ``FLEAD_<NAME>`` (upper case), for deployments that manage secrets;
2. the file ``<state_dir>/secrets/<name>``, written at first use with mode 0600 in a 0700 folder.

Nothing here prints or logs a value. Two processes asking for the same new secret at once get
the same value: the file is created exclusively, and the loser of the race reads the winner's.
"""

from __future__ import annotations

import os
import secrets as _random
from collections.abc import Mapping
from pathlib import Path

_BYTES = 32


def secrets_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "secrets"


def env_name(name: str) -> str:
    return f"FLEAD_{name.upper()}"


def secret(state_dir: Path, name: str, env: Mapping[str, str] | None = None) -> str:
    """The secret ``name``: from ``FLEAD_<NAME>``, else the state folder's file (created with a
    fresh random value at first use)."""
    if not name.replace("_", "").isalnum():
        raise ValueError(f"secret names are letters, digits and '_': {name!r}")
    env = os.environ if env is None else env
    from_env = env.get(env_name(name))
    if from_env:
        return from_env
    folder = secrets_dir(state_dir)
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    path = folder / name
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read(path)
    value = _random.token_urlsafe(_BYTES)
    with os.fdopen(fd, "w") as out:
        out.write(value)
    return value


def _read(path: Path) -> str:
    value = path.read_text().strip()
    if not value:  # the creator has not written yet: the value is a moment away
        import time

        for _ in range(50):
            time.sleep(0.01)
            value = path.read_text().strip()
            if value:
                break
    if not value:
        raise RuntimeError(f"secret file {path} is empty: delete it to generate a new one")
    return value


# --- passwords in connection URLs --------------------------------------------------------------

REDACTED = "***"


def url_password(url: str) -> str | None:
    """The password written in ``url`` (percent-decoded), or None."""
    from urllib.parse import unquote, urlsplit

    password = urlsplit(url).password
    return None if password is None else unquote(password)


def url_with_password(url: str, password: str) -> str:
    """``url`` with ``password`` set (percent-encoded: an environment-provided password may hold
    ``@``, ``:`` or ``/``)."""
    from urllib.parse import quote

    return _with_netloc_password(url, quote(password, safe=""))


def _with_netloc_password(url: str, encoded: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if not parts.username:
        raise ValueError("a password needs a user name in the URL")
    host = parts.netloc.rpartition("@")[2]  # host[:port] exactly as written
    return parts._replace(netloc=f"{parts.username}:{encoded}@{host}").geturl()


def redact_url(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***`` (for printing and logs)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        return _with_netloc_password(url, REDACTED)
    except ValueError:
        return url


def redact(text: str, values: list[str] | set[str]) -> str:
    """``text`` with every one of ``values`` (and its percent-encoded form) replaced by ``***``."""
    from urllib.parse import quote

    for value in sorted({v for v in values if v}, key=len, reverse=True):
        text = text.replace(value, REDACTED).replace(quote(value, safe=""), REDACTED)
    return text


def known_values(state_dir: Path, urls: list[str] = ()) -> set[str]:
    """Every secret a report could leak: the passwords in ``urls``, the ``FLEAD_*`` secrets of
    the environment and the values stored in the state folder (read, never created)."""
    values = {p for p in (url_password(u) for u in urls) if p}
    for name in ("db_password", "db_admin_password", "grafana_db_password"):
        if os.environ.get(env_name(name)):
            values.add(os.environ[env_name(name)])
    folder = secrets_dir(state_dir)
    if folder.is_dir():
        for path in folder.iterdir():
            try:
                value = path.read_text().strip()
            except OSError:  # another user's state folder: nothing of it can be printed either
                continue
            if value:
                values.add(value)
    return values
