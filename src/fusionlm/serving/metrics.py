"""The server's Prometheus metrics, in a registry of its own (``GET /metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Seconds; the same buckets for every latency histogram."""


class ServerMetrics:
    """Request, slot and token counts and latency histograms of one server."""

    def __init__(self, *, slots: int) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("fusionlm_requests_running", "Requests in rows", registry=r)
        self.waiting = Gauge("fusionlm_requests_waiting", "Requests waiting for rows", registry=r)
        self.slots_in_use = Gauge("fusionlm_slots_in_use", "KV-cache rows in use", registry=r)
        Gauge("fusionlm_slots_total", "KV-cache rows", registry=r).set(slots)
        self.prompt_tokens = Counter(
            "fusionlm_prompt_tokens", "Prompt tokens of started requests", registry=r
        )
        self.cached_prompt_tokens = Counter(
            "fusionlm_prompt_tokens_cached", "Prompt tokens reused from a row", registry=r
        )
        self.generation_tokens = Counter(
            "fusionlm_generation_tokens", "Tokens generated", registry=r
        )
        self.rejected = Counter(
            "fusionlm_requests_rejected",
            "Requests refused: queue full (429) or not accepting (503)",
            registry=r,
        )
        self.cancelled = Counter(
            "fusionlm_requests_cancelled", "Requests whose client left first", registry=r
        )

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, buckets=LATENCY_BUCKETS, registry=r)

        self.queue_time = histogram(
            "fusionlm_queue_time_seconds", "From arrival to the start of the prefill"
        )
        self.time_to_first_token = histogram(
            "fusionlm_time_to_first_token_seconds", "From arrival to the first token"
        )
        self.inter_token_latency = histogram(
            "fusionlm_inter_token_latency_seconds", "Between two tokens of a choice"
        )
        self.e2e_latency = histogram(
            "fusionlm_e2e_request_latency_seconds", "From arrival to the last token"
        )


__all__ = ["LATENCY_BUCKETS", "ServerMetrics"]
