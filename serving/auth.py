"""Scoring keys: from the environment, else generated on first start and kept in a 0600 file; checked in constant
time. Keys are never logged."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from registry.store import lantern_home

PRIMARY_ENV = "LANTERN_API_KEY"
SECONDARY_ENV = "LANTERN_API_KEY_SECONDARY"
KEY_BYTES = 32


def endpoint_dir(endpoint: str) -> Path:
    """Where an endpoint keeps its state: `<lantern home>/endpoints/<name>`."""
    return lantern_home() / "endpoints" / endpoint


def credentials_path(endpoint: str) -> Path:
    return endpoint_dir(endpoint) / "credentials.json"


@dataclass(frozen=True)
class ScoringKeys:
    primary: str
    secondary: str
    source: str  # "environment", "file" or "generated"


def new_key() -> str:
    return secrets.token_urlsafe(KEY_BYTES)


def _write_private(path: Path, data: dict[str, str]) -> None:
    """Write `data` as JSON readable by the owner only (the file is created 0600, then moved into place)."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.unlink(missing_ok=True)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(data, handle)
    os.replace(temporary, path)


def stored_keys(endpoint: str) -> ScoringKeys | None:
    """The keys kept in the endpoint's credentials file, if there is one."""
    path = credentials_path(endpoint)
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return ScoringKeys(data["primary"], data["secondary"], "file")


def scoring_keys(endpoint: str) -> ScoringKeys:
    """`$LANTERN_API_KEY` / `$LANTERN_API_KEY_SECONDARY` when set; else the stored keys, generated on first use."""
    primary, secondary = os.environ.get(PRIMARY_ENV), os.environ.get(SECONDARY_ENV)
    if primary:
        return ScoringKeys(primary, secondary or primary, "environment")
    folder = endpoint_dir(endpoint)
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / "credentials.lock"), timeout=60):
        existing = stored_keys(endpoint)
        if existing is not None:
            return existing
        keys = {"primary": new_key(), "secondary": new_key()}
        _write_private(credentials_path(endpoint), keys)
    return ScoringKeys(keys["primary"], keys["secondary"], "generated")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyCheck:
    """Compares a presented key with both scoring keys in constant time (only their digests are kept)."""

    def __init__(self, keys: ScoringKeys) -> None:
        self._digests = (_digest(keys.primary), _digest(keys.secondary))

    def accepts(self, presented: str) -> bool:
        digest = _digest(presented)
        matches = [hmac.compare_digest(digest, known) for known in self._digests]  # both compared, always
        return any(matches)


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
