"""The engine: requests in, tokens out, one step at a time. The offline LLM class, the prefill
worker and the decode worker all drive this same object (in different roles).

A step: the scheduler picks sequences and token counts, the runner computes them and samples,
then each sampled token is appended, detokenized and checked against the stop conditions.
Not thread-safe: one thread owns an engine and calls step() in a loop.
"""

from __future__ import annotations

import functools
import time
from collections import deque
from dataclasses import dataclass

import torch

from pagewire.config import EngineConfig
from pagewire.device_copies import HostCopy
from pagewire.engine.block_manager import BlockManager
from pagewire.engine.kv_transfer import KVLayout, decode_kv, dtype_name, encode_kv
from pagewire.engine.model_runner import ModelRunner, StepResult
from pagewire.engine.scheduler import Scheduler
from pagewire.engine.sequence import FinishReason, Sequence
from pagewire.model.model_source import resolve_model
from pagewire.outputs import CompletionOutput, Logprob, RequestOutput
from pagewire.sampling.params import SamplingParams
from pagewire.sampling.sampler import make_generator
from pagewire.spec_decode.speculator import Speculator
from pagewire.structured_output.grammars import GrammarCompiler, GrammarError
from pagewire.tokenizer.detokenizer import IncrementalDetokenizer
from pagewire.tokenizer.loader import eos_token_ids, load_tokenizer
from pagewire.tokenizer.stop_strings import StopStringMatcher


@dataclass
class EngineStats:
    """Counters since start, for tests, benchmarks and /metrics."""

    num_steps: int = 0
    num_computed_tokens: int = 0  # tokens run through the model (prefill chunks + decodes)
    num_prefix_hit_tokens: int = 0  # prompt tokens served from the prefix cache
    num_preemptions: int = 0


@dataclass
class KVExport:
    """A sequence's KV on its way to the host (start_kv_export)."""

    num_tokens: int
    copy: HostCopy
    out: torch.Tensor | None = None  # where the caller asked for the blocks

    def wait(self) -> torch.Tensor:
        """The blocks [n, *kv_layout.block_shape] on the host, once copied."""
        blocks = self.copy.wait()[0]
        if self.out is not None and blocks is not self.out:
            self.out.copy_(blocks)  # from the device's pinned staging copy
            return self.out
        return blocks


class InvalidRequestError(ValueError):
    """The request cannot be served as asked (bad prompt, too long, unknown id...)."""


class RequestIdInUseError(InvalidRequestError):
    """Another live request has this id; refusing this one must leave that one alone."""


class OutOfKVBlocksError(RuntimeError):
    """Not enough free KV blocks to import a sequence now; retry later or elsewhere."""


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.source = resolve_model(config.model, config.tokenizer)
        self.tokenizer = load_tokenizer(self.source) if self.source.tokenizer_dir else None
        self.runner = ModelRunner(config, self.source)
        spec = self.runner.spec
        self.max_model_len = min(config.max_model_len or spec.max_context, spec.max_context)
        kv = self.runner.kv_info
        if kv.num_tokens < self.max_model_len:
            raise ValueError(f"the KV cache holds {kv.num_tokens} tokens, fewer than "
                             f"max_model_len={self.max_model_len}: raise the KV budget or "
                             "lower max_model_len")
        kv_note = "" if config.kv_cache_dtype == "auto" else f", KV {config.kv_torch_dtype}"
        print(f"pagewire: {self.source.name} on {config.device} ({config.torch_dtype}{kv_note}); "
              f"{kv.describe()}", flush=True)
        self.block_manager = BlockManager(kv.num_blocks, config.block_size,
                                          config.enable_prefix_caching)
        # Pipeline stages overlap steps of disjoint micro-batches, one per stage: while the
        # last stage finishes one, the earlier ones compute the next. Steps launched and not
        # read back: none (synchronous), one (async scheduling) or a stage count less one.
        micro_batches = config.pipeline_parallel_size if config.use_async_scheduling else 1
        self.scheduler = Scheduler(self.block_manager, config.seq_limit,
                                   config.token_budget, micro_batches)
        self._depth = max(micro_batches - 1, 1) if config.use_async_scheduling else 0
        self.eos_token_ids = eos_token_ids(self.source, self.tokenizer)
        self.kv_layout = KVLayout(self.source.name, dtype_name(config.kv_torch_dtype),
                                  config.block_size, spec.num_layers, spec.num_kv_heads,
                                  spec.head_dim)
        self.seqs: dict[str, Sequence] = {}
        self.stats = EngineStats()
        self.speculator = None if config.speculative_config is None else \
            Speculator(config.speculative_config, config.device, self.block_manager,
                       self.runner.draft)
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._stop_matchers: dict[str, StopStringMatcher] = {}
        self._texts: dict[str, str] = {}
        self._in_flight: deque[StepResult] = deque()  # launched, tokens not read back yet

    # ---- requests -------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams | None = None, hold_kv: bool = False,
                    prompt: str | None = None, kv_sink: object | None = None) -> Sequence:
        """Queues a request. hold_kv keeps its blocks after it finishes, for export_kv;
        kv_sink receives its prompt's KV as it is computed (Sequence.kv_sink)."""
        params = params or SamplingParams()
        self._validate(request_id, prompt_token_ids, params)
        seq = Sequence(request_id, list(prompt_token_ids), params, self.config.block_size,
                       arrival_time=time.monotonic(), prompt_text=prompt, hold_kv=hold_kv,
                       kv_sink=kv_sink)
        self._register(seq)
        self.scheduler.add(seq)
        return seq

    def _validate(self, request_id: str, prompt_token_ids: list[int],
                  params: SamplingParams) -> None:
        if request_id in self.seqs:
            raise RequestIdInUseError(f"request id {request_id!r} is already in use")
        self.check_request(prompt_token_ids, params)

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Refuses a prompt or parameters this engine cannot serve (InvalidRequestError).
        Reads only what never changes, so a server may call it off the engine thread, before
        it commits anything to the request."""
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty")
        vocab = self.runner.spec.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"token ids out of the vocabulary [0, {vocab}): {bad[:5]}")
        if len(prompt_token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(prompt_token_ids)} tokens; this model's context is "
                f"{self.max_model_len} tokens, which must also hold at least one output token")
        if params.structured_outputs is not None:
            try:  # compiled (and cached) now: a constraint it cannot compile fails here
                self.grammars.compile(params.structured_outputs)
            except GrammarError as exc:
                raise InvalidRequestError(str(exc)) from None

    @functools.cached_property
    def grammars(self) -> GrammarCompiler:
        """Structured outputs' compiler, made on first use (it reads the whole vocabulary)."""
        if self.tokenizer is None:
            raise InvalidRequestError("structured outputs need the model's tokenizer, and this "
                                      "model has none")
        return GrammarCompiler(self.tokenizer, self.runner.spec.vocab_size,
                               list(self.eos_token_ids))

    def _register(self, seq: Sequence) -> None:
        params = seq.params
        seq.max_num_tokens = min(seq.num_prompt_tokens + (params.max_tokens or self.max_model_len),
                                 self.max_model_len)
        if not params.ignore_eos:
            seq.eos_token_ids = self.eos_token_ids
        if params.seed is not None:
            seq.generator = make_generator(params.seed, self.runner.device)
        if params.structured_outputs is not None:
            seq.grammar = self.grammars.matcher(params.structured_outputs)
        self.seqs[seq.request_id] = seq
        self._texts[seq.request_id] = ""
        if self.tokenizer is not None:
            self._detokenizers[seq.request_id] = IncrementalDetokenizer(
                self.tokenizer, seq.prompt_token_ids, params.skip_special_tokens)
        if params.stop:
            self._stop_matchers[seq.request_id] = StopStringMatcher(
                params.stop, params.include_stop_str_in_output)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        seq = self.seqs.get(request_id)
        if seq is None:
            return None
        if not seq.is_finished:
            self.scheduler.finish(seq, FinishReason.ABORT)
        seq.hold_kv = False
        self.scheduler.free_blocks(seq)
        return self._pop_output(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._in_flight)

    def num_unfinished_requests(self) -> int:
        return len(self.scheduler.waiting) + len(self.scheduler.running)

    # ---- the step ---------------------------------------------------------------------------

    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """Runs one step; returns an output for every request that got a token or finished
        (only those that finished with finished_only: building the others costs per step).

        With async scheduling a step is read back by the next call: this call launches step
        N+1 first, then waits for step N's tokens and processes them while the device computes
        N+1. A sequence that step N ended (a stop string, EOS) had one token too many computed
        in N+1; that token is dropped. Pipeline micro-batches keep up to a stage count less
        one steps in flight, each of another micro-batch, and read back the oldest."""
        in_flight = self._in_flight
        outputs: list[RequestOutput] = []
        if in_flight and in_flight[-1].needs_host_tokens:  # penalties, grammars
            while in_flight:
                outputs += self._finish_step(in_flight.popleft(), finished_only)
            return outputs
        if self.scheduler.num_micro_batches > 1:  # the turn's last step must be back first
            turn = self.scheduler.next_turn
            while any(step.micro_batch == turn for step in in_flight):
                outputs += self._finish_step(in_flight.popleft(), finished_only)
        launched = self._launch(in_flight[-1] if in_flight else None)
        if launched is not None:
            in_flight.append(launched)
        # Nothing launched (all in flight, or done): read one back, which frees its turn.
        keep = self._depth if launched is not None else len(in_flight) - 1
        while len(in_flight) > max(keep, 0):
            outputs += self._finish_step(in_flight.popleft(), finished_only)
        return outputs

    def _launch(self, in_flight: StepResult | None) -> StepResult | None:
        """Schedules and launches a step; the step that samples tokens, if any."""
        # Drafts need the sequences' tokens on the host: a speculating step is read back
        # before the next one is planned (no async overlap for it).
        speculating = self.speculator is not None and \
            self.speculator.propose(self.scheduler.running)
        batch = self.scheduler.schedule()
        self.stats.num_preemptions += len(batch.preempted)
        if not batch:
            return None
        self.stats.num_steps += 1
        self.stats.num_computed_tokens += batch.num_batched_tokens
        self.stats.num_prefix_hit_tokens += batch.num_prefix_hit_tokens
        result = self.runner.execute(batch, in_flight)
        result.micro_batch = batch.micro_batch
        self.scheduler.commit_step(batch)
        for seq in batch.seqs:  # after the forward, in its order: the KV they read is written
            if seq.kv_sink is not None:
                seq.kv_sink.on_computed(self.runner.kv_cache, seq.block_table,
                                        seq.num_computed_tokens, seq.num_prompt_tokens)
        for seq in result.seqs:
            seq.num_pending_tokens += 1
        result.needs_host_tokens |= speculating
        return result if result.samples else None

    def _finish_step(self, result: StepResult, finished_only: bool) -> list[RequestOutput]:
        """Appends a launched step's sampled tokens once they reach the host."""
        out = result.host_output()
        token_ids = out.sampled_token_ids.tolist()
        logprobs = _logprob_rows(out, len(token_ids))
        outputs = []
        for seq, rows in zip(result.seqs, self._emitted_rows(result)):
            if seq.is_finished:  # ended (stopped, aborted) while this step ran: a void token
                continue
            num_hashes = len(seq.block_hashes)
            for row in rows:
                seq.append_token(token_ids[row])
                if seq.params.logprobs is not None:
                    sampled, top = logprobs[row]
                    seq.output_logprobs.append((sampled, top[:seq.params.logprobs]))
                self._after_token(seq, token_ids[row])
                if seq.is_finished:  # tokens accepted after a stop are dropped
                    break
            if len(rows) > 1 and not seq.is_finished:  # give back rejected drafts' slots
                self.block_manager.trim(seq.block_table, seq.num_tokens)
            if len(seq.block_hashes) > num_hashes and not seq.is_finished:
                # The token completed a block whose KV the device already computed (it was
                # the input of the step in flight): the block joins the prefix cache now.
                self.block_manager.cache_full_blocks(seq.block_table, seq.block_hashes,
                                                     seq.num_computed_tokens, num_hashes)
            if seq.is_finished or not finished_only:
                outputs.append(self._output(seq))
            if seq.is_finished and not seq.hold_kv:
                self._forget(seq)
        return outputs

    def _emitted_rows(self, result: StepResult) -> list[range]:
        """Which output rows each sequence emits: its one row, or for a verify step its
        accepted drafts and the token after them. A verified sequence's KV then counts only
        the accepted drafts (the rest of what the step computed is rolled back)."""
        if result.num_rows is None:
            return [range(row, row + 1) for row in range(len(result.seqs))]
        emitted, start = [], 0
        for seq, rows, accepted in zip(result.seqs, result.num_rows,
                                       result.host_num_accepted()):
            num_drafted = rows - 1
            if num_drafted and not seq.is_finished:
                seq.num_computed_tokens -= num_drafted - accepted
                self.speculator.record(seq, num_drafted, accepted)
            emitted.append(range(start, start + accepted + 1))
            start += rows
        return emitted

    def _after_token(self, seq: Sequence, token_id: int) -> None:
        params = seq.params
        rid = seq.request_id
        if seq.grammar is not None and not seq.grammar.accept(token_id):
            # Only a token the mask did not cover gets here (an imported first token from an
            # engine that sampled without the grammar): the output cannot go on matching it.
            self._finish_text(seq, [])
            self.scheduler.finish(seq, FinishReason.STOP)
            return
        stop_token = token_id in params.stop_token_ids or token_id in seq.eos_token_ids
        if stop_token and seq.num_output_tokens > params.min_tokens - 1:
            self._finish_text(seq, [token_id] if params.include_stop_str_in_output else [])
            seq.stop_reason = token_id if token_id in params.stop_token_ids else None
            self.scheduler.finish(seq, FinishReason.STOP)
            return
        new_text = ""
        if rid in self._detokenizers:
            new_text = self._detokenizers[rid].add_tokens([token_id])
        matcher = self._stop_matchers.get(rid)
        if matcher is not None:
            emitted, stopped = matcher.feed(new_text)
            self._texts[rid] += emitted
            if stopped:
                seq.stop_reason = matcher.matched_stop
                self.scheduler.finish(seq, FinishReason.STOP)
                return
        else:
            self._texts[rid] += new_text
        if seq.grammar is not None and seq.grammar.terminated:  # complete, even with ignore_eos
            self._finish_text(seq, [])
            self.scheduler.finish(seq, FinishReason.STOP)
        elif len(seq.token_ids) >= seq.max_num_tokens:
            self._finish_text(seq, [])
            self.scheduler.finish(seq, FinishReason.LENGTH)

    def _finish_text(self, seq: Sequence, extra_tokens: list[int]) -> None:
        """Releases text held back by the detokenizer and the stop matcher at the end;
        extra_tokens (a stop token the user wants to see) are rendered first."""
        rid = seq.request_id
        tail = ""
        if rid in self._detokenizers:
            detokenizer = self._detokenizers[rid]
            tail = detokenizer.add_tokens(extra_tokens) + detokenizer.flush()
        matcher = self._stop_matchers.get(rid)
        if matcher is not None:
            emitted, _ = matcher.feed(tail) if tail else ("", False)
            tail = emitted + matcher.flush()
        self._texts[rid] += tail

    def output_of(self, seq: Sequence) -> RequestOutput:
        """The current output of a sequence (for callers that hold one, e.g. after an import
        that its replayed tokens already finished)."""
        return self._output(seq)

    def _output(self, seq: Sequence) -> RequestOutput:
        logprobs = None
        cumulative = None
        if seq.params.logprobs is not None:
            logprobs = [self._logprob_dict(s, top) for s, top in seq.output_logprobs]
            cumulative = sum(s[1] for s, _ in seq.output_logprobs)
        completion = CompletionOutput(
            index=0, text=self._texts.get(seq.request_id, ""),
            token_ids=list(seq.output_token_ids), cumulative_logprob=cumulative,
            logprobs=logprobs,
            finish_reason=seq.finish_reason.value if seq.finish_reason else None,
            stop_reason=seq.stop_reason)
        return RequestOutput(seq.request_id, getattr(seq, "prompt_text", None),
                             list(seq.prompt_token_ids), [completion], seq.is_finished,
                             num_cached_tokens=seq.num_cached_tokens)

    def _logprob_dict(self, sampled, top) -> dict[int, Logprob]:
        token_id, value = sampled
        entries = {tid: Logprob(lp, rank=i + 1) for i, (tid, lp) in enumerate(top)}
        if token_id not in entries:
            entries[token_id] = Logprob(value)
        return entries

    def _pop_output(self, seq: Sequence) -> RequestOutput:
        output = self._output(seq)
        self._forget(seq)
        return output

    def _forget(self, seq: Sequence) -> None:
        rid = seq.request_id
        self.seqs.pop(rid, None)
        self._detokenizers.pop(rid, None)
        self._stop_matchers.pop(rid, None)
        self._texts.pop(rid, None)

    # ---- KV export / import ------------------------------------------------------------------
    # A handoff between engines is a transaction: the receiver reserves blocks (reserve_kv),
    # the sender exports what the receiver lacks (export_kv), the receiver imports it
    # (import_kv) or gives the reservation back (abort_request). Every path frees blocks.

    def export_kv(self, request_id: str, skip_blocks: int = 0) -> bytes:
        """The KV of every computed token of a held sequence (add_request(hold_kv=True)),
        less the first skip_blocks blocks, which the receiver says it already holds."""
        num_tokens, blocks = self.export_kv_blocks(request_id, skip_blocks)
        return encode_kv(self.kv_layout, num_tokens, blocks, skip_blocks)

    def export_kv_blocks(self, request_id: str, skip_blocks: int = 0) -> tuple[int, torch.Tensor]:
        """(num_tokens, blocks [n, *kv_layout.block_shape] on the CPU): export_kv unencoded."""
        export = self.start_kv_export(request_id, skip_blocks)
        return export.num_tokens, export.wait()

    def start_kv_export(self, request_id: str, skip_blocks: int = 0,
                        out: torch.Tensor | None = None) -> KVExport:
        """Starts copying a held sequence's KV to the host and returns at once: the caller may
        release the sequence right away and wait for the copy on another thread, so the engine
        never stalls on a transfer. `out`, [n, *kv_layout.block_shape] on the CPU, receives the
        blocks (a transport's buffer: on CPU the engine copies straight into it)."""
        seq = self._held(request_id)
        num_tokens = seq.num_computed_tokens
        num_blocks = -(-num_tokens // self.config.block_size)
        if not 0 <= skip_blocks <= num_blocks:
            raise InvalidRequestError(f"skip_blocks={skip_blocks} outside [0, {num_blocks}]")
        shape = (num_blocks - skip_blocks, *self.kv_layout.block_shape)
        if out is not None and (tuple(out.shape) != shape or out.dtype != self.runner.kv_dtype):
            raise InvalidRequestError(f"an export buffer of {tuple(out.shape)} {out.dtype} "
                                      f"cannot hold {shape} {self.runner.kv_dtype}")
        copy = self.runner.read_blocks(seq.block_table[skip_blocks:num_blocks], out)
        return KVExport(num_tokens, copy, out)

    def held_blocks(self, request_id: str, skip_blocks: int = 0) -> tuple[int, list[int]]:
        """(num_tokens, block ids) of a held sequence's KV, less the first skip_blocks blocks:
        what a transport that writes into the receiver's blocks reads (runner.kv_cache). The
        blocks stay the sequence's, unchanged, until release()."""
        seq = self._held(request_id)
        num_tokens = seq.num_computed_tokens
        num_blocks = -(-num_tokens // self.config.block_size)
        if not 0 <= skip_blocks <= num_blocks:
            raise InvalidRequestError(f"skip_blocks={skip_blocks} outside [0, {num_blocks}]")
        return num_tokens, list(seq.block_table[skip_blocks:num_blocks])

    def release(self, request_id: str) -> None:
        """Frees a held sequence's blocks (after export, or when the transfer failed)."""
        seq = self._held(request_id)
        seq.hold_kv = False
        self.scheduler.free_blocks(seq)
        self._forget(seq)

    def _held(self, request_id: str) -> Sequence:
        seq = self.seqs.get(request_id)
        if seq is None or not seq.hold_kv:
            raise InvalidRequestError(f"no held sequence {request_id!r}")
        return seq

    def reserve_kv(self, request_id: str, prompt_token_ids: list[int],
                   params: SamplingParams | None = None) -> int:
        """Decode role, before a transfer: holds blocks for the prompt's KV. Leading full blocks
        already in this engine's prefix cache are reused; returns how many, so the sender can
        skip them. The reservation ends with import_kv or abort_request."""
        params = params or SamplingParams()
        self._validate(request_id, prompt_token_ids, params)
        seq = Sequence(request_id, list(prompt_token_ids), params, self.config.block_size,
                       arrival_time=time.monotonic())
        num_tokens = len(prompt_token_ids)
        cached = self.block_manager.cached_prefix_blocks(
            seq.block_hashes[:num_tokens // self.config.block_size])
        if not self.block_manager.allocate(seq.block_table, num_tokens, cached):
            raise OutOfKVBlocksError(f"{-(-num_tokens // self.config.block_size)} KV blocks "
                                     f"needed, {self.block_manager.num_free_blocks} free")
        seq.reserved_blocks = len(cached)
        self._register(seq)
        return len(cached)

    def reserved_block_ids(self, request_id: str) -> list[int]:
        """The blocks a reservation holds for KV still to come (after those its prefix cache
        had): where a transport that writes into this cache puts it."""
        seq = self.seqs.get(request_id)
        if seq is None or seq.reserved_blocks is None:
            raise InvalidRequestError(f"no reservation {request_id!r}")
        return list(seq.block_table[seq.reserved_blocks:])

    def import_kv(self, request_id: str, prompt_token_ids: list[int],
                  output_token_ids: list[int], kv_data: bytes,
                  params: SamplingParams | None = None, num_cached_tokens: int = 0) -> Sequence:
        """Continues a sequence whose KV another engine computed, into its reservation (or
        fresh blocks). The KV must cover every token but the last (the last sampled token is
        the next step's input). On any error a reservation stays held: abort_request frees it."""
        layout, num_tokens, skip_blocks, blocks = decode_kv(kv_data)
        return self.import_kv_blocks(request_id, prompt_token_ids, output_token_ids, layout,
                                     num_tokens, skip_blocks, blocks, params, num_cached_tokens)

    def import_kv_blocks(self, request_id: str, prompt_token_ids: list[int],
                         output_token_ids: list[int], layout: KVLayout, num_tokens: int,
                         skip_blocks: int, blocks: torch.Tensor | None,
                         params: SamplingParams | None = None,
                         num_cached_tokens: int = 0,
                         output_logprobs: list | None = None,
                         num_blocks: int | None = None) -> Sequence:
        """import_kv with the bytes already decoded (the worker's wire format carries them).
        `output_logprobs`, one (sampled (id, logprob), top [(id, logprob)]) per output token,
        carries the origin's logprobs over when the request asks for them.

        blocks=None commits KV that a transport already wrote into the reservation's blocks
        (reserved_block_ids): then num_blocks says how many it wrote, and nothing is copied."""
        self.kv_layout.check_matches(layout)
        in_place = blocks is None
        if in_place:
            num_sent = num_blocks or 0
        else:
            num_sent = blocks.shape[0]
            if tuple(blocks.shape[1:]) != layout.block_shape:
                raise InvalidRequestError(f"blocks of shape {tuple(blocks.shape[1:])}, not "
                                          f"{layout.block_shape}")
        vocab = self.runner.spec.vocab_size
        if any(not 0 <= t < vocab for t in output_token_ids):  # the next step embeds them
            raise InvalidRequestError(f"output token ids out of the vocabulary [0, {vocab}): "
                                      f"{list(output_token_ids)[:5]}")
        if skip_blocks + num_sent != -(-num_tokens // layout.block_size):
            raise InvalidRequestError(f"{num_sent} blocks after {skip_blocks} skipped "
                                      f"do not hold {num_tokens} tokens")
        if num_tokens != len(prompt_token_ids) + len(output_token_ids) - 1:
            raise InvalidRequestError(
                f"the KV covers {num_tokens} tokens; the sequence has "
                f"{len(prompt_token_ids) + len(output_token_ids)}, so it must cover one fewer")
        seq = self.seqs.get(request_id)
        if seq is None and in_place:
            raise InvalidRequestError(f"KV written in place for {request_id!r}, which holds "
                                      "no reservation")
        if seq is None:
            seq = self._fresh_import(request_id, prompt_token_ids, params, skip_blocks, blocks)
        elif seq.reserved_blocks is None or seq.prompt_token_ids != list(prompt_token_ids):
            raise InvalidRequestError(f"request {request_id!r} holds no reservation for this "
                                      "prompt")
        elif skip_blocks != seq.reserved_blocks:
            raise InvalidRequestError(f"the KV skips {skip_blocks} blocks; the reservation "
                                      f"holds {seq.reserved_blocks}")
        if not self.block_manager.allocate(seq.block_table, num_tokens):
            raise OutOfKVBlocksError("no KV blocks for the tokens beyond the prompt")
        if not in_place:
            self.runner.write_blocks(seq.block_table[skip_blocks:skip_blocks + num_sent], blocks)
        seq.reserved_blocks = None
        seq.num_cached_tokens = num_cached_tokens
        for i, token_id in enumerate(output_token_ids):  # replay: text and stop state as at origin
            seq.append_token(token_id)
            if seq.params.logprobs is not None and output_logprobs is not None:
                sampled, top = output_logprobs[i]
                seq.output_logprobs.append((sampled, top[:seq.params.logprobs]))
            self._after_token(seq, token_id)
            if seq.is_finished:
                self.block_manager.free(seq.block_table)
                self._forget(seq)
                return seq
        if seq.generator is not None:
            _skip_draws(seq.generator, len(output_token_ids), self.runner.spec.vocab_size)
        seq.num_computed_tokens = num_tokens
        self.block_manager.cache_full_blocks(seq.block_table, seq.block_hashes, num_tokens)
        self.scheduler.add(seq)
        return seq

    def _fresh_import(self, request_id, prompt_token_ids, params, skip_blocks, blocks):
        if skip_blocks:
            raise InvalidRequestError("the KV skips blocks but nothing was reserved for it")
        params = params or SamplingParams()
        self._validate(request_id, prompt_token_ids, params)
        if self.block_manager.num_free_blocks < blocks.shape[0]:
            raise OutOfKVBlocksError(f"{blocks.shape[0]} KV blocks needed, "
                                     f"{self.block_manager.num_free_blocks} free")
        seq = Sequence(request_id, list(prompt_token_ids), params, self.config.block_size,
                       arrival_time=time.monotonic())
        self._register(seq)
        return seq


def _skip_draws(generator: torch.Generator, num_steps: int, vocab_size: int) -> None:
    """Advance a seeded generator past the draws the exporting engine made (one vocab-sized
    draw per sampled token, the sampler's contract), so seeded sampling continues identically."""
    scratch = torch.empty(vocab_size, device=generator.device)
    for _ in range(num_steps):
        scratch.exponential_(generator=generator)


def _logprob_rows(out, num_rows: int) -> list[tuple[tuple[int, float], list[tuple[int, float]]]]:
    if out.sampled_logprobs is None:
        return [((0, 0.0), [])] * num_rows
    sampled_ids = out.sampled_token_ids.tolist()
    sampled = out.sampled_logprobs.tolist()
    top_ids = out.top_logprob_ids.tolist() if out.top_logprob_ids is not None else None
    top_vals = out.top_logprobs.tolist() if out.top_logprobs is not None else None
    rows = []
    for i in range(num_rows):
        top = list(zip(top_ids[i], top_vals[i])) if top_ids is not None else []
        rows.append(((sampled_ids[i], sampled[i]), top))
    return rows
