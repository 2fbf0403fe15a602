"""schemathesis against the gateway's own OpenAPI schema, in-process (ASGI) on the stack's
tokenizer and router: valid and invalid requests drawn from the schema must never get a 5xx, and
every error must come in OpenAI's shape {"error": {"message", "type", "param", "code"}}.

Bounded for CI: a fixed number of derandomized examples per route, and generated requests ask
for a few tokens at most (the decode work is not what is tested here).
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.python import asgi

from pagewire.services.gateway.app import create_app

MAX_EXAMPLES = 25
MAX_TOKENS = 4
MAX_N = 2
schema = schemathesis.pytest.from_fixture("gateway_schema")


@pytest.fixture(scope="module")
def gateway_schema(stack):
    loaded = schemathesis.openapi.from_asgi("/openapi.json", create_app(stack.gateway_config))
    loaded.config.generation.update(modes=list(schemathesis.GenerationMode))
    yield loaded
    asgi.shutdown_lifespans()  # closes the app's gRPC channels


def _cheap(body, model: str):
    """The served model's name where the case has a string there, and a few tokens of a few
    choices at most."""
    if not isinstance(body, dict):
        return body
    if isinstance(body.get("model"), str):
        body["model"] = model
    for field in ("max_tokens", "max_completion_tokens"):
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and MAX_TOKENS < value < 8192:
            body[field] = MAX_TOKENS
    if isinstance(body.get("n"), int) and MAX_N < body["n"] <= 8:
        body["n"] = MAX_N
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = MAX_TOKENS  # the defaults: 16, and for chat the whole context
    return body


@schemathesis.check
def openai_error_shape(ctx, response, case):
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_gateway_answers_every_request_from_its_schema(case, model):
    case.body = _cheap(case.body, model)
    case.call_and_validate(checks=[
        not_a_server_error, status_code_conformance, content_type_conformance,
        response_schema_conformance, negative_data_rejection, openai_error_shape])
