"""The CLI parses what the README and compose files will pass it."""

from __future__ import annotations

import pytest

from pagewire.cli import SERVICES, build_parser


def test_serve_passes_service_flags_through():
    args = build_parser().parse_args(["serve", "tokenizer", "--port", "50061"])
    assert args.role == "tokenizer" and args.service_args == ["--port", "50061"]
    assert {"tokenizer", "prefill", "decode"} <= set(SERVICES)


def test_serve_rejects_unknown_roles():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "nonsense"])


def test_generate_flags():
    args = build_parser().parse_args(["generate", "hi", "--max-tokens", "3", "--chat"])
    assert args.prompt == ["hi"] and args.max_tokens == 3 and args.chat
