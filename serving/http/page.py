"""The endpoint's web page at `/`: send an image, see its top labels and an explanation heat map."""

from __future__ import annotations

import html
from functools import cache
from pathlib import Path

from serving.config import EndpointConfig

PAGE = Path(__file__).with_name("page.html")
# Everything the page uses is in it: nothing is fetched from elsewhere, and no other script runs.
POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src blob:; "
          "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")


@cache
def _template() -> str:
    return PAGE.read_text(encoding="utf-8")


def render_page(config: EndpointConfig) -> str:
    """The page for this endpoint (its name, and whether a scoring key is asked for)."""
    return (_template().replace("{{endpoint}}", html.escape(config.name))
            .replace("{{auth_mode}}", html.escape(config.auth_mode)))
