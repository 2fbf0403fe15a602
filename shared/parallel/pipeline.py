"""Pipeline parallelism: a model split into stages of consecutive layers, one process each
(or one TP group each: TP x PP). Every rank gets the step's inputs (step_message.py) and builds
the same attention metadata; the first stage embeds the tokens, each stage runs its layers on
its own KV cache (its layers only) and sends the hidden states and the residual to the next
(rank for rank: TP rank t of one stage to TP rank t of the next, as every TP rank holds the
whole hidden state after its block's all-reduce); the last applies the final norm and the LM
head, and its first TP rank sends the logits back to rank 0, which samples.

By default the pipeline holds one step: while one stage computes, the others wait. With
`async_scheduling=True` it holds a micro-batch per stage (the scheduler's disjoint parts of
the running sequences, in turn; the engine keeps up to stages - 1 steps in flight): rank 0
posts the receive of a step's logits at once and samples them only after launching the next
step into the first stage (`receive_logits`, StepResult.sample_later), so each stage computes
another micro-batch at once. On CPU, where the stages share the cores and decode reads the
same weights for half the batch, that measured slower (loadtests/RESULTS.md); it is meant for
one GPU per stage.
"""

from __future__ import annotations

import torch

from pagewire.model.llama import LlamaForCausalLM, ModelSpec


class PipelineStageModel(LlamaForCausalLM):
    def __init__(self, spec: ModelSpec, local: ModelSpec, use_triton: bool, place, pipe,
                 tp=None):
        """spec: the whole model's; local: this rank's (its layers, and heads under TP); place:
        its RankPlace; pipe: the group of all the engine's ranks, which activations cross;
        tp: its stage's TP group, if any."""
        super().__init__(local, use_triton, place.shard, tp)
        self.stage, self.place, self.pipe = place.stage, place, pipe
        self.vocab_size = spec.vocab_size
        if not self.stage.first:
            del self.embed_tokens  # a tied LM head keeps the same Parameter
        if not self.stage.last:
            del self.norm, self.lm_head

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], meta) -> torch.Tensor:
        stage, place, pipe = self.stage, self.place, self.pipe
        if stage.first:
            hidden, residual = self.embed_tokens(input_ids), None
        else:
            shape = (input_ids.shape[0], self.spec.hidden_size)
            dtype = next(self.parameters()).dtype
            previous = place.rank_in_stage(stage.rank - 1)
            hidden = pipe.recv(torch.empty(shape, dtype=dtype, device=input_ids.device),
                               previous)
            residual = pipe.recv(torch.empty_like(hidden), previous)
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta)
        if stage.last:
            hidden, _ = self.norm(hidden, residual)
            return hidden
        following = place.rank_in_stage(stage.rank + 1)
        pipe.send(hidden, following)
        pipe.send(residual, following)
        return hidden  # only its shape matters to the caller: logits come from the last stage

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The last stage scores the rows (its TP ranks gathering the vocabulary) and its first
        TP rank sends them to rank 0 (`receive_logits`); other ranks have nothing to do."""
        if not self.stage.last:
            return None
        logits = super().compute_logits(hidden)
        if self.place.tp_rank == 0:
            self.pipe.send(logits, 0)
        return logits

    def receive_logits(self, num_rows: int, device: torch.device):
        """Rank 0: posts the receive of a step's logits from the last stage at once (so its
        send never waits on us), and returns the function that waits for them."""
        buffer = torch.empty((num_rows, self.vocab_size), dtype=torch.float32, device=device)
        return self.pipe.start_recv(buffer, self.place.rank_in_stage(self.stage.size - 1))


def stage_name(name: str, stage, tied: bool) -> str | None:
    """A checkpoint name (without "model.") as this stage holds it, or None if it holds none:
    its layers renumbered from 0, the embedding on the first stage (and as the LM head on the
    last when tied), the final norm and LM head on the last."""
    if name.startswith("layers."):
        index = int(name.split(".")[1])
        if not stage.layers.start <= index < stage.layers.stop:
            return None
        return f"layers.{index - stage.layers.start}." + name.split(".", 2)[2]
    if name.startswith("embed_tokens."):
        if stage.first:
            return name
        # weight, or a packed embedding's layer.{qweight, scales, offsets} (GGUF)
        return "lm_head." + name.rsplit(".", 1)[1] if tied and stage.last else None
    if name.startswith(("norm.", "lm_head.")):
        return name if stage.last else None
    return name
