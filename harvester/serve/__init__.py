"""``harvester serve``: fal's signed webhook deliveries received into the output.

``server`` receives deliveries over HTTP (aiohttp), checks their signature
(``api.webhooks``) and stores each durably in the inbox (``storage.inbox``) before it
answers 2xx; ``intake`` harvests the inbox like fetched results (the same parsing, image
download, content-addressed store and manifest writer); ``record`` keeps its run record
(``status``: serving, stopped or gone). ``config`` holds the settings.
"""

from harvester.serve.config import ServeConfig
from harvester.serve.server import serve_forever

__all__ = ["ServeConfig", "serve_forever"]
