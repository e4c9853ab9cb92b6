"""The server's Prometheus metrics, served at GET /metrics in the text exposition format.

Each app has its own registry (several servers, e.g. in tests, can live in one process). The worker thread
records token counts and latencies as it generates; the handlers count finished requests by status; queue
depth, the running batch and, for the batching engine, the KV blocks and the prefix-cache hit rate are read
from the engine when scraped.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds: from a fast GPU's first token (~10 ms) to a CPU model's long prompt.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("ingot_requests", "Generation requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("ingot_prompt_tokens", "Prompt tokens of the requests run", registry=r)
        self.generation_tokens = Counter("ingot_generation_tokens", "Tokens generated", registry=r)
        self.time_to_first_token = Histogram(
            "ingot_time_to_first_token_seconds", "From a request's arrival (queue wait included) to its first text",
            buckets=TTFT_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            "ingot_inter_token_latency_seconds",
            "Between consecutive text pieces of a request (a piece is one token, but for split characters)",
            buckets=ITL_BUCKETS, registry=r)
        self.queue_depth = Gauge("ingot_queue_depth", "Requests waiting for their turn", registry=r)
        self.running = Gauge("ingot_running_batch_size", "Requests in the running batch (prefilling or decoding)",
                             registry=r)

    def watch(self, engine) -> None:
        """Read the engine's state whenever the metrics are scraped."""
        self.queue_depth.set_function(lambda: engine.queued)
        self.running.set_function(lambda: engine.running)
        blocks = getattr(engine, "blocks", None)
        if blocks is None:
            return
        r = self.registry
        Gauge("ingot_kv_blocks_used", "KV-cache blocks held by requests", registry=r).set_function(
            lambda: blocks.used)
        Gauge("ingot_kv_blocks_free", "KV-cache blocks free to take (cached ones included: they are evicted "
              "for new content)", registry=r).set_function(lambda: blocks.free)
        Gauge("ingot_kv_blocks_cached", "Free KV-cache blocks that still hold a prefix for later hits",
              registry=r).set_function(lambda: blocks.cached)
        Gauge("ingot_prefix_cache_hit_rate", "Share of admitted prompt tokens found in the prefix cache",
              registry=r).set_function(blocks.hit_rate)

    def render(self) -> bytes:
        return generate_latest(self.registry)
