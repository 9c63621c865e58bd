"""A run's board on a cluster: where shards on other machines post their counters, and learn
that the run asks them to stop.

On one machine (or a shared file system) a shard writes its counters to a progress file and
watches for a stop file in the run's work folder (``harvester.run.shard.FileBoard``). Nodes
that share no disk with the driver use this board instead: one small Ray actor per run, on the
driver's node, holding no CPU (``harvester.run.engine.ray.RayBoard`` makes it). A shard posts its
counters every ``PROGRESS_SECONDS`` and the answer says whether to stop: one round trip, no
requests against the bucket (objects there would be billed writes twice a second per shard,
and polled), and nothing left behind when the run ends. The driver reads every shard's last
counters once a tick. If the driver's node dies, the run is gone with it anyway.

A plain class here, made a Ray actor by ``harvester.run.engine.ray``; this module imports no
Ray.
"""

from __future__ import annotations

from typing import Any


class ProgressBoard:
    """Every shard's last posted counters (a ``harvester.run.shard.ShardResult``) and the
    run's stop flag. Ray runs its calls one at a time."""

    def __init__(self) -> None:
        self._progress: dict[int, Any] = {}
        self._stop = False

    def post(self, index: int, progress: Any) -> bool:
        """Keep shard ``index``'s counters; True when the run asks its shards to stop."""
        self._progress[index] = progress
        return self._stop

    def snapshot(self) -> dict[int, Any]:
        return dict(self._progress)

    def stop(self) -> None:
        self._stop = True
