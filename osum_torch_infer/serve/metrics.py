"""``GET /metrics``: the server's counters in Prometheus' text format (``prometheus-client``, one registry per
app, so several apps in one process do not collide).

=========================================== ================================================================
``osum_requests_total{endpoint,status}``    requests answered, by endpoint (unknown paths: ``other``) and status
``osum_request_seconds{endpoint}``          latency histogram, headers in to response out
``osum_rejected_total{reason}``             refused requests by reason (``body_too_large``, ``audio_too_long``,
                                            ``queue_full``, ``deadline``, ``unauthorized``, ``bad_host``, ...)
``osum_cancelled_total{reason}``            requests whose client went away (``disconnect``)
``osum_queue_windows``                      windows waiting for a ``generate`` call
``osum_batch_rows``                         rows (windows x beams) per ``generate`` call (histogram)
``osum_generate_seconds``                   time per ``generate`` call (histogram)
``osum_generated_tokens_total``             tokens generated
``osum_generate_retries_total``             failed calls retried as two halves
``osum_audio_decoded_seconds_total``        seconds of audio decoded (uploads refused by their header add 0)
=========================================== ================================================================
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401 (re-exported)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


def row_buckets(max_batch: int) -> tuple[float, ...]:
    """Every row count up to 16, then powers of two, and ``max_batch`` itself: the ``le="<max_batch>"`` bucket
    holding every call proves no call went over."""
    b = set(range(1, min(max_batch, 16) + 1)) | {2 ** k for k in range(5, 12) if 2 ** k < max_batch} | {max_batch}
    return tuple(sorted(float(x) for x in b))


class Metrics:
    def __init__(self, *, max_batch: int, queue_windows: Callable[[], float]):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("osum_requests", "Requests answered", ["endpoint", "status"], registry=r)
        self.latency = Histogram("osum_request_seconds", "Request latency, headers in to response out",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("osum_rejected", "Requests refused, by reason", ["reason"], registry=r)
        self.cancelled = Counter("osum_cancelled", "Requests given up, by reason", ["reason"], registry=r)
        self.queue = Gauge("osum_queue_windows", "Windows waiting for a generate call", registry=r)
        self.queue.set_function(queue_windows)
        self.batch_rows = Histogram("osum_batch_rows", "Rows (windows x beams) per generate call",
                                    buckets=row_buckets(max_batch), registry=r)
        self.generate_seconds = Histogram("osum_generate_seconds", "Seconds per generate call",
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("osum_generated_tokens", "Tokens generated", registry=r)
        self.decoded = Counter("osum_audio_decoded_seconds", "Seconds of audio decoded", registry=r)
        self.retries = Counter("osum_generate_retries", "Failed generate calls retried as two halves", registry=r)

    def on_batch(self, rows: int, tokens: int, seconds: float) -> None:
        self.batch_rows.observe(rows)
        self.tokens.inc(tokens)
        self.generate_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
