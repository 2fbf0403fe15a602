"""The benchmark's workloads and arrivals: seeded, shaped as configured."""

from __future__ import annotations

import dataclasses
import math

import pytest

from pagewire.bench.config import BenchConfig, DatasetConfig, LoadConfig, parse_goodput
from pagewire.bench.datasets import FIRST_ID, build_dataset
from pagewire.bench.load import arrival_gaps


def test_random_lengths_stay_in_range_and_ids_below_the_vocabulary():
    config = DatasetConfig(num_prompts=200, input_len=40, output_len=10, range_ratio=0.5,
                           vocab_size=500)
    sessions = build_dataset(config)
    requests = [session[0] for session in sessions]
    assert len(requests) == 200 and all(len(s) == 1 for s in sessions)
    assert {len(r.prompt) for r in requests} <= set(range(20, 61))
    assert len({len(r.prompt) for r in requests}) > 10
    assert {r.output_len for r in requests} <= set(range(5, 16))
    assert all(FIRST_ID <= i < 500 for r in requests for i in r.prompt)
    assert all(r.prompt_len == len(r.prompt) for r in requests)


def test_the_same_seed_makes_the_same_workload_and_another_seed_another():
    config = DatasetConfig(num_prompts=5, input_len=8, output_len=4, range_ratio=0.5)
    assert build_dataset(config) == build_dataset(config)
    assert build_dataset(config) != build_dataset(dataclasses.replace(config, seed=1))


def test_text_prompts_have_the_asked_number_of_words():
    config = DatasetConfig(num_prompts=3, input_len=12, output_len=4, prompt_format="text")
    assert all(len(s[0].prompt.split()) == 12 for s in build_dataset(config))


def test_shared_prefix_spreads_questions_over_k_system_prompts():
    config = DatasetConfig(name="shared-prefix", num_prompts=12, num_prefixes=3, prefix_len=20,
                           input_len=5, output_len=4)
    requests = [session[0] for session in build_dataset(config)]
    assert all(r.is_chat for r in requests)
    systems = [r.system for r in requests]
    assert len(set(systems)) == 3 and all(systems.count(s) == 4 for s in set(systems))
    assert len({r.user for r in requests}) == 12
    assert any(systems[i] != systems[i + 3] for i in range(9))  # not round-robin: shuffled


def test_multi_turn_makes_conversations_of_the_asked_turns():
    config = DatasetConfig(name="multi-turn", num_prompts=4, turns=3, input_len=6, output_len=5)
    sessions = build_dataset(config)
    assert [len(s) for s in sessions] == [3] * 4
    assert all(r.is_chat and r.system is None and r.output_len == 5 for s in sessions for r in s)


def test_poisson_gaps_average_one_over_the_rate_and_are_seeded():
    gaps = arrival_gaps(4000, LoadConfig(request_rate=8.0, seed=3))
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 8, rel=0.06)
    assert gaps == arrival_gaps(4000, LoadConfig(request_rate=8.0, seed=3))
    assert arrival_gaps(3, LoadConfig()) == [0.0, 0.0, 0.0]


def test_burstiness_changes_the_spread_not_the_mean():
    def spread(burstiness):
        gaps = arrival_gaps(4000, LoadConfig(request_rate=4.0, burstiness=burstiness))
        mean = sum(gaps) / len(gaps)
        return mean, math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps)) / mean
    (mean_1, cv_1), (mean_4, cv_4) = spread(1.0), spread(4.0)
    assert mean_1 == pytest.approx(0.25, rel=0.06) and mean_4 == pytest.approx(0.25, rel=0.06)
    assert cv_1 == pytest.approx(1.0, rel=0.1) and cv_4 == pytest.approx(0.5, rel=0.1)


def test_configs_refuse_bad_values_with_the_valid_names():
    with pytest.raises(ValueError, match="random, shared-prefix, multi-turn"):
        DatasetConfig(name="sharegpt")
    with pytest.raises(ValueError, match="request_rate"):
        LoadConfig(request_rate=0)
    with pytest.raises(ValueError, match="ttft, tpot, e2el"):
        BenchConfig("http://x", goodput_slos_ms={"itl": 5.0})
    with pytest.raises(ValueError, match="NAME:MILLISECONDS"):
        parse_goodput(["ttft=5"])
    assert parse_goodput(["ttft:500", "TPOT:50"]) == {"ttft": 500.0, "tpot": 50.0}


def test_base_url_works_with_or_without_v1():
    assert BenchConfig("http://h:1/v1/").root_url == "http://h:1"
    assert BenchConfig("http://h:1").root_url == "http://h:1"
