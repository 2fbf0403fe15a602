"""The tokenizer service's config: environment, flags and validation."""

import pytest

from pagewire.services.tokenizer.config import TokenizerConfig
from pagewire.services.tokenizer.server import parse_args


def test_config_reads_the_environment(monkeypatch):
    monkeypatch.setenv("PAGEWIRE_MODEL", "/models/x")
    monkeypatch.setenv("PAGEWIRE_TOKENIZER_HOST", "0.0.0.0")
    monkeypatch.setenv("PAGEWIRE_TOKENIZER_PORT", "6000")
    expected = TokenizerConfig(model="/models/x", host="0.0.0.0", port=6000)
    assert TokenizerConfig.from_env() == expected


def test_flags_override_the_environment(monkeypatch):
    monkeypatch.setenv("PAGEWIRE_TOKENIZER_PORT", "6000")
    assert parse_args([]).port == 6000
    assert parse_args(["--port", "7000"]).port == 7000
    assert parse_args([]).model is None


@pytest.mark.parametrize("kwargs", [{"port": -1}, {"port": 70000}, {"host": ""},
                                    {"max_message_bytes": 0}])
def test_config_rejects_bad_values_at_construction(kwargs):
    with pytest.raises(ValueError):
        TokenizerConfig(**kwargs)


def test_bad_port_variable_names_the_variable(monkeypatch):
    monkeypatch.setenv("PAGEWIRE_TOKENIZER_PORT", "http")
    with pytest.raises(ValueError, match="PAGEWIRE_TOKENIZER_PORT"):
        TokenizerConfig.from_env()
