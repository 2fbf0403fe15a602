"""Sampler and SamplingParams on CPU tensors: numerics, masking, seeding, validation."""

import dataclasses
import math

import pytest
import torch

from pagewire.sampling.params import SamplingParams
from pagewire.sampling.sampler import (
    Sampler,
    SamplingMetadata,
    apply_penalties,
    make_generator,
)


def build(params, logits, prompts=None, outputs=None, generators=None):
    rows = len(params)
    return SamplingMetadata.build(
        params,
        prompts if prompts is not None else [[] for _ in range(rows)],
        outputs if outputs is not None else [[] for _ in range(rows)],
        generators if generators is not None else [None] * rows,
        vocab_size=logits.shape[-1],
        device=logits.device,
    )


def sample(logits, params, **kwargs):
    return Sampler()(logits, build(params, logits, **kwargs))


def sample_many(probs, params, num_draws):
    """num_draws rows of the same distribution, one batched call; returns token counts."""
    logits = torch.tensor(probs).log().expand(num_draws, -1).contiguous()
    ids = sample(logits, [params] * num_draws).sampled_token_ids
    return torch.bincount(ids, minlength=len(probs)).float()


def chi_square(counts, expected_probs):
    expected = torch.tensor(expected_probs) * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# -- greedy ---------------------------------------------------------------------------------------


def test_greedy_equals_argmax():
    logits = torch.randn(6, 100, generator=torch.Generator().manual_seed(0))
    out = sample(logits, [SamplingParams(temperature=0.0)] * 6)
    assert torch.equal(out.sampled_token_ids, logits.argmax(dim=-1))
    assert out.sampled_token_ids.dtype == torch.int64
    assert out.sampled_logprobs is None and out.top_logprob_ids is None


def test_greedy_takes_first_index_on_ties():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0]])
    assert sample(logits, [SamplingParams(temperature=0.0)]).sampled_token_ids.tolist() == [1]


def test_tiny_temperature_is_greedy_like_vllm():
    assert SamplingParams(temperature=1e-6).greedy
    assert not SamplingParams(temperature=1e-4).greedy


def test_mixed_batch_greedy_rows_are_argmax():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.0) for i in range(8)]
    out = sample(logits, params)
    assert torch.equal(out.sampled_token_ids[1::2], logits[1::2].argmax(dim=-1))


def test_bf16_logits_are_not_mutated():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(2)).bfloat16()
    before = logits.clone()
    params = [SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.3)] * 4
    sample(logits, params, outputs=[[1, 2]] * 4)
    assert torch.equal(logits, before)


# -- temperature ----------------------------------------------------------------------------------

PROBS = [0.1, 0.2, 0.3, 0.4]
# Chi-square critical value for 3 degrees of freedom at p = 1e-4: a real bug lands far above.
CHI2_LIMIT = 21.1


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_samples_follow_tempered_distribution(temperature):
    torch.manual_seed(0)
    counts = sample_many(PROBS, SamplingParams(temperature=temperature), 20_000)
    tempered = torch.tensor(PROBS) ** (1 / temperature)
    assert chi_square(counts, (tempered / tempered.sum()).tolist()) < CHI2_LIMIT


def test_seeded_row_samples_follow_distribution():
    generator = make_generator(7, "cpu")
    logits = torch.tensor([PROBS]).log()
    params = [SamplingParams(seed=7)]
    meta = build(params, logits, generators=[generator])
    ids = [Sampler()(logits, meta).sampled_token_ids for _ in range(4000)]
    counts = torch.bincount(torch.cat(ids), minlength=4).float()
    assert chi_square(counts, PROBS) < CHI2_LIMIT


# -- filters --------------------------------------------------------------------------------------


def test_top_k_1_equals_greedy():
    logits = torch.randn(16, 200, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    out = sample(logits, [SamplingParams(temperature=1.5, top_k=1)] * 16)
    assert torch.equal(out.sampled_token_ids, logits.argmax(dim=-1))


@pytest.mark.parametrize(
    ("params", "probs", "allowed"),
    [
        (SamplingParams(top_k=2), [0.1, 0.2, 0.3, 0.4], {2, 3}),
        (SamplingParams(top_p=0.75), [0.5, 0.3, 0.15, 0.05], {0, 1}),
        (SamplingParams(min_p=0.5), [0.4, 0.3, 0.19, 0.11], {0, 1}),
        # top_p acts on the top_k-renormalized probs: 0.45/0.7, 0.25/0.7 -> keep both for 0.9.
        (SamplingParams(top_k=2, top_p=0.9), [0.45, 0.25, 0.2, 0.1], {0, 1}),
        (SamplingParams(top_k=3, top_p=0.6), [0.45, 0.25, 0.2, 0.1], {0, 1}),
        (SamplingParams(min_p=0.3, top_k=3), [0.3, 0.05, 0.25, 0.4], {0, 2, 3}),
        # The top token survives top_p even when 1 - top_p rounds to 1.0 in float32.
        (SamplingParams(top_p=1e-9), [0.25, 0.25, 0.2, 0.3], {3}),
    ],
)
def test_filters_never_pick_masked_tokens(params, probs, allowed):
    torch.manual_seed(0)
    counts = sample_many(probs, params, 5_000)
    picked = {i for i, c in enumerate(counts.tolist()) if c > 0}
    assert picked == allowed


def test_filters_apply_per_row():
    num_draws = 500
    logits = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).log().expand(3 * num_draws, -1)
    # Rows cycle through three settings; one batched call samples each num_draws times.
    params = [SamplingParams(top_k=1), SamplingParams(), SamplingParams(top_p=0.5)] * num_draws
    torch.manual_seed(0)
    ids = sample(logits.contiguous(), params).sampled_token_ids.view(num_draws, 3)
    assert set(ids[:, 0].tolist()) == {3}
    assert set(ids[:, 1].tolist()) == {0, 1, 2, 3}
    assert set(ids[:, 2].tolist()) == {2, 3}


def test_unused_filters_and_penalties_build_no_tensors():
    logits = torch.zeros(2, 10)
    greedy_with_stray_filters = SamplingParams(temperature=0.0, top_k=5, top_p=0.5, min_p=0.1)
    meta = build([greedy_with_stray_filters, SamplingParams(top_k=-1)], logits)
    assert meta.top_k is None and meta.top_p is None and meta.min_p is None
    assert meta.prompt_token_ids is None and meta.output_token_ids is None
    assert not meta.all_greedy and not meta.all_random


# -- seeds ----------------------------------------------------------------------------------------


def run_steps(logits, params, seeded_row, seed, num_steps=5):
    """Sample num_steps times with a fresh generator for the seeded row; return its tokens."""
    generators = [make_generator(seed, "cpu") if p.seed is not None else None for p in params]
    generators[seeded_row] = make_generator(seed, "cpu")
    meta = build(params, logits, generators=generators)
    return [int(Sampler()(logits, meta).sampled_token_ids[seeded_row]) for _ in range(num_steps)]


def test_seeded_row_is_reproducible_and_independent_of_batch():
    vocab = 1000
    row = torch.randn(vocab, generator=torch.Generator().manual_seed(4))
    seeded = SamplingParams(seed=1234, temperature=1.0)
    alone = run_steps(row.unsqueeze(0), [seeded], 0, 1234)
    assert alone == run_steps(row.unsqueeze(0), [seeded], 0, 1234)

    other = torch.randn(5, vocab, generator=torch.Generator().manual_seed(5))
    batch_a = torch.cat([row.unsqueeze(0), other[:3]])
    params_a = [seeded, SamplingParams(), SamplingParams(temperature=0.0), SamplingParams()]
    torch.manual_seed(11)
    assert run_steps(batch_a, params_a, 0, 1234) == alone

    batch_b = torch.cat([other[3:], row.unsqueeze(0)])
    params_b = [SamplingParams(seed=99, top_k=5), SamplingParams(top_p=0.3), seeded]
    torch.manual_seed(12)
    assert run_steps(batch_b, params_b, 2, 1234) == alone


def test_seeded_generator_advances_across_steps_and_seeds_differ():
    uniform = torch.zeros(1, 10_000)
    params = [SamplingParams(seed=1)]
    steps = run_steps(uniform, params, 0, 1, num_steps=4)
    assert len(set(steps)) > 1
    assert steps != run_steps(uniform, [SamplingParams(seed=2)], 0, 2, num_steps=4)


def test_greedy_row_leaves_its_generator_untouched():
    generator = make_generator(3, "cpu")
    state = generator.get_state()
    logits = torch.randn(2, 20)
    params = [SamplingParams(temperature=0.0, seed=3), SamplingParams()]
    sample(logits, params, generators=[generator, None])
    assert torch.equal(generator.get_state(), state)


# -- penalties ------------------------------------------------------------------------------------


def test_penalties_match_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0, -2.0, 0.0], [2.0, -1.0, 0.5, 1.0, -2.0, 0.0]])
    params = [
        SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
        SamplingParams(),  # neutral row in the same batch, with a shorter (padded) history
    ]
    meta = build(params, logits, prompts=[[0, 5], [2]], outputs=[[1, 1, 3], [4]])
    penalized = apply_penalties(logits, meta)
    # Row 0: seen = {0, 5} prompt + {1, 3} output; output counts: 1 -> 2, 3 -> 1.
    # repetition: 2/2=1, -1*2=-2, 0.5 unseen, 1/2=0.5, -2 unseen, 0*2=0
    # frequency: -2*0.5 on token 1, -1*0.5 on token 3; presence: -0.25 on tokens 1 and 3.
    expected_row0 = [1.0, -2.0 - 1.0 - 0.25, 0.5, 0.5 - 0.5 - 0.25, -2.0, 0.0]
    torch.testing.assert_close(penalized[0], torch.tensor(expected_row0))
    torch.testing.assert_close(penalized[1], logits[1])


def test_repetition_penalty_counts_prompt_but_frequency_does_not():
    logits = torch.tensor([[1.0, 1.0, 1.0]])
    meta = build(
        [SamplingParams(frequency_penalty=1.0, presence_penalty=1.0)],
        logits,
        prompts=[[0]],
        outputs=[[]],
    )
    torch.testing.assert_close(apply_penalties(logits, meta), logits)
    meta = build([SamplingParams(repetition_penalty=4.0)], logits, prompts=[[0]], outputs=[[]])
    torch.testing.assert_close(apply_penalties(logits, meta), torch.tensor([[0.25, 1.0, 1.0]]))


def test_penalties_change_the_greedy_choice():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    params = [SamplingParams(temperature=0.0, presence_penalty=0.5)]
    assert sample(logits, params, outputs=[[0]]).sampled_token_ids.tolist() == [1]


# -- logprobs -------------------------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax_sorted_descending():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(6))
    params = [
        SamplingParams(logprobs=5, temperature=0.3, repetition_penalty=1.5),
        SamplingParams(),
        SamplingParams(logprobs=2, temperature=0.0, presence_penalty=1.0),
    ]
    out = sample(logits, params, outputs=[[1, 2], [3], [4]])
    raw = torch.log_softmax(logits, dim=-1)
    assert out.top_logprob_ids.shape == (3, 5) and out.top_logprobs.shape == (3, 5)
    torch.testing.assert_close(out.top_logprobs, raw.gather(1, out.top_logprob_ids))
    assert torch.equal(out.top_logprob_ids, raw.argsort(dim=-1, descending=True)[:, :5])
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()
    expected = raw.gather(1, out.sampled_token_ids.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(out.sampled_logprobs, expected)


def test_logprobs_zero_returns_only_the_sampled_logprob():
    logits = torch.randn(2, 10)
    out = sample(logits, [SamplingParams(logprobs=0, temperature=0.0)] * 2)
    assert out.top_logprob_ids.shape == (2, 0)
    expected = torch.log_softmax(logits, dim=-1).amax(dim=-1)
    torch.testing.assert_close(out.sampled_logprobs, expected)


# -- params ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n": 0}, "n"),
        ({"n": 1.5}, "n"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.1}, "min_p"),
        ({"seed": "42"}, "seed"),
        ({"seed": 1.0}, "seed"),
        ({"seed": True}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"presence_penalty": -2.1}, "presence_penalty"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"frequency_penalty": "0.5"}, "frequency_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": 21}, "logprobs"),
        ({"stop": ""}, "stop"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop": [1]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": 2}, "stop_token_ids"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"skip_special_tokens": 1}, "skip_special_tokens"),
    ],
)
def test_invalid_params_raise_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_error_message_states_constraint_and_value():
    with pytest.raises(ValueError, match=r"^temperature must be >= 0, got -1$"):
        SamplingParams(temperature=-1)


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.max_tokens, p.min_tokens, p.seed, p.logprobs) == (16, 0, None, None)
    assert p.stop == [] and p.stop_token_ids == []
    assert not p.ignore_eos and not p.include_stop_str_in_output and p.skip_special_tokens
    assert SamplingParams(max_tokens=None, min_tokens=100).max_tokens is None


def test_stop_is_normalized_to_a_list():
    assert SamplingParams(stop="\n").stop == ["\n"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=(7,)).stop_token_ids == [7]


def test_params_are_frozen_and_clone_copies_lists():
    p = SamplingParams(stop=["x"], temperature=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 1.0
    copy = p.clone()
    assert copy == p and copy.stop is not p.stop
    assert dataclasses.replace(p, top_p=0.5).top_p == 0.5
    with pytest.raises(ValueError, match="top_p"):
        dataclasses.replace(p, top_p=0.0)
