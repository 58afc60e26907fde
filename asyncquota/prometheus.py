"""Prometheus metrics: what a Shaper does, counted, and its live state at each scrape.

    hook = PrometheusHook(upstream="openai")
    shaper = Shaper("https://api.openai.com", hooks=[hook, LoggingHook()])
    hook.watch(shaper)                       # the gauges: queue, in flight, limit, ...
    # serve prometheus_client.generate_latest() on /metrics (see the README)

Needs the ``prometheus`` extra (``pip install 'asyncquota[prometheus]'``).

Names and units follow Prometheus's conventions (``_total`` counters, ``_seconds``
histograms). Labels are bounded: ``upstream`` (given per hook), ``class`` (the priority
class's name, or its rank), ``outcome`` (a :class:`~asyncquota.outcomes.RequestOutcome`
label), ``code`` (an HTTP status), ``reason`` (asyncquota's own reason slugs for sheds and
retries); ``tenant`` only when asked for (``tenants=True``): tenants are unbounded, and
every value is a series kept for the life of the process.

Counters and histograms (from the hooks' events):

    asyncquota_requests_total{upstream,class,outcome[,tenant]}   requests ended
    asyncquota_request_duration_seconds{upstream,class,outcome}  call to end, queue included
    asyncquota_queue_wait_seconds{upstream,class}                 arrival (or retry) to send
    asyncquota_upstream_seconds{upstream,class}                   send to whole reply
    asyncquota_time_to_first_byte_seconds{upstream,class}         send to a stream's headers
    asyncquota_upstream_replies_total{upstream,code}              answers, by status
    asyncquota_upstream_throttled_total{upstream,code}            429, 503, 529 replies
    asyncquota_retries_total{upstream,reason}                     attempts sent again
    asyncquota_shed_total{upstream,class,reason}                  refused unsent
    asyncquota_tokens_reserved_total{upstream}                    reserved by answered sends
    asyncquota_tokens_used_total{upstream}                        used, as replies said

And for a Gateway (``watch_gateway(gateway)``, read from ``Gateway.statistics()``):

    asyncquota_gateway_requests_total, _served_total, _fallbacks_total,
    _exhaustions_total, _probes_total, _recoveries_total     what the gateway did
    asyncquota_gateway_accounts_held                          accounts held back now
    asyncquota_spent_dollars_total{model}                     money charged, by model

Gauges (read from ``Shaper.statistics()`` at each scrape, for every watched Shaper):

    asyncquota_queue_depth{upstream,class}      asyncquota_inflight{upstream}
    asyncquota_concurrency_limit{upstream}      asyncquota_cooldown_seconds{upstream}
    asyncquota_pace_requests_per_second{upstream}   (absent while no pace is learnt)
    asyncquota_reserved_tokens{upstream}        asyncquota_service_rate{upstream}
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Protocol

try:
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError(
        "asyncquota's Prometheus metrics need prometheus_client: "
        "pip install 'asyncquota[prometheus]'"
    ) from exc

from .admission import class_name
from .hooks import Admitted, Completed, Event, Replied, Retried, Shed, Throttled

if TYPE_CHECKING:
    from .shaper import ShaperStatistics

__all__ = ["PrometheusHook", "watch_gateway"]

NAMESPACE = "asyncquota"

WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 120.0)
"""Queue waits: most are nothing; interactive ones are held to a couple of seconds."""

REPLY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
"""Upstream times and whole requests: an LLM answers in a fraction of a second to minutes."""


class Watched(Protocol):
    """What the gauges need of a Shaper: its ``statistics()``."""

    def statistics(self) -> ShaperStatistics:
        """A snapshot of the live state."""


class _Metrics:
    """The metric families of one registry, shared by every hook that writes to it."""

    def __init__(self, registry: CollectorRegistry, tenants: bool) -> None:
        self.tenants = tenants

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(name, doc, labels, namespace=NAMESPACE, registry=registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...], *labels: str) -> Histogram:
            return Histogram(
                name, doc, labels, namespace=NAMESPACE, registry=registry, buckets=buckets
            )

        by_request = ("upstream", "class", "outcome")
        self.requests = counter(
            "requests",
            "Requests ended, by outcome.",
            *by_request,
            *(("tenant",) if tenants else ()),
        )
        self.duration = histogram(
            "request_duration_seconds",
            "Seconds from the call to the request's end.",
            REPLY_BUCKETS,
            *by_request,
        )
        self.queue_wait = histogram(
            "queue_wait_seconds",
            "Seconds from arrival (or a retry) to the send.",
            WAIT_BUCKETS,
            "upstream",
            "class",
        )
        self.upstream = histogram(
            "upstream_seconds",
            "Seconds from the send to the whole reply.",
            REPLY_BUCKETS,
            "upstream",
            "class",
        )
        self.first_byte = histogram(
            "time_to_first_byte_seconds",
            "Seconds from the send to a stream's headers.",
            REPLY_BUCKETS,
            "upstream",
            "class",
        )
        self.replies = counter(
            "upstream_replies", "Answers from the upstream, by status.", "upstream", "code"
        )
        self.throttled = counter(
            "upstream_throttled", "Congestion replies (429, 503, 529).", "upstream", "code"
        )
        self.retries = counter(
            "retries", "Attempts sent again, by the failure's reason.", "upstream", "reason"
        )
        self.shed = counter(
            "shed", "Requests refused unsent, by reason.", "upstream", "class", "reason"
        )
        self.reserved = counter(
            "tokens_reserved", "Tokens reserved by answered attempts.", "upstream"
        )
        self.used = counter("tokens_used", "Tokens the replies said they used.", "upstream")
        self.watched: dict[str, weakref.ReferenceType[Watched]] = {}
        registry.register(_Gauges(self.watched))


_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, _Metrics] = weakref.WeakKeyDictionary()


class PrometheusHook:
    """A hook that turns a Shaper's events into Prometheus metrics (see the module).

    Args:
        upstream: the ``upstream`` label of everything this hook records (one hook per
            Shaper; several may share a registry).
        registry: where the metrics live (default: prometheus_client's global one).
        tenants: label ``requests_total`` by tenant too. Set the same way for every hook
            of a registry (the families are made once, by the first hook).

    Raises:
        ValueError: a registry whose families were made with the other ``tenants``.
    """

    __slots__ = ("_metrics", "upstream")

    def __init__(
        self,
        upstream: str = "default",
        *,
        registry: CollectorRegistry = REGISTRY,
        tenants: bool = False,
    ) -> None:
        metrics = _METRICS.get(registry)
        if metrics is None:
            metrics = _METRICS[registry] = _Metrics(registry, tenants)
        elif metrics.tenants != tenants:
            raise ValueError(
                f"This registry's asyncquota metrics were made with tenants={metrics.tenants}; "
                "every hook of one registry must say the same."
            )
        self._metrics = metrics
        self.upstream = str(upstream)

    def watch(self, shaper: Watched) -> None:
        """Report ``shaper``'s live state as gauges at each scrape (until it is collected)."""
        self._metrics.watched[self.upstream] = weakref.ref(shaper)

    def on_event(self, event: Event) -> None:
        """Count one event (see the module for what each becomes)."""
        metrics, upstream = self._metrics, self.upstream
        rank = class_name(int(event.priority))
        if isinstance(event, Completed):
            outcome = event.outcome.label
            labels = [upstream, rank, outcome]
            if metrics.tenants:
                labels.append("" if event.tenant is None else str(event.tenant))
            metrics.requests.labels(*labels).inc()
            metrics.duration.labels(upstream, rank, outcome).observe(event.latency)
        elif isinstance(event, Admitted):
            metrics.queue_wait.labels(upstream, rank).observe(event.waited)
        elif isinstance(event, Replied):
            code = str(event.status)
            metrics.replies.labels(upstream, code).inc()
            timing = metrics.first_byte if event.stream else metrics.upstream
            timing.labels(upstream, rank).observe(event.seconds)
            metrics.reserved.labels(upstream).inc(event.reserved_tokens)
            if event.used_tokens is not None:
                metrics.used.labels(upstream).inc(event.used_tokens)
        elif isinstance(event, Throttled):
            metrics.throttled.labels(upstream, str(event.status)).inc()
        elif isinstance(event, Retried):
            metrics.retries.labels(upstream, event.reason).inc()
        elif isinstance(event, Shed):
            metrics.shed.labels(upstream, rank, event.reason).inc()

    def __repr__(self) -> str:
        return f"<PrometheusHook upstream={self.upstream!r}>"


_SINGLE_GAUGES = (
    ("inflight", "inflight", "Requests sent and not yet answered."),
    ("limit", "concurrency_limit", "The adaptive concurrency limit."),
    ("cooldown", "cooldown_seconds", "Seconds the fleet-wide cooldown still holds (0: open)."),
    ("pace", "pace_requests_per_second", "Requests per second learnt from refusals at the door."),
    ("reserved", "reserved_tokens", "Tokens reserved by requests not yet settled."),
    ("rate", "service_rate", "Admissions per second lately."),
)


class _Gauges:
    """A collector: each watched Shaper's ``statistics()``, read at the scrape."""

    def __init__(self, watched: dict[str, weakref.ReferenceType[Watched]]) -> None:
        self._watched = watched

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            f"{NAMESPACE}_queue_depth", "Requests waiting, by class.", labels=["upstream", "class"]
        )
        singles = {
            key: GaugeMetricFamily(f"{NAMESPACE}_{name}", doc, labels=["upstream"])
            for key, name, doc in _SINGLE_GAUGES
        }
        for upstream, ref in list(self._watched.items()):
            shaper = ref()
            if shaper is None:
                del self._watched[upstream]
                continue
            stats = shaper.statistics()
            for rank, count in stats.queued:
                depth.add_metric([upstream, class_name(int(rank))], count)
            singles["inflight"].add_metric([upstream], stats.inflight)
            singles["limit"].add_metric([upstream], stats.limit)
            singles["cooldown"].add_metric([upstream], stats.cooldown_remaining)
            if stats.pace is not None:
                singles["pace"].add_metric([upstream], stats.pace)
            singles["reserved"].add_metric([upstream], stats.reserved_tokens)
            singles["rate"].add_metric([upstream], stats.service_rate)
        yield depth
        yield from singles.values()


class GatewayCounts(Protocol):
    """What the gateway metrics read (a ``GatewayStatistics``; read-only)."""

    @property
    def requests(self) -> int: ...
    @property
    def served(self) -> int: ...
    @property
    def fallbacks(self) -> int: ...
    @property
    def exhaustions(self) -> int: ...
    @property
    def probes(self) -> int: ...
    @property
    def recoveries(self) -> int: ...
    @property
    def held(self) -> tuple[str, ...]: ...
    @property
    def spent(self) -> Mapping[str, float]: ...


class WatchedGateway(Protocol):
    """What the gateway metrics need of a Gateway: its ``statistics()``."""

    def statistics(self) -> GatewayCounts:
        """What the gateway did so far."""


_GATEWAY_COUNTERS = (
    ("requests", "Requests that entered the gateway."),
    ("served", "Requests a model answered."),
    ("fallbacks", "Times a request moved from a model to the next of its chain."),
    ("exhaustions", "Holds started: an account said its quota is gone."),
    ("probes", "Requests sent as the one probe of an account whose hold ended."),
    ("recoveries", "Exhaustion or fallback episodes ended."),
)


def watch_gateway(gateway: WatchedGateway, *, registry: CollectorRegistry = REGISTRY) -> None:
    """Report what ``gateway`` did, and the money it charged, at each scrape of ``registry``.

    One gateway per registry (a second raises prometheus_client's duplicate error). The
    gateway is held weakly: once it is collected, its series are no longer reported.

    Raises:
        ValueError: the registry reports a gateway already.
    """
    registry.register(_GatewayCollector(weakref.ref(gateway)))


class _GatewayCollector:
    def __init__(self, ref: weakref.ReferenceType[WatchedGateway]) -> None:
        self._ref = ref

    def describe(self) -> list[Metric]:
        # Names known without a gateway at hand, so a second registration is refused.
        return list(self._families(None))

    def collect(self) -> Iterator[Metric]:
        gateway = self._ref()
        if gateway is not None:
            yield from self._families(gateway.statistics())

    def _families(self, stats: GatewayCounts | None) -> Iterator[Metric]:
        for field, doc in _GATEWAY_COUNTERS:
            family = CounterMetricFamily(f"{NAMESPACE}_gateway_{field}", doc)
            if stats is not None:
                family.add_metric([], getattr(stats, field))
            yield family
        held = GaugeMetricFamily(f"{NAMESPACE}_gateway_accounts_held", "Accounts held back now.")
        spent = CounterMetricFamily(
            f"{NAMESPACE}_spent_dollars", "Money the gateway charged, by model.", labels=["model"]
        )
        if stats is not None:
            held.add_metric([], len(stats.held))
            for model, dollars in sorted(stats.spent.items()):
                spent.add_metric([model], dollars)
        yield held
        yield spent
