"""What a client accepts: the answer's media type (`Accept`) and content coding (`Accept-Encoding`), by their q-values
(RFC 9110 section 12.5)."""

from __future__ import annotations


def qualities(header: str | None) -> dict[str, float]:
    """`"gzip;q=0.5, br"` -> `{"gzip": 0.5, "br": 1.0}`: each listed item (lower-cased) with its q (1 when not given;
    0 when it cannot be read, which admits nothing). An item listed twice keeps its highest q."""
    listed: dict[str, float] = {}
    for item in (header or "").split(","):
        token, *params = [part.strip() for part in item.split(";")]
        if not token:
            continue
        quality = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = min(max(float(value), 0.0), 1.0)
                except ValueError:
                    quality = 0.0
        token = token.lower()
        listed[token] = max(listed.get(token, 0.0), quality)
    return listed


def accepts_gzip(header: str | None) -> bool:
    """Whether an `Accept-Encoding` header admits gzip: named (or `x-gzip`) with a non-zero q, or through `*` when it
    is not named at all."""
    listed = qualities(header)
    named = [listed[coding] for coding in ("gzip", "x-gzip") if coding in listed]
    if named:
        return max(named) > 0
    return listed.get("*", 0.0) > 0


def media_quality(listed: dict[str, float], media_type: str, explicit_only: bool = False) -> float:
    """The q an `Accept` header gives `media_type`: its most specific matching range's (`type/sub`, then `type/*`,
    then `*/*` unless `explicit_only`); 0 when none matches."""
    kind = media_type.split("/")[0]
    for media_range in (media_type, f"{kind}/*") + (() if explicit_only else ("*/*",)):
        if media_range in listed:
            return listed[media_range]
    return 0.0


def prefers_png(accept: str | None) -> bool:
    """Whether `/explain` answers with the PNG rather than JSON (the default): when the `Accept` header names PNG
    (`image/png` or `image/*`) with a q above 0 and at least JSON's. `*/*` alone, or `image/png;q=0`, is JSON."""
    listed = qualities(accept)
    png = media_quality(listed, "image/png", explicit_only=True)
    return png > 0 and png >= media_quality(listed, "application/json")
