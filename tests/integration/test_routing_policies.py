"""The router's prefill choice: prefix-aware routing keeps a shared prompt on the worker that
caches it; round-robin (the baseline it is measured against) spreads it blindly."""

from __future__ import annotations

import pytest

from tests.integration.stack import Stack

SYSTEM = ("You are the librarian of a small town library. Answer briefly, say on which shelf "
          "the book stands, and remind the reader that returns are due in three weeks. ") * 2
QUESTIONS = ["Where are the atlases?", "Do you have poetry?", "Where is the cookbook shelf?",
             "Are there comics?", "Where can I find history books?", "Any books on birds?"]


@pytest.mark.parametrize("policy", ["prefix", "round-robin"])
def test_prefill_choice_follows_the_policy(policy):
    stack = Stack(roles=("prefill", "prefill", "decode"), routing_policy=policy)
    try:
        client = stack.client()
        model = client.models.list().data[0].id
        cached = []
        for question in QUESTIONS:  # one at a time: load never decides
            reply = client.chat.completions.create(
                model=model, max_tokens=1, temperature=0,
                messages=[{"role": "system", "content": SYSTEM},
                          {"role": "user", "content": question}])
            cached.append(reply.usage.prompt_tokens_details.cached_tokens)
        served = sorted(s.served for s in stack.worker_stats()[:2])
    finally:
        stack.stop()
    if policy == "prefix":
        assert served == [0, len(QUESTIONS)]  # every request follows the cached prefix
        assert all(c > 0 for c in cached[1:])
    else:
        assert served == [len(QUESTIONS) // 2] * 2  # in turn, whatever either one caches
        assert cached[1] == 0 and all(c > 0 for c in cached[2:])  # each worker misses once


def test_colocated_workers_never_ship_kv_to_each_other():
    """Two workers in role `both`: the one that caches the prefix prefills and decodes too.
    Picking the decode worker apart (by load alone) shipped the prompt's KV between two
    workers that could each have done the whole request."""
    stack = Stack(roles=("both", "both"))
    try:
        client = stack.client()
        model = client.models.list().data[0].id

        def ask(question):
            client.chat.completions.create(
                model=model, max_tokens=2, temperature=0,
                messages=[{"role": "system", "content": SYSTEM},
                          {"role": "user", "content": question}])

        # A long request busies the first worker (ties go to the lowest id), so the prefix
        # lands on the other; later, with both idle, load alone would pick the first again.
        busy = client.completions.create(model=model, prompt="Count to a hundred:",
                                         max_tokens=48, temperature=0, stream=True)
        next(iter(busy))
        ask(QUESTIONS[0])
        for _ in busy:
            pass
        for question in QUESTIONS[1:]:
            ask(question)
        served = [s.served for s in stack.worker_stats()]
    finally:
        stack.stop()
    assert sum(served) == len(QUESTIONS) + 1  # a transfer counts on both of its workers
