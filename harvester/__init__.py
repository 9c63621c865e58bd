"""harvester: fetch fal.ai-compatible queue results and their images, nightly, losing nothing."""

__version__ = "0.1.0"
