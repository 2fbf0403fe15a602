"""What one benchmark run is: the workload, how it arrives, and how requests are sampled.

Frozen dataclasses, validated at construction, built once from the command line; a sweep makes
per-rate copies with `dataclasses.replace`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

DATASETS = ("random", "shared-prefix", "multi-turn")
PROMPT_FORMATS = ("ids", "text")
SLO_METRICS = ("ttft", "tpot", "e2el")  # vLLM's goodput names, in milliseconds


@dataclass(frozen=True)
class DatasetConfig:
    name: str = "random"
    """random | shared-prefix | multi-turn."""
    num_prompts: int = 100
    """Requests (random, shared-prefix) or conversations (multi-turn)."""
    input_len: int = 1024
    """Prompt tokens (random), question words (shared-prefix), user-message words (multi-turn)."""
    output_len: int = 128
    """Output tokens asked for (max_tokens)."""
    range_ratio: float = 0.0
    """Input and output lengths are uniform in [len * (1 - r), len * (1 + r)]."""
    prompt_format: str = "ids"
    """random: prompts of token ids (exact lengths) or of words (about one token each)."""
    vocab_size: int = 32000
    """random, ids: ids are drawn from [100, vocab_size) (clear of special tokens)."""
    num_prefixes: int = 4
    """shared-prefix: distinct system prompts; request i uses prefix i % num_prefixes."""
    prefix_len: int = 512
    """shared-prefix: words per system prompt."""
    turns: int = 3
    """multi-turn: user turns per conversation; each turn carries the whole history."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise ValueError(f"unknown dataset {self.name!r} (valid: {', '.join(DATASETS)})")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"unknown prompt format {self.prompt_format!r} "
                             f"(valid: {', '.join(PROMPT_FORMATS)})")
        for name in ("num_prompts", "input_len", "output_len", "num_prefixes", "prefix_len",
                     "turns"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not 0 <= self.range_ratio < 1:
            raise ValueError("range_ratio must be in [0, 1)")
        if self.vocab_size <= 100:
            raise ValueError("vocab_size must be above 100")


@dataclass(frozen=True)
class LoadConfig:
    request_rate: float = math.inf
    """Mean arrivals per second (requests; conversations for multi-turn); inf: all at once."""
    burstiness: float = 1.0
    """Gamma shape of the gaps between arrivals: 1 is Poisson, above 1 steadier, below burstier."""
    max_concurrency: int | None = None
    """At most this many requests in flight; None: no limit."""
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.request_rate > 0:
            raise ValueError("request_rate must be above 0 (inf: all at once)")
        if not self.burstiness > 0:
            raise ValueError("burstiness must be above 0")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")


@dataclass(frozen=True)
class BenchConfig:
    base_url: str
    """The server, with or without a trailing /v1."""
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    load: LoadConfig = field(default_factory=LoadConfig)
    model: str | None = None
    """None: the first id that /v1/models lists."""
    api_key: str | None = None
    ignore_eos: bool = True
    """Ask for exactly max_tokens (a vLLM/SGLang extension of the OpenAI API)."""
    temperature: float = 0.0
    extra_body: dict = field(default_factory=dict)
    """Merged into every request's JSON body."""
    goodput_slos_ms: dict = field(default_factory=dict)
    """SLO name (ttft | tpot | e2el) -> milliseconds; a request is good if it meets them all."""
    percentiles: tuple[float, ...] = (90.0, 99.0)
    num_warmups: int = 1
    """Requests sent (from other prompts) before the measured run; not counted."""
    request_timeout_s: float = 600.0
    label: str = "run"
    """Names this deployment in result files and on plots."""
    show_progress: bool = True
    server_metrics: bool = False
    """Record what the server's /metrics counters gained during the measured run."""

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base URL must start with http:// or https://: {self.base_url!r}")
        for name, value in self.goodput_slos_ms.items():
            if name not in SLO_METRICS:
                raise ValueError(f"unknown goodput metric {name!r} "
                                 f"(valid: {', '.join(SLO_METRICS)})")
            if not value > 0:
                raise ValueError(f"goodput {name} must be above 0 ms")
        if any(not 0 < p < 100 for p in self.percentiles):
            raise ValueError("percentiles must be in (0, 100)")
        if self.num_warmups < 0 or self.request_timeout_s <= 0:
            raise ValueError("num_warmups must be >= 0 and request_timeout_s above 0")

    @property
    def root_url(self) -> str:
        """The base URL without /v1: request paths add it."""
        url = self.base_url.rstrip("/")
        return url[:-3] if url.endswith("/v1") else url


def parse_goodput(items: list[str]) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos = {}
    for item in items:
        name, sep, value = item.partition(":")
        try:
            slos[name.strip().lower()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"goodput takes NAME:MILLISECONDS (e.g. ttft:500), not {item!r}")
    return slos
