"""Shared pytest fixtures."""

from collections.abc import Iterator

import pytest
import torch

from actstore.testing.s3_server import s3_server, s3_url  # noqa: F401 - fixtures: a SeaweedFS S3 server on loopback


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models on a shared machine: two threads mostly wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
