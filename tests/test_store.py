"""The image store: magic-number extensions, hash-to-path, atomic writes, refusal rules.

Narrow unit tests over httpx.MockTransport; the real-HTTP paths are in test_harvest_cli.py.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from harvester.api.download import ImageDownloader, ImageFailure
from harvester.api.retry import RetryPolicy
from harvester.api.transport import Client
from harvester.errors import OutputError
from harvester.storage.layout import Layout, image_relpath
from harvester.storage.objects import LocalStore
from harvester.storage.store import ContentStore, StoredImage, sniff

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40
JPEG = b"\xff\xd8\xff\xe0" + b"\x01" * 40 + b"\xff\xd9"
WEBP = b"RIFF\x20\x00\x00\x00WEBPVP8 " + b"\x02" * 40


@pytest.mark.parametrize(
    ("head", "ext"),
    [
        (PNG, "png"),
        (JPEG, "jpg"),
        (WEBP, "webp"),
        (b"GIF89a" + b"\x00" * 10, "gif"),
        (b"\x00\x00\x00\x1cftypavif" + b"\x00" * 8, "avif"),
        (b"<html><body>nope</body></html>", None),
        (b"", None),
        (b"RIFF\x00\x00\x00\x00WAVE", None),
    ],
)
def test_sniff(head: bytes, ext: str | None) -> None:
    assert sniff(head) == ext


@given(st.binary(min_size=1, max_size=64))
def test_hash_to_path(data: bytes) -> None:
    sha = hashlib.sha256(data).hexdigest()
    rel = image_relpath(sha, "png")
    assert rel == f"images/{sha[:2]}/{sha}.png"


def make_store(
    tmp_path: Path, handler: Callable[[httpx.Request], httpx.Response], **kwargs: int
) -> tuple[ImageDownloader[StoredImage], Layout, httpx.AsyncClient]:
    out = LocalStore(tmp_path / "out")
    out.prepare()
    layout = out.layout
    # A client *with* a default Authorization header: the store must still never send it.
    client = Client(
        transport=httpx.MockTransport(handler), headers={"Authorization": "Bearer secret-key"}
    )
    policy = RetryPolicy(max_attempts=3, base_delay=0.001, max_delay=0.001)
    store = ImageDownloader(
        client, ContentStore(out).sink, policy=policy, rng=random.Random(0), **kwargs
    )
    return store, layout, client


@pytest.mark.anyio
async def test_stores_by_sha_with_extension_from_bytes(tmp_path: Path) -> None:
    seen_auth: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen_auth.append(request.headers.get("authorization"))
        return httpx.Response(200, content=JPEG, headers={"content-type": "image/png"})

    store, layout, client = make_store(tmp_path, handler)
    async with client:
        first = await store.store("https://cdn.test/a.png")
        second = await store.store("https://cdn.test/b.png")
    assert isinstance(first, StoredImage)
    assert isinstance(second, StoredImage)
    sha = hashlib.sha256(JPEG).hexdigest()
    assert first.path == f"images/{sha[:2]}/{sha}.jpg"
    assert (first.new, second.new) == (True, False)
    assert (layout.root / first.path).read_bytes() == JPEG
    assert seen_auth == [None, None]
    assert list(layout.tmp.iterdir()) == []


@pytest.mark.anyio
async def test_an_image_is_stored_once_and_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A temp file renamed into place: the same "new" answers, nothing left in .tmp."""
    renames: list[str] = []
    real_replace = os.replace

    def replace(src: str, dst: str) -> None:
        renames.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    store, layout, client = make_store(tmp_path, lambda r: httpx.Response(200, content=JPEG))
    async with client:
        got = [await store.store(f"https://cdn.test/{n}.jpg") for n in range(3)]
    assert [g.new for g in got if isinstance(g, StoredImage)] == [True, False, False]
    stored = layout.root / got[0].path  # type: ignore[union-attr]
    assert stored.read_bytes() == JPEG
    umask = os.umask(0)
    os.umask(umask)
    assert stored.stat().st_mode & 0o777 == 0o666 & ~umask
    assert list(layout.images.rglob("*.*")) == [stored]
    assert list(layout.tmp.iterdir()) == []
    assert renames == [str(stored)]


@pytest.mark.anyio
@pytest.mark.parametrize("way", ["in memory", "spilled"])
async def test_a_torn_file_under_the_name_is_replaced(tmp_path: Path, way: str) -> None:
    """Images are not fsynced, so after a power loss a file can sit under its sha256 name with
    only part of its bytes. Whichever way the store writes, the next download of that image
    replaces it (and says new); a whole file is still found and kept."""
    body = JPEG + bytes(range(256)) * 5_000 if way == "spilled" else JPEG  # 1.28 MB spills
    sha = hashlib.sha256(body).hexdigest()
    store, layout, client = make_store(tmp_path, lambda r: httpx.Response(200, content=body))
    torn = layout.root / f"images/{sha[:2]}/{sha}.jpg"
    torn.parent.mkdir(parents=True)
    torn.write_bytes(body[: len(body) // 2])
    async with client:
        got = [await store.store(f"https://cdn.test/{n}.jpg") for n in range(2)]
    assert [(g.path, g.new) for g in got if isinstance(g, StoredImage)] == [
        (f"images/{sha[:2]}/{sha}.jpg", True),
        (f"images/{sha[:2]}/{sha}.jpg", False),
    ]
    assert torn.read_bytes() == body
    assert list(layout.images.rglob("*.*")) == [torn]
    assert list(layout.tmp.iterdir()) == []


@pytest.mark.anyio
async def test_redirects_are_followed_without_auth_and_never_to_other_schemes(
    tmp_path: Path,
) -> None:
    seen: list[tuple[str, str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), request.headers.get("authorization")))
        if request.url.path == "/start":
            return httpx.Response(302, headers={"location": "https://other.test/final"})
        if request.url.path == "/final":
            return httpx.Response(200, content=PNG)
        if request.url.path == "/ftp":
            return httpx.Response(302, headers={"location": "ftp://x.test/a.png"})
        return httpx.Response(301, headers={"location": "/loop"})

    store, _, client = make_store(tmp_path, handler)
    async with client:
        ok = await store.store("https://cdn.test/start")
        ftp = await store.store("https://cdn.test/ftp")
        loop = await store.store("https://cdn.test/loop")
    assert isinstance(ok, StoredImage)
    assert all(auth is None for _, auth in seen)
    assert isinstance(ftp, ImageFailure)
    assert "unsupported scheme 'ftp'" in ftp.error
    assert isinstance(loop, ImageFailure)
    assert "redirected more than 5 times" in loop.error


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("response", "status", "message"),
    [
        (httpx.Response(404), "failed", "expired or was deleted"),
        (httpx.Response(410), "failed", "expired or was deleted"),
        (httpx.Response(403), "failed", "HTTP 403"),
        (httpx.Response(200, content=b"<html>" + b" " * 64), "failed", "not an image"),
        (httpx.Response(503), "error", "gave up after 3 attempts"),
    ],
)
async def test_failures_are_rows_not_crashes(
    tmp_path: Path, response: httpx.Response, status: str, message: str
) -> None:
    store, layout, client = make_store(tmp_path, lambda _: response)
    async with client:
        got = await store.store("https://cdn.test/x.png")
    assert isinstance(got, ImageFailure)
    assert got.status == status
    assert message in got.error
    assert list(layout.images.rglob("*.*")) == []
    assert list(layout.tmp.iterdir()) == []


@pytest.mark.anyio
async def test_truncated_body_is_retried_and_never_stored(tmp_path: Path) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:  # Content-Length promises more than arrives
            return httpx.Response(200, content=PNG[:20], headers={"content-length": str(len(PNG))})
        return httpx.Response(200, content=PNG)

    store, layout, client = make_store(tmp_path, handler)
    async with client:
        got = await store.store("https://cdn.test/x.png")
    assert isinstance(got, StoredImage)
    assert got.attempts == 2
    assert (layout.root / got.path).read_bytes() == PNG
    assert list(layout.tmp.iterdir()) == []


@pytest.mark.anyio
async def test_size_limit_is_enforced_while_streaming(tmp_path: Path) -> None:
    big = PNG + b"\x00" * 10_000

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=chunks())  # streamed, no Content-Length

    store, layout, client = make_store(tmp_path, handler, max_bytes=5_000)
    async with client:
        got = await store.store("https://cdn.test/x.png")
    assert isinstance(got, ImageFailure)
    assert "larger than the 5,000-byte limit" in got.error
    assert list(layout.tmp.iterdir()) == []


@pytest.mark.anyio
async def test_data_uris_and_other_schemes(tmp_path: Path) -> None:
    store, layout, client = make_store(tmp_path, lambda _: httpx.Response(500))
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    async with client:
        stored = await store.store(uri)
        text = await store.store("data:text/plain,hello%20world")
        ftp = await store.store("ftp://cdn.test/x.png")
        bad = await store.store("data:image/png;base64,@@@")
    assert isinstance(stored, StoredImage)
    assert stored.path.endswith(".png")
    assert (layout.root / stored.path).read_bytes() == PNG
    assert isinstance(text, ImageFailure)
    assert "not an image" in text.error
    assert isinstance(ftp, ImageFailure)
    assert "only http, https and data" in ftp.error
    assert isinstance(bad, ImageFailure)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://[::1/x.png", "image URL is malformed"),
        ("https://xn--/a.png", "image URL is malformed"),
        ("https:///x.png", "image URL has no host"),
        ("file:///etc/passwd", "only http, https and data URLs are followed"),
        ("javascript:alert(1)", "only http, https and data URLs are followed"),
    ],
)
async def test_malformed_urls_are_rows_not_crashes(tmp_path: Path, url: str, message: str) -> None:
    store, layout, client = make_store(tmp_path, lambda _: httpx.Response(200, content=PNG))
    async with client:
        got = await store.store(url)
    assert isinstance(got, ImageFailure)
    assert (got.status, got.attempts > 1) == ("failed", False)
    assert message in got.error
    assert list(layout.tmp.iterdir()) == []


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("http://cdn.test/plain.png", "from https to plain http"),
        ("data:image/png;base64,AAAA", "unsupported scheme 'data'"),
        ("file:///etc/passwd", "unsupported scheme 'file'"),
        ("http://[::1/x.png", "redirects to a malformed URL"),
    ],
)
async def test_redirects_never_change_to_another_scheme(
    tmp_path: Path, location: str, message: str
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/start":
            return httpx.Response(302, headers={"location": location})
        return httpx.Response(200, content=PNG)

    store, _, client = make_store(tmp_path, handler)
    async with client:
        got = await store.store("https://cdn.test/start")
        upgraded = await store.store("http://cdn.test/start")  # http -> anything http(s) is fine
    assert isinstance(got, ImageFailure)
    assert got.status == "failed" and message in got.error
    if location.startswith("http://cdn"):
        assert isinstance(upgraded, StoredImage)


@pytest.mark.anyio
async def test_undecodable_body_is_retried_then_an_error(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"not gzip", headers={"content-encoding": "gzip"})

    store, layout, client = make_store(tmp_path, handler)
    async with client:
        got = await store.store("https://cdn.test/x.png")
    assert isinstance(got, ImageFailure)
    assert got.status == "error" and "cannot be decoded" in got.error
    assert got.attempts == 3
    assert list(layout.tmp.iterdir()) == []


@pytest.mark.anyio
@pytest.mark.parametrize("url", ["https://cdn.test/x.png", "data:image/png;base64,"])
async def test_disk_full_while_writing_is_an_output_error_leaving_nothing(
    tmp_path: Path, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC at the write boundary: a clear OutputError, no temp file, nothing stored."""
    real_open = open

    class FullDisk:
        def __init__(self, path: Path, mode: str, **kwargs: object) -> None:
            self._fh = real_open(path, mode)

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def writelines(self, chunks: object) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def close(self) -> None:
            self._fh.close()

    def full_disk(fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("harvester.storage.store.open", FullDisk, raising=False)
    monkeypatch.setattr("harvester.storage.files._write_all", full_disk)
    if url.startswith("data:"):
        url += base64.b64encode(PNG).decode()
    store, layout, client = make_store(tmp_path, lambda _: httpx.Response(200, content=PNG))
    async with client:
        with pytest.raises(OutputError) as info:
            await store.store(url)
    assert str(info.value).startswith("cannot ")
    assert str(info.value).endswith(": No space left on device")
    assert list(layout.tmp.iterdir()) == []
    assert list(layout.images.rglob("*.*")) == []
