"""Batched token sampling on the logits' device, in vLLM v1's order.

raw logprobs -> penalties -> greedy argmax | temperature -> min_p -> top_k -> top_p -> sample.
Everything runs as whole-batch tensor ops in float32; the only loop over rows draws the noise of
seeded rows from their own generators. This module must never sync per row (no `.item()` in
loops) and never mutate the caller's logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pagewire.device_copies import to_device

from .params import GREEDY_TEMPERATURE_EPS, SamplingParams


@dataclass
class SamplingMetadata:
    """Per-row sampling settings of one batch, as tensors on the logits' device."""

    temperature: Tensor  # [B] float32, 0 for greedy rows
    top_k: Tensor | None  # [B] int64, 0 = off; None if no random row uses it
    top_p: Tensor | None  # [B] float32, 1 = off
    min_p: Tensor | None  # [B] float32, 0 = off
    repetition_penalty: Tensor | None  # [B] float32, 1 = off
    presence_penalty: Tensor | None  # [B] float32, 0 = off
    frequency_penalty: Tensor | None  # [B] float32, 0 = off
    prompt_token_ids: Tensor | None  # [B, Lp] int64, padded with vocab_size (never counted)
    output_token_ids: Tensor | None  # [B, Lo] int64, likewise
    generators: list[torch.Generator | None]  # per row; None = draw from the default generator
    max_num_logprobs: int | None  # max of params.logprobs over rows; None if no row asks
    all_greedy: bool
    all_random: bool

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        generators: list[torch.Generator | None],
        vocab_size: int,
        device: torch.device | str,
    ) -> SamplingMetadata:
        assert len(params) == len(prompt_token_ids) == len(output_token_ids) == len(generators)
        greedy = [p.greedy for p in params]
        # Filters only matter for random rows: a greedy row gets neutral values, so a batch of
        # greedy requests with stray top_p never pays for the sort.
        random_params = [None if g else p for p, g in zip(params, greedy)]

        def column(values: list, neutral: float, dtype: torch.dtype) -> Tensor | None:
            if all(v == neutral for v in values):
                return None
            return to_device(values, dtype, device)

        repetition = column([p.repetition_penalty for p in params], 1.0, torch.float32)
        presence = column([p.presence_penalty for p in params], 0.0, torch.float32)
        frequency = column([p.frequency_penalty for p in params], 0.0, torch.float32)
        any_penalty = repetition is not None or presence is not None or frequency is not None
        asked = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            temperature=to_device(
                [0.0 if g else p.temperature for p, g in zip(params, greedy)],
                torch.float32,
                device,
            ),
            top_k=column([max(p.top_k, 0) if p else 0 for p in random_params], 0, torch.int64),
            top_p=column([p.top_p if p else 1.0 for p in random_params], 1.0, torch.float32),
            min_p=column([p.min_p if p else 0.0 for p in random_params], 0.0, torch.float32),
            repetition_penalty=repetition,
            presence_penalty=presence,
            frequency_penalty=frequency,
            # Only the repetition penalty looks at the prompt; presence/frequency count output.
            prompt_token_ids=(
                _pad(prompt_token_ids, vocab_size, device) if repetition is not None else None
            ),
            output_token_ids=_pad(output_token_ids, vocab_size, device) if any_penalty else None,
            # A greedy row draws no noise, so its generator (if any) is left untouched.
            generators=[None if g else gen for gen, g in zip(generators, greedy)],
            max_num_logprobs=max(asked) if asked else None,
            all_greedy=all(greedy),
            all_random=not any(greedy),
        )


@dataclass
class SamplerOutput:
    sampled_token_ids: Tensor  # [B] int64
    sampled_logprobs: Tensor | None  # [B] float32, raw logprob of the sampled token
    top_logprob_ids: Tensor | None  # [B, K] int64, K = max_num_logprobs, by descending logprob
    top_logprobs: Tensor | None  # [B, K] float32; a row asking fewer than K slices its own


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A request's own generator; it lives with the request so its state carries across steps."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


class Sampler:
    def __call__(self, logits: Tensor, meta: SamplingMetadata) -> SamplerOutput:
        # .float() may return the caller's tensor itself: every op below is out-of-place.
        logits = logits.float()
        raw_logprobs = None
        if meta.max_num_logprobs is not None:
            # vLLM's "raw_logprobs": what the model said, before penalties and temperature.
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        sampled = self._sample(apply_penalties(logits, meta), meta)
        if raw_logprobs is None:
            return SamplerOutput(sampled, None, None, None)
        sampled_logprobs = raw_logprobs.gather(1, sampled.unsqueeze(1)).squeeze(1)
        top = raw_logprobs.topk(meta.max_num_logprobs, dim=-1)  # sorted, descending
        return SamplerOutput(sampled, sampled_logprobs, top.indices, top.values)

    def _sample(self, logits: Tensor, meta: SamplingMetadata) -> Tensor:
        if meta.all_greedy:
            return logits.argmax(dim=-1)  # first index on ties, like HF
        sampled = _sample_random(logits, meta)
        if meta.all_random:
            return sampled
        greedy_rows = meta.temperature < GREEDY_TEMPERATURE_EPS
        return torch.where(greedy_rows, logits.argmax(dim=-1), sampled)


def apply_penalties(logits: Tensor, meta: SamplingMetadata) -> Tensor:
    """Repetition (prompt + output), then frequency and presence (output only), as vLLM."""
    num_rows, vocab_size = logits.shape
    if meta.output_token_ids is None:
        return logits
    output_counts = _bin_counts(meta.output_token_ids, num_rows, vocab_size)
    output_mask = output_counts > 0
    if meta.repetition_penalty is not None:
        assert meta.prompt_token_ids is not None
        seen = output_mask | (_bin_counts(meta.prompt_token_ids, num_rows, vocab_size) > 0)
        penalty = torch.where(seen, meta.repetition_penalty.unsqueeze(1), 1.0)
        logits = torch.where(logits > 0, logits / penalty, logits * penalty)
    if meta.frequency_penalty is not None:
        logits = logits - meta.frequency_penalty.unsqueeze(1) * output_counts
    if meta.presence_penalty is not None:
        logits = logits - meta.presence_penalty.unsqueeze(1) * output_mask
    return logits


def _sample_random(logits: Tensor, meta: SamplingMetadata) -> Tensor:
    probs = filtered_probs(logits, meta)
    # Exponential race: argmax(p_i / q_i) with q_i ~ Exp(1) picks token i with probability p_i,
    # without torch.multinomial's device sync. The clamp guards against a drawn 0 (-> inf/NaN).
    noise = exponential_noise(probs, meta.generators)
    return (probs / noise.clamp_(min=torch.finfo(torch.float32).tiny)).argmax(dim=-1)


def filtered_probs(logits: Tensor, meta: SamplingMetadata) -> Tensor:
    """The distribution a random row samples from: temperature, min_p, top_k, top_p, softmax
    (speculative decoding's verifier accepts drafts against exactly this)."""
    # Greedy rows divide by 1 instead of 0; their result is discarded by the caller.
    temperature = torch.where(meta.temperature < GREEDY_TEMPERATURE_EPS, 1.0, meta.temperature)
    logits = logits / temperature.unsqueeze(1)
    if meta.min_p is not None:
        logits = _apply_min_p(logits, meta.min_p)
    if meta.top_k is not None or meta.top_p is not None:
        logits = _apply_top_k_top_p(logits, meta.top_k, meta.top_p)
    return logits.softmax(dim=-1)


def _apply_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    probs = logits.softmax(dim=-1)
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def _apply_top_k_top_p(logits: Tensor, top_k: Tensor | None, top_p: Tensor | None) -> Tensor:
    """vLLM's apply_top_k_top_p: one ascending sort; top_p acts on the top_k-renormalized probs."""
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=False)
    vocab_size = logits.shape[-1]
    if top_k is not None:
        k = torch.where(top_k > 0, top_k.clamp(max=vocab_size), vocab_size)  # 0 = whole vocab
        kth_largest = sorted_logits.gather(1, (vocab_size - k).unsqueeze(1))
        # Ties with the k-th value are kept, as in vLLM.
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_largest, float("-inf"))
    if top_p is not None:
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop the low tail while its mass stays <= 1 - top_p; what is left has mass >= top_p.
        drop = cumulative <= 1 - top_p.unsqueeze(1)
        drop[:, -1] = False  # the top token always stays
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_ids, sorted_logits)


def exponential_noise(probs: Tensor, generators: list[torch.Generator | None]) -> Tensor:
    noise = torch.empty_like(probs)
    if any(g is None for g in generators):
        noise.exponential_()  # one call for all rows; seeded rows are overwritten below
    for row, generator in enumerate(generators):
        if generator is not None:
            # Drawn per row so a seeded row's noise depends only on its own generator.
            noise[row].exponential_(generator=generator)
    return noise


def _bin_counts(token_ids: Tensor, num_rows: int, vocab_size: int) -> Tensor:
    """[B, V] float32 count of each token per row; pad (and any id >= V) lands in a dropped bin."""
    counts = torch.zeros(num_rows, vocab_size + 1, dtype=torch.float32, device=token_ids.device)
    ones = torch.ones_like(token_ids, dtype=counts.dtype)
    counts.scatter_add_(1, token_ids.clamp(max=vocab_size), ones)
    return counts[:, :vocab_size]


def _pad(rows: list[list[int]], pad_id: int, device: torch.device | str) -> Tensor:
    width = max((len(r) for r in rows), default=0)
    padded = [r + [pad_id] * (width - len(r)) for r in rows]
    return to_device(torch.tensor(padded, dtype=torch.int64).reshape(len(rows), width),
                     torch.int64, device)
