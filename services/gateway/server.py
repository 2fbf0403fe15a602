"""Runs the gateway: `python -m pagewire.services.gateway.server [flags]`, defaults from env."""

from __future__ import annotations

import argparse
import dataclasses

import uvicorn

from pagewire.tools.parsers import PARSERS

from .app import create_app
from .config import GatewayConfig


def parse_config(argv: list[str] | None = None) -> GatewayConfig:
    defaults = GatewayConfig.from_env()
    parser = argparse.ArgumentParser(description="pagewire OpenAI-compatible HTTP gateway")
    parser.add_argument("--host", default=defaults.host)
    parser.add_argument("--port", type=int, default=defaults.port)
    parser.add_argument("--tokenizer-address", default=defaults.tokenizer_address)
    parser.add_argument("--router-address", default=defaults.router_address)
    parser.add_argument("--api-key", default=defaults.api_key)
    parser.add_argument("--request-timeout-s", type=float, default=defaults.request_timeout_s,
                        help="env PAGEWIRE_GATEWAY_REQUEST_TIMEOUT_S")
    parser.add_argument("--keep-alive-s", type=float, default=defaults.keep_alive_s,
                        help="idle HTTP connection lifetime (env PAGEWIRE_GATEWAY_KEEP_ALIVE_S)")
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes,
                        help="largest request body (env PAGEWIRE_GATEWAY_MAX_BODY_BYTES)")
    parser.add_argument("--max-n", type=int, default=defaults.max_n,
                        help="most choices per request (env PAGEWIRE_GATEWAY_MAX_N)")
    parser.add_argument("--max-stop-strings", type=int, default=defaults.max_stop_strings,
                        help="most stop strings per request (env "
                             "PAGEWIRE_GATEWAY_MAX_STOP_STRINGS)")
    parser.add_argument("--max-stop-string-chars", type=int,
                        default=defaults.max_stop_string_chars,
                        help="longest stop string (env PAGEWIRE_GATEWAY_MAX_STOP_STRING_CHARS)")
    parser.add_argument("--tool-call-parser", default=defaults.tool_call_parser,
                        choices=sorted(PARSERS),
                        help="how tool_choice auto finds calls in the model's text (env "
                             "PAGEWIRE_TOOL_CALL_PARSER)")
    args = parser.parse_args(argv)
    return dataclasses.replace(defaults, **vars(args))


def uvicorn_config(config: GatewayConfig, **overrides) -> uvicorn.Config:
    """The HTTP server's settings for `config`; tests override host, port and logging."""
    settings = {"host": config.host, "port": config.port, "log_level": "info",
                "timeout_keep_alive": config.keep_alive_s, **overrides}
    return uvicorn.Config(create_app(config), **settings)


def main(argv: list[str] | None = None) -> None:
    uvicorn.Server(uvicorn_config(parse_config(argv))).run()


if __name__ == "__main__":
    main()
