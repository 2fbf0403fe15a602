"""The offline API, shaped like vLLM's: LLM(...).generate(prompts, SamplingParams(...))."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence as Seq
from typing import Any

from tqdm import tqdm

from pagewire.config import EngineConfig
from pagewire.engine.llm_engine import LLMEngine
from pagewire.outputs import RequestOutput
from pagewire.sampling.params import SamplingParams

PromptType = str | dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Metric:
    """A counter (value: a number) or a vector of counters (value: one per position)."""

    name: str
    value: int | list[int]


class LLM:
    """An engine in this process. `LLM()` loads the embedded SmolLM2-135M-Instruct."""

    def __init__(self, model: str | None = None, **engine_kwargs: Any):
        engine_kwargs.setdefault("usage", "offline")  # bigger steps on a large GPU, as vLLM's
        self.engine = LLMEngine(EngineConfig(model=model, **engine_kwargs))
        self._next_id = 0

    def get_metrics(self) -> list[Metric]:
        """The engine's counters, named as /metrics names them (vLLM's LLM.get_metrics())."""
        stats = self.engine.stats
        metrics = [Metric("pagewire:num_preemptions", stats.num_preemptions),
                   Metric("pagewire:prefix_cache_hits", stats.num_prefix_hit_tokens)]
        if self.engine.speculator is not None:
            spec = self.engine.speculator.stats
            metrics += [
                Metric("pagewire:spec_decode_num_drafts", spec.num_drafts),
                Metric("pagewire:spec_decode_num_draft_tokens", spec.num_draft_tokens),
                Metric("pagewire:spec_decode_num_accepted_tokens", spec.num_accepted_tokens),
                Metric("pagewire:spec_decode_num_accepted_tokens_per_pos",
                       list(spec.accepted_per_position))]
        return metrics

    def get_tokenizer(self):
        return self.engine.tokenizer

    def reset_prefix_cache(self) -> None:
        """Forgets every cached prefix that no running request holds (benchmarks use this)."""
        self.engine.block_manager.reset_prefix_cache()

    def generate(self, prompts: PromptType | Seq[PromptType],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """One output per prompt, in order. Prompts are strings or {"prompt_token_ids": [...]};
        sampling_params is one for all or one per prompt."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"{len(sampling_params)} sampling params for {len(prompts)} prompts")
        groups = [self._add(p, sp) for p, sp in zip(prompts, sampling_params)]
        finished = self._run(sum(len(g) for g in groups), use_tqdm)
        return [_merge([finished[rid] for rid in group]) for group in groups]

    def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """Applies the model's chat template to one conversation or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": self.apply_chat_template(
            c, add_generation_prompt, **(chat_template_kwargs or {}))} for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(self, conversation: list[dict[str, str]],
                            add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        tokenizer = self._require_tokenizer()
        ids = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False,
                                            add_generation_prompt=add_generation_prompt, **kwargs)
        return list(ids)

    def _require_tokenizer(self):
        if self.engine.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass {'prompt_token_ids': [...]}")
        return self.engine.tokenizer

    def _add(self, prompt: PromptType, params: SamplingParams) -> list[str]:
        if isinstance(prompt, str):
            text, token_ids = prompt, self._require_tokenizer().encode(prompt)
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            text, token_ids = prompt.get("prompt"), list(prompt["prompt_token_ids"])
        else:
            raise TypeError("a prompt is a string or a dict with 'prompt_token_ids'")
        request_ids = []
        for index in range(params.n):
            # n samples are n sequences; seeded ones get distinct, reproducible seeds
            sample_params = params if params.n == 1 else dataclasses.replace(params,
                n=1, seed=None if params.seed is None else params.seed + index)
            request_id = str(self._next_id)
            self._next_id += 1
            self.engine.add_request(request_id, token_ids, sample_params, prompt=text)
            request_ids.append(request_id)
        return request_ids

    def _run(self, total: int, use_tqdm: bool) -> dict[str, RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        show = use_tqdm and self.engine.config.show_progress and total > 1
        with tqdm(total=total, desc="Generating", unit="req", disable=not show) as bar:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step(finished_only=True):
                    if output.finished:
                        finished[output.request_id] = output
                        bar.update(1)
        return finished


def _merge(outputs: list[RequestOutput]) -> RequestOutput:
    """The n samples of one prompt become one RequestOutput with n completions."""
    first = outputs[0]
    completions = []
    for index, output in enumerate(outputs):
        completion = output.outputs[0]
        completion.index = index
        completions.append(completion)
    first.outputs = completions
    return first
