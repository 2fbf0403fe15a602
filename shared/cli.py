"""The `pagewire` command: `pagewire generate` (one-shot generation, offline engine) and
`pagewire serve ROLE` (one service alone: what compose runs) and `pagewire up` (the whole
pipeline on this machine) and `pagewire bench serve|sweep` (the serving benchmark, against any
OpenAI-compatible server)."""

from __future__ import annotations

import argparse
import sys
import time


def _generate(args: argparse.Namespace) -> int:
    from pagewire import LLM, SamplingParams

    llm = LLM(model=args.model, dtype=args.dtype, show_progress=False)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p,
                            max_tokens=args.max_tokens, seed=args.seed)
    start = time.perf_counter()
    if args.chat:
        outputs = llm.chat([{"role": "user", "content": p} for p in args.prompt][:1], params)
    else:
        outputs = llm.generate(args.prompt, params)
    elapsed = time.perf_counter() - start
    num_tokens = 0
    for output in outputs:
        completion = output.outputs[0]
        num_tokens += len(completion.token_ids)
        print(f"--- prompt: {output.prompt!r}" if output.prompt else "--- chat")
        print(completion.text)
        print(f"--- finish_reason={completion.finish_reason} tokens={len(completion.token_ids)}")
    print(f"{num_tokens} tokens in {elapsed:.2f} s ({num_tokens / elapsed:.1f} tokens/s)",
          file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagewire", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate text for prompts, offline")
    gen.add_argument("prompt", nargs="+", help="one or more prompts")
    gen.add_argument("--model", default=None,
                     help="HF model directory or .gguf file (default: embedded SmolLM2-135M)")
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--chat", action="store_true", help="apply the chat template to the prompt")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(func=_generate)
    # `up` and `serve` hand their own flags to the launcher / the service (see main()).
    commands.add_parser("up", help="run the whole pipeline locally (see pagewire up -h)")
    commands.add_parser("bench", help="benchmark a server: serve | sweep (see pagewire bench -h)")
    serve = commands.add_parser("serve", help="run one service (flags also read env vars)")
    serve.add_argument("role", choices=sorted(SERVICES), help="which service")
    serve.add_argument("service_args", nargs=argparse.REMAINDER,
                       help="the service's own flags (see pagewire serve ROLE --help)")
    serve.set_defaults(func=_serve)
    return parser


# role -> module whose main(argv) runs that service
SERVICES = {
    "tokenizer": "pagewire.services.tokenizer.server",
    "prefill": "pagewire.services.worker.server",
    "decode": "pagewire.services.worker.server",
    "worker": "pagewire.services.worker.server",  # role from --role / PAGEWIRE_WORKER_ROLE
    "router": "pagewire.services.router.server",
    "gateway": "pagewire.services.gateway.server",
}


def _serve(args: argparse.Namespace) -> int:
    import importlib

    argv = list(args.service_args)
    if args.role in ("prefill", "decode"):
        argv = ["--role", args.role, *argv]
    return importlib.import_module(SERVICES[args.role]).main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["up"]:
        from pagewire.launcher import main as up

        return up(argv[1:])
    if argv[:1] == ["bench"]:
        from pagewire.bench.cli import main as bench

        return bench(argv[1:])
    if argv[:1] == ["serve"] and len(argv) > 1 and argv[1] in SERVICES:
        return _serve(argparse.Namespace(role=argv[1], service_args=argv[2:]))
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"pagewire: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
