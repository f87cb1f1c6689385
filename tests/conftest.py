"""Every test starts from the same global RNG state, whatever ran before it (no order-dependent inputs)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)
    yield
