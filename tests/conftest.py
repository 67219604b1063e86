"""Shared test setup: CPU only, offline, 2 threads, fixed seeds."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

FIXTURES = os.environ.get("HEAR_FIXTURES", os.path.join(os.path.dirname(__file__), "fixtures", "infinity"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def fixtures_dir():
    """Folder of the official-code parity fixtures (env HEAR_FIXTURES overrides)."""
    return FIXTURES
