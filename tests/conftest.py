"""Shared test set-up: every test runs with one torch thread.

The suite's models are tiny; with several threads on a busy 2-core machine their small ops slow down 5–10×.
"""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def single_torch_thread() -> Iterator[None]:
    """torch.set_num_threads(1) for the whole session, restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
