"""The tokenizer service's configuration: one frozen dataclass, from flags or environment.

Validated at construction, so a bad port fails at start and never at the first request.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50051
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a 128k-token prompt is ~0.5 MiB of ids


@dataclass(frozen=True)
class TokenizerConfig:
    """Everything the tokenizer service needs to start."""

    model: str | None = None
    """A Hugging Face model directory, a .gguf file, or None for the embedded SmolLM2-135M."""
    host: str = DEFAULT_HOST
    """Interface to listen on; loopback by default (use 0.0.0.0 in a container)."""
    port: int = DEFAULT_PORT
    """TCP port; 0 picks a free one (the server reports it as `server.bound_port`)."""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    """Largest gRPC message received or sent, in bytes."""
    max_model_len: int | None = None
    """The deployment's context limit, as the workers run it (the same PAGEWIRE_MAX_MODEL_LEN):
    the gateway checks prompts and max_tokens against it. None: the model's own."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535]; got {self.port}")
        if not self.host:
            raise ValueError("host must not be empty")
        if self.max_message_bytes <= 0:
            raise ValueError(f"max_message_bytes must be > 0; got {self.max_message_bytes}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2; got {self.max_model_len}")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def from_env(cls) -> TokenizerConfig:
        """Reads PAGEWIRE_MODEL, PAGEWIRE_TOKENIZER_HOST, PAGEWIRE_TOKENIZER_PORT,
        PAGEWIRE_TOKENIZER_MAX_MESSAGE_BYTES and PAGEWIRE_MAX_MODEL_LEN."""
        max_model_len = _int_env("PAGEWIRE_MAX_MODEL_LEN")
        return cls(
            model=os.environ.get("PAGEWIRE_MODEL") or None,
            host=os.environ.get("PAGEWIRE_TOKENIZER_HOST") or DEFAULT_HOST,
            port=_int_env("PAGEWIRE_TOKENIZER_PORT") or DEFAULT_PORT,
            max_message_bytes=(_int_env("PAGEWIRE_TOKENIZER_MAX_MESSAGE_BYTES")
                               or DEFAULT_MAX_MESSAGE_BYTES),
            max_model_len=max_model_len,
        )


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer; got {value!r}") from None
