"""Pipeline parallelism: a model split into stages of consecutive layers, one process each.
Every stage gets the step's inputs (step_message.py) and builds the same attention metadata;
the first embeds the tokens, each stage runs its layers on its own KV cache (its layers only)
and sends the hidden states and the residual to the next; the last applies the final norm and
the LM head and sends the logits back to rank 0, which samples.

This first step runs one step at a time: while one stage computes, the others wait. Keeping
stages busy needs micro-batches in flight (the next step's first stage starting while the
last finishes this one), which the engine's synchronous step loop does not offer yet.
"""

from __future__ import annotations

import torch

from pagewire.model.llama import LlamaForCausalLM, ModelSpec


class PipelineStageModel(LlamaForCausalLM):
    def __init__(self, spec: ModelSpec, local: ModelSpec, use_triton: bool, stage, group):
        """spec: the whole model's; local: this stage's (its layers); group: the TPGroup whose
        ranks are the stages, in order."""
        super().__init__(local, use_triton)
        self.stage, self.group, self.vocab_size = stage, group, spec.vocab_size
        if not stage.first:
            del self.embed_tokens  # a tied LM head keeps the same Parameter
        if not stage.last:
            del self.norm, self.lm_head

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], meta) -> torch.Tensor:
        stage, group = self.stage, self.group
        if stage.first:
            hidden, residual = self.embed_tokens(input_ids), None
        else:
            shape = (input_ids.shape[0], self.spec.hidden_size)
            dtype = next(self.parameters()).dtype
            hidden = group.recv(torch.empty(shape, dtype=dtype, device=input_ids.device),
                                stage.rank - 1)
            residual = group.recv(torch.empty_like(hidden), stage.rank - 1)
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta)
        if stage.last:
            hidden, _ = self.norm(hidden, residual)
            return hidden
        group.send(hidden, stage.rank + 1)
        group.send(residual, stage.rank + 1)
        return hidden  # only its shape matters to the caller: logits come from the last stage

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The last stage scores the rows and sends them to rank 0, which receives them;
        stages between have nothing to do."""
        stage = self.stage
        if stage.last:
            logits = super().compute_logits(hidden)
            if not stage.first:
                self.group.send(logits, 0)
            return logits
        if stage.first:
            return self.group.recv(torch.empty((hidden.shape[0], self.vocab_size),
                                               dtype=torch.float32, device=hidden.device),
                                   stage.size - 1)
        return None


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
        return "lm_head.weight" if tied and stage.last else None
    if name.startswith(("norm.", "lm_head.")):
        return name if stage.last else None
    return name
