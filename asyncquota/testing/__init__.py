"""A simulated rate-limited LLM provider, for tests, benchmarks and users' own integration tests.

In process, ``SimulatedUpstream(config).handle`` is a mock-transport handler that runs in
virtual time; ``run_in_process(config)`` serves the same model over real HTTP from its own
process.
"""

from .config import (
    PRESETS,
    HeadersStyle,
    LimitHeader,
    ResetResolution,
    RetryAfterStyle,
    UpstreamConfig,
)
from .server import make_app, run_in_process, serve
from .upstream import SimulatedUpstream

__all__ = [
    "PRESETS",
    "HeadersStyle",
    "LimitHeader",
    "ResetResolution",
    "RetryAfterStyle",
    "SimulatedUpstream",
    "UpstreamConfig",
    "make_app",
    "run_in_process",
    "serve",
]
