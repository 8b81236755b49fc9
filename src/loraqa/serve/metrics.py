"""``GET /metrics``: the server's state and counts in Prometheus' text format.

The gauges follow the semantics of the Gateway API inference extension's model-server protocol
(which lets the names differ; vLLM's are in brackets):

| loraqa | what | protocol (vLLM) |
| --- | --- | --- |
| `loraqa_num_requests_waiting` | questions queued | TotalQueuedRequests (`vllm:num_requests_waiting`) |
| `loraqa_num_requests_running` | questions in the batch decoding now | TotalRunningRequests (`vllm:num_requests_running`) |
| `loraqa_kv_cache_usage_perc` | the running batch's cached tokens over the batch budget (`--eval-batch-tokens`), 0..1 | KVCacheUtilization (`vllm:kv_cache_usage_perc`) |
| `loraqa_lora_requests_info` | labels `running_lora_adapters`, `waiting_lora_adapters`, `max_lora`; the value is the time | (`vllm:lora_requests_info`) |

and `loraqa_batch_occupancy` (the last batch's questions over `--max-batch-size`),
`loraqa_lora_adapters_loaded`, the counters `loraqa_answers_total`, `loraqa_responses_4xx_total{code}`,
`loraqa_responses_5xx_total`, `loraqa_timeouts_total`, and the histogram
`loraqa_request_latency_seconds{route}`.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60, 120)


class ServerState:
    """A Prometheus collector: the batcher's gauges, read at each scrape."""

    def __init__(self, batcher, answerer, max_batch_size: int) -> None:
        self.batcher, self.answerer, self.max_batch_size = batcher, answerer, max_batch_size

    def collect(self):
        b, adapters = self.batcher, self.answerer.adapters
        budget = self.answerer.settings.batch_tokens or 0
        yield _gauge("loraqa_num_requests_waiting", "Questions queued", b.size())
        yield _gauge("loraqa_num_requests_running", "Questions in the batch decoding now", b.running)
        yield _gauge("loraqa_kv_cache_usage_perc", "The running batch's cached tokens over the batch budget (0..1)",
                     min(1.0, b.cache_tokens / budget) if budget else 0.0)
        yield _gauge("loraqa_batch_occupancy", "The last batch's questions over --max-batch-size",
                     b.last_batch / self.max_batch_size)
        store = self.answerer.passages
        if store is not None:  # documents' windows kept across requests (model.passage_store)
            yield _gauge("loraqa_document_cache_bytes", "Bytes of documents' windows' keys and values kept", store.bytes)
            yield _gauge("loraqa_document_cache_windows", "Documents' windows kept", len(store.entries))
            yield _gauge("loraqa_document_read_ahead_waiting", "Windows waiting to be read ahead, or being read",
                         len(b.ahead) + b.reading_ahead)
            for what, value, doc in (("hits", store.hits, "Windows taken from the cache"),
                                     ("misses", store.misses, "Windows prefilled (then kept)"),
                                     ("evictions", store.evictions, "Windows let go for the memory budget"),
                                     ("read_ahead", store.ahead, "Windows read before a question asked them")):
                yield CounterMetricFamily(f"loraqa_document_cache_{what}", doc, value=value)
        loaded = adapters.names if adapters is not None else []
        yield _gauge("loraqa_lora_adapters_loaded", "LoRA adapters loaded", len(loaded))
        info = GaugeMetricFamily("loraqa_lora_requests_info", "LoRA adapters running and waiting (the value: when)",
                                 labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
        info.add_metric([",".join(sorted(b.running_adapters)), ",".join(b.waiting_adapters()), str(len(loaded))],
                        time.time())
        yield info


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class Metrics:
    """The server's registry: its state (:class:`ServerState`) and what the routes count."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.answers = Counter("loraqa_answers", "Questions answered", registry=self.registry)
        self.client_errors = Counter("loraqa_responses_4xx", "Requests refused, by status", ["code"],
                                     registry=self.registry)
        self.server_errors = Counter("loraqa_responses_5xx", "Requests that failed in the server", registry=self.registry)
        self.timeouts = Counter("loraqa_timeouts", "Requests not answered within --request-timeout",
                                registry=self.registry)
        self.forms = Counter("loraqa_request_forms", "OpenAI-route requests by the shape their passage and question "
                             "were read from (serve.qa_forms)", ["form"], registry=self.registry)
        self.latency = Histogram("loraqa_request_latency_seconds", "Seconds from a request to its answer", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)

    def watch(self, batcher, answerer, max_batch_size: int) -> None:
        self.registry.register(ServerState(batcher, answerer, max_batch_size))

    def status(self, code: int) -> None:
        """Count a response that is not a success."""
        if 400 <= code < 500:
            self.client_errors.labels(str(code)).inc()
        elif code >= 500:
            self.server_errors.inc()
        if code == 504:
            self.timeouts.inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
