"""gRPC options every pagewire channel and server uses.

Keepalive: a peer that vanishes without a FIN or RST (a cut link, a host that lost power)
leaves a TCP connection that looks alive until a deadline, minutes away. Pinging every 5 s
while a call is open and giving up after 5 s without an answer ends such a call in about 10 s
with UNAVAILABLE. Servers must accept those pings, or they answer a quiet client (a decode
reservation waiting for its KV) with GOAWAY.

Reconnect: a channel whose peer is down retries with exponential backoff, by default up to
120 s between attempts, and fails calls at once while it waits: a router or worker restarted
after a minute would stay unreachable to its callers long after it is back. Peers share one
network and an attempt is cheap, so the backoff stops growing at 2 s.
"""

from __future__ import annotations

KEEPALIVE_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
]
KEEPALIVE_SERVER_OPTIONS = [
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 4000),
    ("grpc.http2.max_ping_strikes", 0),
]
RECONNECT_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
CHANNEL_OPTIONS = [*KEEPALIVE_CHANNEL_OPTIONS, *RECONNECT_CHANNEL_OPTIONS]
