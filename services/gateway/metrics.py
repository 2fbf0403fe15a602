"""The gateway's Prometheus metrics, named after vLLM's (`vllm:` becomes `pagewire:`).

Request-level series (latencies, tokens, finish reasons, prefix hits, KV transfers) are observed
here, one set per choice, as the router's token stream passes through. Worker-level series (load
and KV occupancy per worker) are read from the router at scrape time, so they are exactly what
the registry holds now and no stale worker lingers. Each app owns its registry: several gateways
in one process (tests) never share counters.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from pagewire.v1 import common_pb2, router_pb2

# Buckets of vLLM's histograms of the same names, so dashboards carry over.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TRANSFER_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0, 2.5, 5.0, 10.0)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("pagewire:time_to_first_token_seconds",
                              "Time from request arrival to its first token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("pagewire:time_per_output_token_seconds",
                              "Time per output token after the first (one sample per token).",
                              buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("pagewire:e2e_request_latency_seconds",
                             "Time from request arrival to its last token.",
                             buckets=E2E_BUCKETS, registry=r)
        self.success = Counter("pagewire:request_success", "Finished requests (per choice).",
                               ["finished_reason"], registry=r)
        self.failure = Counter("pagewire:request_failure",
                               "Requests (per choice) ended by an error, by gRPC status.",
                               ["code"], registry=r)
        self.prompt_tokens = Counter("pagewire:prompt_tokens", "Prompt tokens processed.",
                                     registry=r)
        self.generation_tokens = Counter("pagewire:generation_tokens", "Tokens generated.",
                                         registry=r)
        self.prefix_queries = Counter("pagewire:prefix_cache_queries",
                                      "Prompt tokens looked up in a prefix cache.", registry=r)
        self.prefix_hits = Counter("pagewire:prefix_cache_hits",
                                   "Prompt tokens served from a prefix cache.", registry=r)
        self.kv_transfer_bytes = Counter("pagewire:kv_transfer_bytes",
                                         "KV cache bytes pushed from prefill to decode workers.",
                                         ["transport"], registry=r)
        self.kv_transfer_seconds = Histogram("pagewire:kv_transfer_seconds",
                                             "Duration of one request's KV push.",
                                             ["transport"], buckets=TRANSFER_BUCKETS,
                                             registry=r)
        self.prefill_decisions = Counter(
            "pagewire:prefill_decisions",
            "Disaggregated requests by where the router had their prompt computed: remote "
            "(a prefill worker, KV moved) or local (the decode worker, and why).",
            ["decision"], registry=r)

    def choice(self) -> ChoiceTimer:
        return ChoiceTimer(self)

    def render(self, cluster: router_pb2.ClusterInfo | None) -> bytes:
        text = generate_latest(self.registry)
        if cluster is not None:
            workers = CollectorRegistry()
            workers.register(_ClusterCollector(cluster))
            text += generate_latest(workers)
        return text


class ChoiceTimer:
    """Observes one choice's trip through the router stream."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._m = metrics
        self._start = self._last = time.perf_counter()
        self._first = True
        self._done = False

    def on_batch(self, batch: common_pb2.TokenBatch) -> None:
        now, m, count = time.perf_counter(), self._m, len(batch.token_ids)
        if self._first:
            self._first = False
            m.ttft.observe(now - self._start)
            m.prompt_tokens.inc(batch.prompt_tokens)
            m.prefix_queries.inc(batch.prompt_tokens)
            m.prefix_hits.inc(batch.cached_tokens)
            if batch.kv_transfer_bytes:
                transport = batch.kv_transport or "grpc"
                m.kv_transfer_bytes.labels(transport).inc(batch.kv_transfer_bytes)
                m.kv_transfer_seconds.labels(transport).observe(batch.kv_transfer_us / 1e6)
            if batch.prefill_decision:
                m.prefill_decisions.labels(batch.prefill_decision).inc()
        else:  # a step may carry several tokens: each gets its share of the gap
            for _ in range(count):
                m.tpot.observe((now - self._last) / count)
        m.generation_tokens.inc(len(batch.token_ids))
        self._last = now

    def on_finish(self, reason: str) -> None:
        if not self._done:
            self._done = True
            self._m.success.labels(finished_reason=reason).inc()
            self._m.e2e.observe(time.perf_counter() - self._start)

    def on_error(self, code: str) -> None:
        if not self._done:
            self._done = True
            self._m.failure.labels(code=code).inc()


class _ClusterCollector:
    """Per-worker gauges from one GetCluster answer."""

    def __init__(self, cluster: router_pb2.ClusterInfo) -> None:
        self._cluster = cluster

    def collect(self):
        labels = ["worker_id", "role"]
        families = {
            "running": GaugeMetricFamily("pagewire:num_requests_running",
                                         "Sequences in the worker's running batch.",
                                         labels=labels),
            "waiting": GaugeMetricFamily("pagewire:num_requests_waiting",
                                         "Requests queued on the worker.", labels=labels),
            "usage": GaugeMetricFamily("pagewire:kv_cache_usage_perc",
                                       "Fraction of the worker's KV blocks in use (0-1).",
                                       labels=labels),
            "free": GaugeMetricFamily("pagewire:kv_blocks_free", "Free KV blocks.",
                                      labels=labels),
            "total": GaugeMetricFamily("pagewire:kv_blocks_total", "KV blocks.", labels=labels),
        }
        for w in self._cluster.workers:
            key = [w.id, w.role]
            families["running"].add_metric(key, w.running)
            families["waiting"].add_metric(key, w.waiting)
            used = w.kv_blocks_total - w.kv_blocks_free
            families["usage"].add_metric(key, used / w.kv_blocks_total if w.kv_blocks_total else 0)
            families["free"].add_metric(key, w.kv_blocks_free)
            families["total"].add_metric(key, w.kv_blocks_total)
        speed = GaugeMetricFamily("pagewire:prefill_tokens_per_second",
                                  "Prefill speed the router measured, per worker.",
                                  labels=labels)
        for w in self._cluster.workers:
            if w.prefill_tokens_per_s:
                speed.add_metric([w.id, w.role], w.prefill_tokens_per_s)
        link = GaugeMetricFamily("pagewire:kv_link_bytes_per_second",
                                 "KV transfer bandwidth the router measured, per pair.",
                                 labels=["prefill_id", "decode_id", "transport"])
        for pair in self._cluster.links:
            link.add_metric([pair.prefill_id, pair.decode_id, pair.transport],
                            pair.bytes_per_s)
        yield from _spec_decode_families(self._cluster.workers)
        index = GaugeMetricFamily("pagewire:prefix_index_available",
                                  "1 while the router reaches the Redis prefix index.")
        index.add_metric([], 1 if self._cluster.prefix_index_available else 0)
        yield from families.values()
        yield speed
        yield link
        yield index


def _spec_decode_families(workers):
    """vLLM's speculative-decoding counters, per worker that speculates."""
    labels = ["worker_id", "role"]
    drafts = CounterMetricFamily("pagewire:spec_decode_num_drafts",
                                 "Sequence-steps that verified draft tokens.", labels=labels)
    draft_tokens = CounterMetricFamily("pagewire:spec_decode_num_draft_tokens",
                                       "Draft tokens proposed and verified.", labels=labels)
    accepted = CounterMetricFamily("pagewire:spec_decode_num_accepted_tokens",
                                   "Draft tokens the target model accepted.", labels=labels)
    per_position = CounterMetricFamily("pagewire:spec_decode_num_accepted_tokens_per_pos",
                                       "Accepted draft tokens by their position in the draft.",
                                       labels=labels + ["position"])
    for w in workers:
        if not w.spec_num_drafts and not w.spec_accepted_per_position:
            continue
        key = [w.id, w.role]
        drafts.add_metric(key, w.spec_num_drafts)
        draft_tokens.add_metric(key, w.spec_num_draft_tokens)
        accepted.add_metric(key, w.spec_num_accepted_tokens)
        for position, count in enumerate(w.spec_accepted_per_position):
            per_position.add_metric(key + [str(position)], count)
    return [drafts, draft_tokens, accepted, per_position]
