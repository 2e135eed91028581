"""The agent's Prometheus metrics (``--metrics ADDR``): one series per group from the start.

Guarantees: every group's series exist (at 0) as soon as the group is known; nothing is served without
``--metrics``; the server listens on loopback unless ADDR names a host.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

import prometheus_client as pc

log = logging.getLogger("libvirt_cgrep.agent")


class Metrics:
    """The agent's metric families in their own registry."""

    def __init__(self) -> None:
        self.registry = pc.CollectorRegistry()
        reg = self.registry
        self.age = pc.Gauge("cgrep_newest_point_age_seconds", "Age of the newest committed point", ["group"], registry=reg)
        self.rpo = pc.Gauge("cgrep_rpo_seconds", "Recovery point objective", ["group"], registry=reg)
        self.duration = pc.Histogram(
            "cgrep_cycle_duration_seconds",
            "Cycle duration",
            ["group"],
            registry=reg,
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 300, 1800),
        )
        self.bytes = pc.Counter("cgrep_bytes_shipped", "Bytes shipped", ["group"], registry=reg)
        self.violations = pc.Counter("cgrep_rpo_violations", "RPO violations", ["group"], registry=reg)
        self.failures = pc.Counter("cgrep_cycle_failures", "Failed cycles", ["group"], registry=reg)

    def serve(self, addr: str, register: Callable[[Any], None]) -> None:
        """``register(registry)`` (more collectors), then serve on ``addr`` (host:port)."""
        register(self.registry)
        host, _, port = addr.rpartition(":")
        pc.start_http_server(int(port), addr=host or "127.0.0.1", registry=self.registry)
        log.info("metrics on http://%s:%s/metrics", host or "127.0.0.1", port)

    def group(self, name: str, rpo: float, newest: datetime | None, now: datetime) -> None:
        for family in (self.duration, self.bytes, self.violations, self.failures):
            family.labels(name)  # every group's series exists from the start (at 0)
        self.rpo.labels(name).set(rpo)
        if newest is not None:
            self.age.labels(name).set((now - newest).total_seconds())

    def observe(self, name: str, duration: float, nbytes: int, *, ok: bool) -> None:
        self.duration.labels(name).observe(duration)
        if ok:
            self.bytes.labels(name).inc(nbytes)
        else:
            self.failures.labels(name).inc()

    def violated(self, name: str) -> None:
        self.violations.labels(name).inc()
