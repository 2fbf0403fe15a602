"""Speculative decoding's settings, in vLLM's shape: `speculative_config={"method": "ngram",
"num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}` or
`{"method": "draft_model", "model": PATH, "num_speculative_tokens": k}`; the same dict as JSON
for workers and `pagewire up` (`--speculative-config`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

METHODS = ("ngram", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int = 4
    """ngram: the longest suffix of the sequence searched for earlier in it."""
    prompt_lookup_min: int = 2
    """ngram: the shortest suffix worth a proposal (a one-token match guesses too often)."""
    model: str | None = None
    """draft_model: its folder or .gguf file (it must share the target's vocabulary)."""
    disable_by_batch_size: int | None = None
    """No speculation in a step with more running sequences than this: verifying k extra tokens
    per sequence stops paying once the step is compute bound. None: the engine's measured
    default for its device (spec_decode.policy)."""
    min_acceptance_rate: float = 0.1
    """A request whose drafts are accepted less often than this (after `warmup_drafts` draft
    tokens) speculates no more."""
    warmup_drafts: int = 32

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative method must be one of {METHODS}, got {self.method!r}")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError("num_speculative_tokens must be in [1, 16], got "
                             f"{self.num_speculative_tokens}")
        if self.method == "ngram" and not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError("need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                             f"{self.prompt_lookup_min}, {self.prompt_lookup_max}")
        if self.method == "draft_model" and not self.model:
            raise ValueError("the draft_model method needs a model")
        if self.disable_by_batch_size is not None and self.disable_by_batch_size < 1:
            raise ValueError("disable_by_batch_size must be >= 1")
        if not 0.0 <= self.min_acceptance_rate <= 1.0:
            raise ValueError("min_acceptance_rate must be in [0, 1]")

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict[str, Any] | str | None
              ) -> SpeculativeConfig | None:
        """From LLM()'s dict, a CLI/env JSON string, or an instance; None/"" means off."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            if not value.strip():
                return None
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"speculative config is not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ValueError("speculative config must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown speculative config keys {unknown}; known: {sorted(known)}")
        if "method" not in value or "num_speculative_tokens" not in value:
            raise ValueError("speculative config needs method and num_speculative_tokens")
        return cls(**value)

    def to_json(self) -> str:
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self)})
