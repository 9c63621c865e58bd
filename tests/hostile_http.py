"""A hostile HTTP/1.1 server of the tests' own: raw asyncio on 127.0.0.1, in a thread, plain or
TLS, answering each request with whatever bytes a test's handler writes (redirects, a
compression bomb, a trickle, an endless 100 Continue, a result that needs no key)."""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

TLS_DIR = Path(__file__).parent / "fixtures" / "tls"
CERT = TLS_DIR / "cert.pem"
"""Self-signed for 127.0.0.1 and localhost."""


@dataclass(slots=True)
class Exchange:
    """One request as the server read it: request line and headers (names lower-cased)."""

    method: str
    target: str
    headers: dict[str, str]


Handler = Callable[[Exchange, asyncio.StreamWriter], Awaitable[None]]


@dataclass(slots=True)
class HostileServer:
    url: str
    seen: list[Exchange] = field(default_factory=list)
    connections: int = 0


def response(status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    """A whole HTTP/1.1 response with a Content-Length, the connection kept open."""
    lines = [f"HTTP/1.1 {status} X"]
    for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@contextmanager
def serving(handler: Handler, *, tls: bool = False) -> Iterator[HostileServer]:
    """Run the server until the block ends; ``handler`` writes each answer (and may close)."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, asyncio.AbstractServer] = {}
    context: ssl.SSLContext | None = None
    if tls:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(CERT, TLS_DIR / "key.pem")
    state = HostileServer(url="")

    async def serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        try:
            while True:
                line = await reader.readline()
                if not line.strip():
                    return
                method, target, _ = line.decode("latin-1").split(" ", 2)
                headers: dict[str, str] = {}
                while (header := await reader.readline()).strip():
                    name, _, value = header.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                exchange = Exchange(method, target, headers)
                state.seen.append(exchange)
                await handler(exchange, writer)
                await writer.drain()
                if writer.is_closing():
                    return
        except (ConnectionError, ssl.SSLError, ValueError):
            return
        except asyncio.CancelledError:  # the server stops: an endless handler ends here
            return
        finally:
            writer.close()

    async def start() -> None:
        server = await asyncio.start_server(serve_one, "127.0.0.1", 0, ssl=context)
        holder["server"] = server
        port = server.sockets[0].getsockname()[1]
        state.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        ready.set()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield state
    finally:

        async def stop() -> None:
            holder["server"].close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
