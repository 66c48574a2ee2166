"""Endpoint keys: two scoring keys and one admin key, from the environment, else generated on first start and kept in a
0600 file; checked in constant time against their sha256 digests. Keys are never logged."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from filelock import FileLock

from serving.control.private_files import replace_private
from serving.environment import ADMIN_ENV, PRIMARY_ENV, SECONDARY_ENV

KEY_BYTES = 32
KeyKind = Literal["primary", "secondary", "admin"]
KEY_KINDS: tuple[KeyKind, ...] = ("primary", "secondary", "admin")


def endpoint_dir(endpoint: str) -> Path:
    """Where an endpoint keeps its state: `<lantern home>/endpoints/<name>`, next to the registry store."""
    from registry.store import lantern_home  # MLflow is imported with it: not for CLI commands that only talk HTTP

    return lantern_home() / "endpoints" / endpoint


def credentials_path(endpoint: str) -> Path:
    return endpoint_dir(endpoint) / "credentials.json"


@dataclass(frozen=True)
class ScoringKeys:
    primary: str
    secondary: str
    source: str  # "environment", "file" or "generated"


@dataclass(frozen=True)
class AdminKey:
    key: str
    source: str  # "environment", "file" or "generated"


def new_key() -> str:
    return secrets.token_urlsafe(KEY_BYTES)


def _write_private(path: Path, data: dict[str, str]) -> None:
    """Write `data` as JSON readable by the owner only (the file is created 0600, then moved into place)."""
    replace_private(path, json.dumps(data), path.with_name(path.name + ".tmp"))


def _lock(endpoint: str) -> FileLock:
    folder = endpoint_dir(endpoint)
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / "credentials.lock"), timeout=60)


def _stored_keys(endpoint: str) -> tuple[dict[str, str], bool]:
    """The keys file's content, with any missing key generated and stored; True when something was generated."""
    path = credentials_path(endpoint)
    with _lock(endpoint):
        stored = json.loads(path.read_text()) if path.exists() else {}
        missing = [kind for kind in KEY_KINDS if not stored.get(kind)]
        if missing:
            stored.update({kind: new_key() for kind in missing})
            _write_private(path, stored)
    return stored, bool(missing)


def scoring_keys(endpoint: str) -> ScoringKeys:
    """`$LANTERN_API_KEY` / `$LANTERN_API_KEY_SECONDARY` when set; else the stored keys, generated on first use."""
    primary, secondary = os.environ.get(PRIMARY_ENV), os.environ.get(SECONDARY_ENV)
    if primary:
        return ScoringKeys(primary, secondary or primary, "environment")
    stored, generated = _stored_keys(endpoint)
    return ScoringKeys(stored["primary"], stored["secondary"], "generated" if generated else "file")


def admin_key(endpoint: str) -> AdminKey:
    """`$LANTERN_ADMIN_KEY` when set; else the stored admin key, generated on first use."""
    if os.environ.get(ADMIN_ENV):
        return AdminKey(os.environ[ADMIN_ENV], "environment")
    stored, generated = _stored_keys(endpoint)
    return AdminKey(stored["admin"], "generated" if generated else "file")


def key_variable(kind: KeyKind) -> str:
    """The environment variable that gives `kind` keys (the secondary one comes with the primary)."""
    return ADMIN_ENV if kind == "admin" else PRIMARY_ENV


def regenerate_key(endpoint: str, kind: KeyKind) -> tuple[str, str | None]:
    """A new `kind` key and the file it is stored in: the keys file, or none when the environment gives this host's
    keys (the old key stops working once the endpoint state has the new one's digest, in every host; a restart keeps
    the new one unless the environment's key changes)."""
    if os.environ.get(key_variable(kind)):
        return new_key(), None
    with _lock(endpoint):
        path = credentials_path(endpoint)
        stored = json.loads(path.read_text()) if path.exists() else {}
        stored[kind] = new_key()
        missing = {k: new_key() for k in KEY_KINDS if not stored.get(k)}
        stored.update(missing)
        _write_private(path, stored)
    return stored[kind], str(path)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyCheck:
    """Compares a presented key with known keys' digests in constant time (every digest, every time)."""

    def __init__(self, digests: Iterable[str]) -> None:
        self._digests = tuple(bytes.fromhex(d) for d in digests)

    def accepts(self, presented: str) -> bool:
        digest = bytes.fromhex(key_digest(presented))
        matches = [hmac.compare_digest(digest, known) for known in self._digests]  # all compared, always
        return any(matches)


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
