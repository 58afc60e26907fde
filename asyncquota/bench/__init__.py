"""The benchmark harness: the 30 000-session night, replayed against strategies side by side.

``asyncquota bench`` (:mod:`asyncquota.cli`, then :mod:`.cli`) runs it. The parts: the
session model (:mod:`.sessions`), the strategies (:mod:`.strategies`), the runner that
replays the night for one strategy in its own process (:mod:`.runner`), the figures
(:mod:`.metrics`), the report (:mod:`.report`) and the picture (:mod:`.plot`). How each
request ended is recorded in the library's own vocabulary,
:class:`asyncquota.outcomes.RequestOutcome`.
"""

from .metrics import RequestLog, percentile, request_quota, summarize
from .sessions import Call, Session, SessionModel, Tenant, Turn

__all__ = [
    "Call",
    "RequestLog",
    "Session",
    "SessionModel",
    "Tenant",
    "Turn",
    "percentile",
    "request_quota",
    "summarize",
]
