"""A real third-party client against `pagewire up` (one prefill and one decode worker, real
processes): LangChain's ChatOpenAI binds tools and asks for structured output exactly as it does
against OpenAI or vLLM, and gets tool calls and objects that validate."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import BaseModel, Field

from tests.integration.up_process import UpProcess

langchain_openai = pytest.importorskip("langchain_openai")
pytestmark = pytest.mark.slow


class City(BaseModel):
    """A city, the country and the continent it is in."""

    name: str = Field(max_length=30)
    country: str = Field(max_length=30)
    continent: Literal["Africa", "America", "Asia", "Europe", "Oceania"]


def get_weather(city: str, unit: str) -> str:
    """The weather in a city now.

    Args:
        city: the city's name
        unit: celsius or fahrenheit
    """
    return f"21 degrees {unit} in {city}"


@pytest.fixture(scope="module")
def base_url():
    up = UpProcess("--kv-cache-bytes", str(256 << 20), "--max-model-len", "2048")
    try:
        up.wait_ready()
        yield up.base_url
    finally:
        up.stop()


def chat_model(base_url: str):
    return langchain_openai.ChatOpenAI(model="SmolLM2-135M-Instruct", base_url=base_url,
                                       api_key="unused", temperature=0, max_tokens=120,
                                       max_retries=0)


def test_bind_tools_returns_calls_langchain_parses(base_url):
    model = chat_model(base_url).bind_tools([get_weather], tool_choice="get_weather")
    reply = model.invoke("What is the weather like in Lisbon?")
    (call,) = reply.tool_calls
    assert call["name"] == "get_weather" and call["id"]
    assert set(call["args"]) == {"city", "unit"} and isinstance(call["args"]["city"], str)
    assert reply.response_metadata["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output_returns_a_valid_object(base_url, method):
    """Both of LangChain's ways that carry the schema (its json_mode leaves the keys to the
    prompt, which a 135M model does not follow)."""
    model = chat_model(base_url).with_structured_output(City, method=method)
    city = model.invoke("Paris: give its name, its country and its continent.")
    assert isinstance(city, City) and city.name and city.country
