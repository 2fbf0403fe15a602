"""The draft-model proposer: a small model of the same vocabulary guesses k tokens, one forward
each, and the target verifies them (rejection.py, with the draft's distributions q).

The draft keeps its own paged KV cache with the target's block count and block size, so a
sequence's block table addresses both caches: its blocks hold the target's KV in one and the
draft's in the other, and no second block manager is needed. A sequence's draft KV is built on
the engine that decodes it, from its own tokens (`spec_draft_computed` counts them): first the
whole prompt in one forward, then each step the tokens the target accepted since. A block
shared through the prefix cache may hold another sequence's draft KV or none, so a sequence
never trusts it: it recomputes its draft KV from position 0 when it starts (the values written
are the same for the same tokens). Transferring draft KV with the target's was not worth its
bytes for drafts this small: the catch-up is one prefill of the draft model.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig

from pagewire.config import EngineConfig
from pagewire.device_copies import to_device
from pagewire.engine.sequence import Sequence
from pagewire.model.attention import build_attention_metadata
from pagewire.model.llama import ModelSpec
from pagewire.model.model_source import resolve_model
from pagewire.model.quantization import checkpoint_method
from pagewire.sampling.params import GREEDY_TEMPERATURE_EPS
from pagewire.sampling.sampler import SamplingMetadata, exponential_noise, filtered_probs


class DraftModelProposer:
    def __init__(self, model: str, config: EngineConfig, target_spec: ModelSpec):
        from pagewire.engine.model_runner import load_model  # the runner imports this module

        source = resolve_model(model)
        hf_config = AutoConfig.from_pretrained(source.model_dir)
        self.spec = ModelSpec.from_hf_config(hf_config)
        # Quantized only as its own checkpoint says: the target's method is not the draft's.
        config = config.replace(quantization=checkpoint_method(hf_config, None))
        if self.spec.vocab_size != target_spec.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({self.spec.vocab_size}) is not the "
                             f"target's ({target_spec.vocab_size})")
        self.config = config
        self.device = torch.device(config.device)
        self.block_size = config.block_size
        self.model = load_model(self.spec, source, config, load_format="auto")
        self.layer_caches: list[torch.Tensor] = []

    @property
    def block_bytes(self) -> int:
        """The draft cache's bytes per block, which the target's KV budget makes room for."""
        spec = self.spec
        return (2 * spec.num_layers * self.block_size * spec.num_kv_heads * spec.head_dim
                * self.config.kv_torch_dtype.itemsize)

    def allocate_cache(self, num_blocks: int) -> None:
        """As many blocks as the target's cache, so its block tables address this one too."""
        spec = self.spec
        cache = torch.zeros((spec.num_layers, 2, num_blocks, self.block_size,
                             spec.num_kv_heads, spec.head_dim),
                            dtype=self.config.kv_torch_dtype, device=self.device)
        self.layer_caches = list(cache.unbind(0))

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], k: list[int]
                ) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        """k[i] drafts for seqs[i] (whose block tables cover num_tokens + k[i] - 1 slots), and
        per sequence the draft's distributions [k[i], V] it drew them from (None for greedy
        requests: their drafts are the draft's argmax)."""
        greedy = [s.params.greedy for s in seqs]
        meta = SamplingMetadata.build([s.params for s in seqs], [[]] * len(seqs),
                                      [[]] * len(seqs), [s.generator for s in seqs],
                                      self.spec.vocab_size, self.device)
        # Step 0 catches each sequence up on the tokens its draft KV lacks; then one token each.
        inputs = [s.token_ids[s.spec_draft_computed:] for s in seqs]
        starts = [s.spec_draft_computed for s in seqs]
        drafts: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        active = list(range(len(seqs)))
        for step in range(max(k)):
            active = [i for i in active if step < k[i]]
            logits = self._forward([inputs[i] for i in active], [starts[i] for i in active],
                                   [seqs[i].block_table for i in active])
            tokens, q = self._sample(logits, meta, active, greedy)
            for row, i in enumerate(active):
                drafts[i].append(tokens[row])
                if not greedy[i]:  # a greedy target checks drafts against its argmax alone
                    probs[i].append(q[row])
                starts[i] += len(inputs[i])
                inputs[i] = [tokens[row]]
        for seq, n in zip(seqs, k):
            # Its draft KV now covers every known token and all drafts but the last.
            seq.spec_draft_computed = seq.num_tokens + n - 1
        return drafts, [torch.stack(p) if p else None for p in probs]

    def _forward(self, inputs: list[list[int]], starts: list[int],
                 block_tables: list[list[int]]) -> torch.Tensor:
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]) != 1)  # decodes first
        query_lens = [len(inputs[i]) for i in order]
        context_lens = [starts[i] + len(inputs[i]) for i in order]
        meta = build_attention_metadata(query_lens, context_lens,
                                        [block_tables[i] for i in order], self.block_size,
                                        self.device)
        ids = [t for i in order for t in inputs[i]]
        positions = [p for i in order for p in range(starts[i], starts[i] + len(inputs[i]))]
        hidden = self.model(to_device(ids, torch.long, self.device),
                            to_device(positions, torch.long, self.device), self.layer_caches,
                            meta)
        last = [sum(query_lens[:j + 1]) - 1 for j in range(len(order))]
        logits = self.model.compute_logits(hidden[to_device(last, torch.long, self.device)])
        unsorted = torch.empty_like(logits)
        unsorted[to_device(order, torch.long, self.device)] = logits
        return unsorted

    def _sample(self, logits: torch.Tensor, meta: SamplingMetadata, active: list[int],
                greedy: list[bool]) -> tuple[list[int], torch.Tensor | None]:
        if all(greedy[i] for i in active):
            return logits.argmax(dim=-1).tolist(), None
        index = to_device(active, torch.long, self.device)
        rows = SamplingMetadata(
            temperature=meta.temperature[index],
            top_k=None if meta.top_k is None else meta.top_k[index],
            top_p=None if meta.top_p is None else meta.top_p[index],
            min_p=None if meta.min_p is None else meta.min_p[index],
            repetition_penalty=None, presence_penalty=None, frequency_penalty=None,
            prompt_token_ids=None, output_token_ids=None,
            generators=[meta.generators[i] for i in active], max_num_logprobs=None,
            all_greedy=False, all_random=not any(greedy[i] for i in active))
        q = filtered_probs(logits.float(), rows)
        noise = exponential_noise(q, rows.generators)
        drawn = (q / noise.clamp_(min=torch.finfo(torch.float32).tiny)).argmax(dim=-1)
        tokens = torch.where(rows.temperature < GREEDY_TEMPERATURE_EPS,
                             logits.argmax(dim=-1), drawn)
        return tokens.tolist(), q
