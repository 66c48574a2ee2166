"""References to registered models as users write them: `models:/NAME/VERSION`, `models:/NAME@ALIAS`, `models:/NAME`
(and NAME, NAME/VERSION, NAME@ALIAS where a short form is accepted). Parsing only: no MLflow here, so configuration
checks import it at no cost."""

from __future__ import annotations

import re
from dataclasses import dataclass

from registry.errors import LanternError, SpecError

# Matched whole (fullmatch: `$` would let a trailing newline through), in ASCII: names and aliases as Lantern registers
# them, versions in ASCII digits.
MODEL_NAME = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}"
ALIAS = r"[A-Za-z_][A-Za-z0-9_\-]{0,63}"
NAME_PATTERN = re.compile(MODEL_NAME)
ALIAS_PATTERN = re.compile(ALIAS)
URI_PATTERN = re.compile(rf"models:/(?P<name>{MODEL_NAME})(?:/(?P<version>[0-9]+)|@(?P<alias>{ALIAS}))?")
SHORT_PATTERN = re.compile(rf"(?P<name>{MODEL_NAME})(?:/(?P<version>[0-9]+)|@(?P<alias>{ALIAS}))?")


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference: a name with a version, an alias, or neither (the latest version)."""

    name: str
    version: int | None = None
    alias: str | None = None

    @property
    def uri(self) -> str:
        if self.version is not None:
            return version_uri(self.name, self.version)
        if self.alias is not None:
            return f"models:/{self.name}@{self.alias}"
        return f"models:/{self.name}"


def validate_alias(alias: str) -> str:
    if not ALIAS_PATTERN.fullmatch(alias or "") or alias.lower() == "latest" or re.fullmatch(r"v\d+", alias.lower()):
        raise SpecError(
            f"invalid alias {alias!r}: use letters, digits, '_' and '-', starting with a letter; "
            "'latest' and 'v<number>' are reserved"
        )
    return alias


def parse_model_ref(text: str, allow_short: bool = True) -> ModelRef:
    """Parse `models:/NAME/VERSION`, `models:/NAME@ALIAS`, `models:/NAME` (and NAME, NAME/V, NAME@A if short)."""
    match = URI_PATTERN.fullmatch(text) or (SHORT_PATTERN.fullmatch(text) if allow_short else None)
    if not match:
        accepted = "models:/NAME/VERSION or models:/NAME@ALIAS" + (
            " (or NAME, NAME/VERSION, NAME@ALIAS)" if allow_short else "")
        raise LanternError(f"not a registered model reference: {text!r}; accepted: {accepted}")
    version = match.group("version")
    return ModelRef(match.group("name"), int(version) if version else None, match.group("alias"))


def version_uri(name: str, version: int | str) -> str:
    """`models:/NAME/N`: the URI of exactly one version (what an alias resolved to)."""
    return f"models:/{name}/{version}"
