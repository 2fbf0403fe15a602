"""Constrained decoding with xgrammar (what vLLM and SGLang default to): a request's
StructuredOutputsParams compiled once against the served tokenizer, a matcher per sequence, and
a token bitmask per step that leaves the logits only the tokens the constraint allows.

The compiler is made once per engine from the tokenizer and the model's vocabulary size (the
logits' width, which may exceed the tokenizer's), with the engine's EOS ids as the tokens that
end a completed output. Compiled grammars are cached by (kind, spec): the same schema on every
request compiles once. xgrammar's compiler is thread-safe, so a worker may compile off its
engine thread.

Must never let a constraint it cannot compile reach a batch: that is a GrammarError for the one
request, raised when the request is added.
"""

from __future__ import annotations

import json
import re
import threading

import torch

from pagewire.sampling.structured import StructuredOutputsParams

CACHE_SIZE = 256  # compiled grammars kept (each is small: a JSON schema's is tens of KB)


class GrammarError(ValueError):
    """A constraint the grammar backend refuses (a bad schema, regex or grammar)."""


def _xgrammar():
    import xgrammar  # imported on first use: it loads a native library and torch kernels

    return xgrammar


class GrammarCompiler:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        xgr = _xgrammar()
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(stop_token_ids))
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(info, cache_enabled=True)
        self._cache: dict[tuple[str, str], object] = {}
        self._lock = threading.Lock()

    def compile(self, params: StructuredOutputsParams):
        """The compiled grammar of a constraint (cached); GrammarError when it cannot be."""
        key = (params.kind, params.spec)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        compiled = self._compile(params)
        with self._lock:
            if len(self._cache) >= CACHE_SIZE:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = compiled
        return compiled

    def _compile(self, params: StructuredOutputsParams):
        compiler = self._compiler
        try:
            # JSON is written compact (", " and ": " only): given free whitespace, a small
            # model looped on newlines until max_tokens (seen with SmolLM2 and tool calls).
            if params.kind == "json":
                return compiler.compile_json_schema(params.json, strict_mode=True,
                                                    any_whitespace=False)
            if params.kind == "json_object":  # an object (OpenAI's), any keys and values
                return compiler.compile_json_schema('{"type": "object"}', strict_mode=False,
                                                    any_whitespace=False)
            if params.kind == "regex":
                return compiler.compile_regex(params.regex)
            if params.kind == "choice":
                # Each choice as an EBNF string literal: JSON's escapes are EBNF's.
                return compiler.compile_grammar(
                    "root ::= " + " | ".join(json.dumps(c) for c in params.choice))
            return compiler.compile_grammar(params.grammar)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise GrammarError(f"the {params.kind} constraint cannot be compiled: "
                               f"{_first_line(exc)}") from None

    def matcher(self, params: StructuredOutputsParams) -> Matcher:
        return Matcher(_xgrammar().GrammarMatcher(self.compile(params)))


class Matcher:
    """One sequence's place in its grammar."""

    def __init__(self, matcher):
        self.native = matcher  # xgrammar's GrammarMatcher

    def accept(self, token_id: int) -> bool:
        """Advances past a sampled token; False if the grammar does not allow it."""
        return self.native.accept_token(token_id)

    @property
    def terminated(self) -> bool:
        """The output is complete and its end token accepted: nothing more may follow."""
        return self.native.is_terminated()


class BatchMasks:
    """The bitmask buffer of one engine, reused step after step."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self._bitmask: torch.Tensor | None = None
        # Fills the rows on a pool of C++ threads (half the cores): one by one from Python,
        # 256 rows took ~4 ms a step on an H100 host, longer than the forward pass it hides under.
        # Made on first use: an engine that never constrains starts no threads.
        self._batch = None

    def apply(self, logits: torch.Tensor, matchers: list[Matcher | None]) -> None:
        """Masks each constrained row of `logits` (one row per matcher, None: free) in place."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return
        xgr = _xgrammar()
        if self._bitmask is None or self._bitmask.shape[0] < len(matchers):
            self._bitmask = xgr.allocate_token_bitmask(max(len(matchers), 64), self.vocab_size)
            if logits.is_cuda:  # pinned: the copy joins the stream instead of waiting for it
                self._bitmask = self._bitmask.pin_memory()
        bitmask = self._bitmask[:len(matchers)]
        if self._batch is None:
            self._batch = xgr.BatchGrammarMatcher()
        self._batch.batch_fill_next_token_bitmask(
            [matchers[row].native for row in rows], bitmask, indices=rows)
        device_mask = bitmask.to(logits.device, non_blocking=True) if logits.is_cuda else bitmask
        xgr.apply_token_bitmask_inplace(logits, device_mask, indices=rows)


def _first_line(exc: Exception) -> str:
    """xgrammar's message without the timestamp and source location it starts with."""
    line = str(exc).strip().split("\n", 1)[0]
    return re.sub(r"^\[[^]]*\]\s*", "", re.sub(r"^(\[[^]]*\]\s*)?\S+:\d+:\s*", "", line))[:500]
