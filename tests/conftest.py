"""Fixtures shared by every test folder: the embedded model, once per session."""

from __future__ import annotations

import os

import pytest
import torch

# First: importing pagewire drops the checkout root that `python -m pytest` puts on sys.path
# (pagewire/import_roots.py), before anything imports transformers and, through it, `kernels`.
import pagewire  # noqa: F401

# Kernel tests run Triton's interpreter on CPU. Triton jits its own library (tl.sum's combine
# function...) when it is first imported, in whatever mode TRITON_INTERPRET says then, and any
# test may import it first (transformers probes for it): so it is set here, before them all.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Two cores: keep torch from oversubscribing them when pytest and a helper both compute.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def embedded_source():
    from pagewire.model.model_source import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="session")
def tokenizer(embedded_source):
    from pagewire.tokenizer.loader import load_tokenizer

    return load_tokenizer(embedded_source)


@pytest.fixture(scope="session")
def llm():
    """One offline engine on the embedded model, shared by every test that only reads it."""
    from tests.engine.helpers import make_llm

    return make_llm()
