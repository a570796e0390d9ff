"""Prometheus metrics of one server, in a registry of its own (several servers can live in one test process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.updates = Counter("baton_weight_updates", "Weight updates (POST /v1/update_weights) by outcome",
                               ["outcome"], registry=r)
        self.startup_loads = Counter("baton_weight_startup_loads", "Loads at server start (not updates) by outcome",
                                     ["outcome"], registry=r)
        self.update_seconds = Histogram("baton_weight_update_seconds", "Seconds per successful weight update",
                                        buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=r)
        self.update_paths = Counter("baton_weight_update_paths", "Successful updates by how the version was loaded: "
                                    "full, delta (onto the base it held) or chain (from the nearest full version)",
                                    ["path"], registry=r)
        self.bytes_loaded = Counter("baton_weight_bytes_loaded", "Snapshot bytes loaded into live weights", registry=r)
        self.version = Gauge("baton_weight_version", "1 for the weight version being served", ["version"], registry=r)
        self.requests = Counter("baton_completion_requests", "Completion requests by HTTP status", ["status"],
                                registry=r)
        self.tokens = Counter("baton_completion_tokens", "Tokens processed by completions", ["kind"], registry=r)
        # the engine, under vLLM's names with Baton's prefix
        self.running = Gauge("baton:num_requests_running", "Sequences being prefilled or decoded", registry=r)
        self.waiting = Gauge("baton:num_requests_waiting", "Requests queued for admission", registry=r)
        self.kv_usage = Gauge("baton:kv_cache_usage_perc", "Fraction of KV-cache pages in use (0..1)", registry=r)
        self.generated = Counter("baton:generation_tokens", "Tokens generated", registry=r)
        latency = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.first_token = Histogram("baton:time_to_first_token_seconds", "Arrival to first generated token",
                                     buckets=latency, registry=r)
        self.inter_token = Histogram("baton:inter_token_latency_seconds", "Between consecutive tokens of a sample",
                                     buckets=latency, registry=r)

    def update_done(self, outcome: str, seconds: float, nbytes: int, startup: bool = False, path: str = "full") -> None:
        """An update (or, with ``startup``, the load at start, which is not an update) ended with ``outcome``;
        ``path``: how a successful one loaded (``WeightInfo.path``)."""
        (self.startup_loads if startup else self.updates).labels(outcome).inc()
        if outcome == "success":
            if not startup:
                self.update_seconds.observe(seconds)
                self.update_paths.labels(path.split(" ")[0]).inc()
            self.bytes_loaded.inc(nbytes)

    def set_version(self, version: str) -> None:
        self.version.clear()
        self.version.labels(version).set(1)

    def completion(self, status: int, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        self.requests.labels(str(status)).inc()
        self.tokens.labels("prompt").inc(prompt_tokens)
        self.tokens.labels("completion").inc(completion_tokens)

    def engine_state(self, running: int, waiting: int, kv_usage: float) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_usage.set(kv_usage)

    def render(self) -> bytes:
        return generate_latest(self.registry)
