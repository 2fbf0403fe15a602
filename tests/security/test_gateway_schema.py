"""schemathesis against the gateway's own OpenAPI schema, in-process (ASGI) on the stack's
tokenizer and router: valid and invalid requests drawn from the schema must never get a 5xx, and
every error must come in OpenAI's shape {"error": {"message", "type", "param", "code"}}.

Bounded for CI: a fixed number of derandomized examples per route, and generated requests ask
for a few tokens at most (the decode work is not what is tested here).

The cases come from schemathesis's own strategies, run by hypothesis, not from its pytest
plugin: that plugin writes pytest's private `Item._nodeid`, which pytest 9.2 removed
(schemathesis 4.32.5, the newest, still does).
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
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


@pytest.fixture(scope="module")
def gateway_schema(stack):
    yield schemathesis.openapi.from_asgi("/openapi.json", create_app(stack.gateway_config))
    asgi.shutdown_lifespans()  # closes the app's gRPC channels


def _cheap(body, model: str):
    """The served model's name where the case has a string there, and a few tokens of a few
    choices at most."""
    if not isinstance(body, dict):
        return body
    if isinstance(body.get("model"), str):
        body["model"] = model
    for field, most, valid_up_to in (("max_tokens", MAX_TOKENS, 8192),
                                      ("max_completion_tokens", MAX_TOKENS, 8192),
                                      ("n", MAX_N, 8)):
        value = body.get(field)  # 1000.0 counts: an integral float is a valid integer
        if _number(value) and most < value <= valid_up_to:
            body[field] = most
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = MAX_TOKENS  # the defaults: 16, and for chat the whole context
    return body


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@schemathesis.check
def openai_error_shape(ctx, response, case):
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, negative_data_rejection, openai_error_shape]


def test_gateway_answers_every_request_from_its_schema(gateway_schema, model):
    operations = [result.ok() for result in gateway_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions"}
    for operation in operations:  # valid and invalid requests, as the schema allows
        cases = st.one_of([operation.as_strategy(generation_mode=mode)
                           for mode in schemathesis.GenerationMode])

        @given(case=cases)
        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def answers(case):
            case.body = _cheap(case.body, model)
            case.call_and_validate(checks=CHECKS)

        answers()
