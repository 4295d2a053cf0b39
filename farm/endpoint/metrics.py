"""The endpoint's Prometheus metrics, in a registry of its own (served on
ENDPOINT_METRICS_ADDRESS:ENDPOINT_METRICS_PORT, loopback by default).

Label values are bounded: a target label is `<release> <arch>` only for targets some server
serves (or was provisioned for), every other request counts under `UNSERVED`, so a client
cannot grow the registry with made-up release strings.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

UNSERVED = "unserved"  # the target label of requests for targets no server serves
NONE = "-"  # the target label of requests refused before their target was read


class Metrics:
    """Every metric the endpoint exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("stapfarm_endpoint_requests", "Requests by target and outcome "
                                "(hit, built, failed, rejected, unrouted, busy)",
                                ["target", "outcome"], registry=r)
        self.cache_hits = Counter("stapfarm_endpoint_cache_hits", "Module cache hits",
                                  registry=r)
        self.cache_misses = Counter("stapfarm_endpoint_cache_misses", "Module cache misses",
                                    registry=r)
        self.cache_errors = Counter("stapfarm_endpoint_cache_errors",
                                    "Module cache reads or writes that failed (answered as "
                                    "misses)", ["operation"], registry=r)
        self.latency = Histogram("stapfarm_endpoint_request_seconds",
                                 "Request latency (request read to response written)",
                                 ["target"], registry=r,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                                          20, 40, 80, 160, 320, 640))
        self.queue = Gauge("stapfarm_endpoint_queue_depth",
                           "Requests waiting for a free server slot", registry=r)
        self.inflight = Gauge("stapfarm_endpoint_inflight",
                              "Requests being built by a server", registry=r)
        self.held_bytes = Gauge("stapfarm_endpoint_request_bytes_held",
                                "Request bytes held in memory (bounded by ENDPOINT_MEMORY)",
                                registry=r)
        self.connections = Gauge("stapfarm_endpoint_connections", "Open client connections",
                                 registry=r)
        self.refused = Counter("stapfarm_endpoint_connections_refused",
                               "Connections closed at once, by reason (total: over "
                               "ENDPOINT_MAX_CONNECTIONS; source: over "
                               "ENDPOINT_MAX_PER_SOURCE)", ["reason"], registry=r)
        self.timeouts = Counter("stapfarm_endpoint_timeouts",
                                "Connections closed for a missed deadline", ["phase"],
                                registry=r)
        self.provisioning = Counter("stapfarm_endpoint_provisioning",
                                    "On-demand provisioning events by outcome",
                                    ["outcome"], registry=r)
        self.cache_bytes = Gauge("stapfarm_endpoint_cache_bytes", "Module cache size",
                                 registry=r)
        self.cache_entries = Gauge("stapfarm_endpoint_cache_entries",
                                   "Module cache entries", registry=r)
