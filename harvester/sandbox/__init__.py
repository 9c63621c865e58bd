"""The embedded sandbox: a fal-compatible fake queue API and CDN on 127.0.0.1.

New users try the harvester against it (``harvester sandbox``), and integration tests talk to
it over real HTTP. ``world`` computes every answer from the world seed and the request id;
``server`` puts them on the wire, with auth, injected faults and counters.
"""

from harvester.sandbox.config import FaultRates, SandboxConfig
from harvester.sandbox.server import Sandbox, running_sandbox, serve_forever
from harvester.sandbox.world import expected_status

__all__ = [
    "FaultRates",
    "Sandbox",
    "SandboxConfig",
    "expected_status",
    "running_sandbox",
    "serve_forever",
]
