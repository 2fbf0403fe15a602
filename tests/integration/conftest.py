"""Fixtures for tests that talk to real servers on loopback."""

from __future__ import annotations

import uuid

import pytest
import redis

from tests.integration.redis_helpers import REDIS_URL, delete_namespace


@pytest.fixture
def redis_client():
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"these tests need a Redis server at {REDIS_URL} (CI runs one): {exc}")
    yield client
    client.close()


@pytest.fixture
def namespace(redis_client):
    """A key prefix of this test's own; every key under it is deleted afterwards."""
    ns = f"pwtest-{uuid.uuid4().hex}"
    yield ns
    delete_namespace(redis_client, ns)


# For modules that define a module-scoped `stack` (tests/integration/stack.py): its OpenAI
# client and the model it serves.
@pytest.fixture(scope="module")
def client(stack):
    return stack.client()


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id
