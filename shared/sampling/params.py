"""User-facing sampling parameters, shaped like vLLM's `SamplingParams` so users can switch.

Validated once, at construction, so a bad request fails before it reaches a batch. Never mutated
afterwards (the dataclass is frozen): derive a variant with `dataclasses.replace(p, top_p=0.9)`
or copy with `p.clone()`. Imports no torch; the tensor side lives in `sampler.py`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from pagewire.sampling.structured import StructuredOutputsParams

# vLLM's _SAMPLING_EPS: a temperature below this is greedy (dividing by it would overflow).
GREEDY_TEMPERATURE_EPS = 1e-5
# vLLM's default max_logprobs; also OpenAI's cap on top_logprobs.
MAX_LOGPROBS = 20
# torch.Generator.manual_seed accepts any value in [-2**63, 2**64).
_SEED_RANGE = range(-(2**63), 2**64)


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    n: int = 1
    """Number of completions to return per prompt; >= 1."""
    temperature: float = 1.0
    """>= 0; below GREEDY_TEMPERATURE_EPS the request is greedy (argmax)."""
    top_p: float = 1.0
    """In (0, 1]: keep the smallest set of top tokens whose probability sums to >= top_p."""
    top_k: int = 0
    """Keep the top_k most likely tokens; 0 or -1 disables."""
    min_p: float = 0.0
    """In [0, 1]: drop tokens whose probability is below min_p * (top token's probability)."""
    seed: int | None = None
    """Seeds this request's own generator, so its samples do not depend on the batch."""
    repetition_penalty: float = 1.0
    """> 0; for tokens seen in prompt or output, positive logits are divided by it, others
    multiplied (HF/vLLM semantics); 1 disables."""
    presence_penalty: float = 0.0
    """In [-2, 2]; subtracted once from the logit of every token already in the output."""
    frequency_penalty: float = 0.0
    """In [-2, 2]; subtracted per occurrence of the token in the output."""
    max_tokens: int | None = 16
    """Most tokens to generate, >= 1; None means up to the model's context length."""
    min_tokens: int = 0
    """EOS and stop_token_ids are not allowed to end the output before this many tokens."""
    stop: str | list[str] | None = None
    """Strings that end generation; normalized to list[str] (None -> [])."""
    stop_token_ids: list[int] | None = None
    """Token ids that end generation besides EOS; normalized to list[int] (None -> [])."""
    ignore_eos: bool = False
    """Keep generating past EOS (benchmarks)."""
    logprobs: int | None = None
    """Top logprobs to return per output token, 0..MAX_LOGPROBS; 0 = only the sampled
    token's logprob; None = no logprobs."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the text."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the detokenized text."""
    structured_outputs: StructuredOutputsParams | None = None
    """What the output must match (a JSON schema, a regex, a choice, a grammar); None: free."""

    def __post_init__(self) -> None:
        # Frozen dataclass: normalization has to go through object.__setattr__.
        object.__setattr__(self, "stop", _normalize_stop(self.stop))
        object.__setattr__(self, "stop_token_ids", _normalize_stop_token_ids(self.stop_token_ids))
        self._validate()

    @property
    def greedy(self) -> bool:
        """Whether this request samples by argmax (vLLM: temperature < 1e-5)."""
        return self.temperature < GREEDY_TEMPERATURE_EPS

    def clone(self) -> SamplingParams:
        """A copy with its own stop lists (vLLM's `clone()`); use dataclasses.replace to vary."""
        return dataclasses.replace(self)

    def _validate(self) -> None:
        _check_int("n", self.n, low=1)
        _check_real("temperature", self.temperature)
        _require(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        _check_real("top_p", self.top_p)
        _require(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k, low=-1)
        _check_real("min_p", self.min_p)
        _require(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None:
            _check_int("seed", self.seed)
            _require(self.seed in _SEED_RANGE, f"seed must fit in 64 bits, got {self.seed}")
        _check_real("repetition_penalty", self.repetition_penalty)
        _require(
            self.repetition_penalty > 0,
            f"repetition_penalty must be > 0, got {self.repetition_penalty}",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_real(name, value)
            _require(-2 <= value <= 2, f"{name} must be in [-2, 2], got {value}")
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, low=1)
        _check_int("min_tokens", self.min_tokens, low=0)
        if self.max_tokens is not None:
            _require(
                self.min_tokens <= self.max_tokens,
                f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}",
            )
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, low=0)
            _require(
                self.logprobs <= MAX_LOGPROBS,
                f"logprobs must be <= {MAX_LOGPROBS}, got {self.logprobs}",
            )
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            value = getattr(self, name)
            _require(isinstance(value, bool), f"{name} must be a bool, got {value!r}")
        _require(self.structured_outputs is None or
                 isinstance(self.structured_outputs, StructuredOutputsParams),
                 "structured_outputs must be a StructuredOutputsParams")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_int(name: str, value: object, low: int | None = None) -> None:
    # bool is an int subclass; True as a count or seed is a caller bug, not a value.
    _require(
        isinstance(value, int) and not isinstance(value, bool),
        f"{name} must be an int, got {value!r}",
    )
    if low is not None:
        _require(value >= low, f"{name} must be >= {low}, got {value}")  # type: ignore[operator]


def _check_real(name: str, value: object) -> None:
    # NaN and inf pass naive range checks or poison a whole batch's logits; reject them here.
    _require(
        isinstance(value, (int, float)) and not isinstance(value, bool),
        f"{name} must be a number, got {value!r}",
    )
    _require(math.isfinite(value), f"{name} must be finite, got {value}")  # type: ignore[arg-type]


def _normalize_stop(stop: object) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    _require(isinstance(stop, (list, tuple)), f"stop must be a str or list of str, got {stop!r}")
    for item in stop:  # type: ignore[union-attr]
        _require(isinstance(item, str), f"stop must contain only str, got {item!r}")
        _require(item != "", "stop must not contain an empty string")
    return list(stop)  # type: ignore[arg-type]


def _normalize_stop_token_ids(stop_token_ids: object) -> list[int]:
    if stop_token_ids is None:
        return []
    _require(
        isinstance(stop_token_ids, (list, tuple)),
        f"stop_token_ids must be a list of int, got {stop_token_ids!r}",
    )
    for token_id in stop_token_ids:  # type: ignore[union-attr]
        _check_int("stop_token_ids entry", token_id, low=0)
    return list(stop_token_ids)  # type: ignore[arg-type]
