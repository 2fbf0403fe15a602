"""Real Redis for integration tests: the server CI runs on 127.0.0.1:6379, one key prefix per
test, every key under it deleted afterwards."""

from __future__ import annotations

import os

REDIS_URL = os.environ.get("PAGEWIRE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def delete_namespace(client, namespace: str) -> None:
    keys = list(client.scan_iter(match=f"{namespace}:*"))
    if keys:
        client.delete(*keys)
