"""`pagewire bench`: the serving benchmark, against any OpenAI-compatible server.

Metrics are those of vLLM's `vllm bench serve` (TTFT, TPOT, ITL, E2E latency, throughput,
goodput). Only the client lives here: nothing in this package imports the engine or torch.
"""
