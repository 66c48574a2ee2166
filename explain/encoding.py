"""Attribution arrays for clients: nested float lists (float32 or float16 precision) or a base64 `.npy` file."""

from __future__ import annotations

import base64
import io
from typing import Literal

import numpy as np

AttributionEncoding = Literal["float32", "float16", "npy_base64"]


def encode_attributions(array: np.ndarray, encoding: AttributionEncoding) -> list | str:
    """`array` [3, H, W] as JSON-ready data: lists of floats (rounded to float16 if asked), or a base64 .npy
    file (float16: 2 bytes a value, what `np.load(io.BytesIO(base64.b64decode(s)))` reads back)."""
    if encoding == "float32":
        return array.astype(np.float32).tolist()
    if encoding == "float16":
        return array.astype(np.float16).astype(np.float32).tolist()
    buffer = io.BytesIO()
    np.save(buffer, array.astype(np.float16), allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_npy_base64(text: str) -> np.ndarray:
    """The inverse of the `npy_base64` encoding (pickles refused)."""
    return np.load(io.BytesIO(base64.b64decode(text)), allow_pickle=False)
