"""Fixtures of the core tests; shared helpers are in helpers.py (`from helpers import tiny_vit`)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
