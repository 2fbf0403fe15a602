"""The gateway's configuration: one frozen dataclass, from flags or environment, validated once."""

from __future__ import annotations

import os
from dataclasses import dataclass

from pagewire.tools.parsers import PARSERS

from .protocol import MAX_N


@dataclass(frozen=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    """Interface the HTTP server binds."""
    port: int = 8000
    """HTTP port; 0 picks a free one."""
    tokenizer_address: str = "127.0.0.1:50051"
    """host:port of the tokenizer service."""
    router_address: str = "127.0.0.1:50071"
    """host:port of the router service."""
    api_key: str | None = None
    """When set, every /v1 request must carry `Authorization: Bearer <api_key>`."""
    request_timeout_s: float = 600.0
    """End-to-end deadline of one generation, handed to the router as timeout_ms."""
    keep_alive_s: float = 75.0
    """How long an idle HTTP connection stays open. Longer than clients keep theirs (httpx and
    the openai SDK drop idle ones after 5 s), so the client closes first: a server that closes
    first races a client reusing the connection, which gets "disconnected without a response"
    for a request the gateway never saw."""
    max_body_bytes: int = 8 << 20
    """Largest request body; a bigger one gets 413 (a 128k-token chat is about 0.5 MB)."""
    max_n: int = 8
    """Most choices one request may ask for (`n`); each is its own sequence on a worker."""
    max_stop_strings: int = 16
    """Most stop strings in one request."""
    max_stop_string_chars: int = 256
    """Longest stop string, in characters: the matcher's automaton grows with their total size
    (about 0.25 kB per character), and requests' automata are cached."""
    tool_call_parser: str = "hermes"
    """How tool_choice "auto" finds calls in the model's text (pagewire.tools.parsers: hermes,
    llama3_json, mistral; vLLM's names). hermes also reads the format pagewire's own tool
    prompt teaches models whose chat template knows no tools."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        if self.keep_alive_s <= 0:
            raise ValueError(f"keep_alive_s must be > 0, got {self.keep_alive_s}")
        if self.max_body_bytes <= 0:
            raise ValueError(f"max_body_bytes must be > 0, got {self.max_body_bytes}")
        if self.api_key == "":
            raise ValueError("api_key must be non-empty when set")
        if not 1 <= self.max_n <= MAX_N:
            raise ValueError(f"max_n must be in 1..{MAX_N}, got {self.max_n}")
        if self.max_stop_strings < 0:
            raise ValueError(f"max_stop_strings must be >= 0, got {self.max_stop_strings}")
        if self.max_stop_string_chars < 1:
            raise ValueError("max_stop_string_chars must be >= 1, got "
                             f"{self.max_stop_string_chars}")
        if self.tool_call_parser not in PARSERS:
            raise ValueError(f"tool_call_parser must be one of {', '.join(PARSERS)}, got "
                             f"{self.tool_call_parser!r}")

    @classmethod
    def from_env(cls) -> GatewayConfig:
        env = os.environ
        defaults = cls()
        return cls(
            host=env.get("PAGEWIRE_GATEWAY_HOST", defaults.host),
            port=int(env.get("PAGEWIRE_GATEWAY_PORT", defaults.port)),
            tokenizer_address=env.get("PAGEWIRE_TOKENIZER_ADDRESS", defaults.tokenizer_address),
            router_address=env.get("PAGEWIRE_ROUTER_ADDRESS", defaults.router_address),
            api_key=env.get("PAGEWIRE_API_KEY") or None,
            request_timeout_s=float(env.get("PAGEWIRE_GATEWAY_REQUEST_TIMEOUT_S",
                                            defaults.request_timeout_s)),
            keep_alive_s=float(env.get("PAGEWIRE_GATEWAY_KEEP_ALIVE_S", defaults.keep_alive_s)),
            max_body_bytes=int(env.get("PAGEWIRE_GATEWAY_MAX_BODY_BYTES",
                                       defaults.max_body_bytes)),
            max_n=int(env.get("PAGEWIRE_GATEWAY_MAX_N", defaults.max_n)),
            max_stop_strings=int(env.get("PAGEWIRE_GATEWAY_MAX_STOP_STRINGS",
                                         defaults.max_stop_strings)),
            max_stop_string_chars=int(env.get("PAGEWIRE_GATEWAY_MAX_STOP_STRING_CHARS",
                                              defaults.max_stop_string_chars)),
            tool_call_parser=env.get("PAGEWIRE_TOOL_CALL_PARSER", defaults.tool_call_parser),
        )
