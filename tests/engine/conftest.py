"""Engine tests run the real embedded model (SmolLM2-135M, float32 on CPU)."""

from __future__ import annotations

import pytest
import torch

from tests.engine.helpers import make_llm


@pytest.fixture(scope="session")
def llm():
    return make_llm()


@pytest.fixture(scope="session")
def hf_model():
    """Hugging Face transformers' own model, loaded straight from the same GGUF file."""
    from transformers import AutoModelForCausalLM

    from pagewire.model.model_source import embedded_gguf_path

    path = embedded_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32)
    return model.eval()
