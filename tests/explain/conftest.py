"""A small untrained CNN for the explanation tests of this folder."""

from __future__ import annotations

import pytest
import torch

from registry.small_cnn import SmallCNN


@pytest.fixture(scope="module")
def cnn() -> SmallCNN:
    torch.manual_seed(1)
    return SmallCNN(3).eval()
