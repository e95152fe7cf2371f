"""Prometheus metrics. Pair labels are bounded to the served languages; no request text is recorded."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("landermt_http_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.translations = Counter("landermt_translations", "Texts translated, by language pair",
                                    ["pair"], registry=r)
        self.generated_tokens = Counter("landermt_generated_tokens", "Tokens generated, by language pair",
                                        ["pair"], registry=r)
        self.input_tokens = Counter("landermt_input_tokens", "Prompt tokens processed, by language pair",
                                    ["pair"], registry=r)
        self.queue_seconds = Histogram("landermt_queue_seconds", "Time a text waits before its batch starts",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.first_token_seconds = Histogram("landermt_time_to_first_token_seconds",
                                             "Time from a text's arrival to its first generated token",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.request_seconds = Histogram("landermt_request_seconds", "End-to-end /translate latency",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.batch_seconds = Histogram("landermt_batch_seconds",
                                       "Time of one engine step: prefill of the rows admitted, then one decode step",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("landermt_batch_size", "Rows (texts of any pairs) in each decode step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.inflight = Gauge("landermt_inflight_requests", "Requests being handled", registry=r)
        self.queued = Gauge("landermt_queued_texts", "Texts waiting for a batch", registry=r)
        self.jobs = Gauge("landermt_jobs", "Batch jobs by status", ["status"], registry=r)
        self.job_lines = Counter("landermt_job_lines", "Job lines processed, by outcome", ["outcome"], registry=r)
