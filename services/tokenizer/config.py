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

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535]; got {self.port}")
        if not self.host:
            raise ValueError("host must not be empty")
        if self.max_message_bytes <= 0:
            raise ValueError(f"max_message_bytes must be > 0; got {self.max_message_bytes}")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def from_env(cls) -> TokenizerConfig:
        """Reads PAGEWIRE_MODEL, PAGEWIRE_TOKENIZER_HOST and PAGEWIRE_TOKENIZER_PORT."""
        port = os.environ.get("PAGEWIRE_TOKENIZER_PORT") or str(DEFAULT_PORT)
        try:
            port_number = int(port)
        except ValueError:
            raise ValueError(f"PAGEWIRE_TOKENIZER_PORT must be an integer; got {port!r}") from None
        return cls(
            model=os.environ.get("PAGEWIRE_MODEL") or None,
            host=os.environ.get("PAGEWIRE_TOKENIZER_HOST") or DEFAULT_HOST,
            port=port_number,
        )
