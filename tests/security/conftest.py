"""One disaggregated stack (tokenizer, router, a prefill and a decode worker, gateway) on
loopback for every bad-input and security test of this folder: each test must leave it serving."""

from __future__ import annotations

import pytest

from tests.integration.conftest import client, model  # noqa: F401 - shared fixtures
from tests.integration.stack import Stack


@pytest.fixture(scope="package")
def stack():
    stack = Stack(roles=("prefill", "decode"))
    yield stack
    stack.stop()
