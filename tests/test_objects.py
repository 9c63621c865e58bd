"""The object store interface, on a local folder and on Ceph's S3 gateway (a real server)."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from harvester.errors import LockedError, OutputError
from harvester.storage.manifest import manifest_glob, polars_schema, rows_to_table
from harvester.storage.objects import LocalStore, S3Store, Store, open_store
from harvester.storage.rows import ManifestRow
from tests.s3gateway import Gateway

PREFIX = "nightly/2026"


class Clock:
    """Wall time the test moves by hand: lease expiry without sleeping."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def make_s3(gw: Gateway, bucket: str, tmp: Path, clock: Callable[[], float]) -> S3Store:
    return S3Store(f"s3://{bucket}/{PREFIX}", env=gw.env(), scratch=tmp / "scratch", clock=clock)


def spill(store: Store, data: bytes, name: str = "spill.part") -> Path:
    path = store.temp_dir / name
    path.write_bytes(data)
    return path


def test_put_new_creates_once_and_the_first_bytes_stay(store: Store) -> None:
    key = "images/ab/ab12.png"
    assert store.put_new(key, b"A" * 100) is True
    assert store.put_new(key, b"B" * 100) is False
    assert store.get(key) == b"A" * 100


def test_put_new_from_a_spill_file_consumes_it(store: Store) -> None:
    first = spill(store, b"first bytes")
    assert store.put_new("images/cd/cd34.jpg", first) is True
    assert not first.exists()
    second = spill(store, b"other bytes")
    assert store.put_new("images/cd/cd34.jpg", second) is False
    assert not second.exists()
    assert store.get("images/cd/cd34.jpg") == b"first bytes"


@pytest.mark.anyio
async def test_put_new_async(store: Store) -> None:
    assert await store.put_new_async("images/ef/ef56.gif", b"GIF89a...") is True
    assert await store.put_new_async("images/ef/ef56.gif", b"GIF89a!!!") is False
    assert store.get("images/ef/ef56.gif") == b"GIF89a..."


def test_a_20_mb_spill_file_round_trips_in_parts(store: Store) -> None:
    data = random.Random(13).randbytes(20 << 20)
    sha = hashlib.sha256(data).hexdigest()
    key = f"images/{sha[:2]}/{sha}.png"
    assert store.put_new(key, spill(store, data)) is True
    again = spill(store, data, "again.part")
    assert store.put_new(key, again) is False
    assert not again.exists()
    digest = hashlib.sha256()
    largest = 0
    for chunk in store.iter_bytes(key, chunk_size=1 << 20):
        digest.update(chunk)
        largest = max(largest, len(chunk))
    assert digest.hexdigest() == sha
    assert largest < 4 << 20  # streamed, not read whole
    [info] = store.list("images/")
    assert (info.key, info.size) == (key, 20 << 20)


def test_put_replaces_the_whole_object(store: Store) -> None:
    store.put("runs/r1.json", b'{"exit_code": 3}\n')
    record = spill(store, b'{"exit_code": 0}\n', "r1.json")
    store.put("runs/r1.json", record)
    assert not record.exists()
    assert store.get("runs/r1.json") == b'{"exit_code": 0}\n'


def test_list_under_a_prefix_and_delete(store: Store) -> None:
    store.put("manifest/r1/part-00000.parquet", b"p0")
    store.put("manifest/r2/part-00000.parquet", b"p1")
    store.put("runs/r1.json", b"{}")
    store.put_new("images/aa/aa.png", b"img")
    listed = {info.key: info.size for info in store.list("manifest/")}
    assert listed == {"manifest/r1/part-00000.parquet": 2, "manifest/r2/part-00000.parquet": 2}
    assert [i.key for i in store.list("runs/")] == ["runs/r1.json"]
    assert list(store.list("nothing/")) == []
    store.delete("runs/r1.json")
    store.delete("runs/r1.json")  # gone already: fine
    assert list(store.list("runs/")) == []
    with pytest.raises(OutputError, match=r"runs/r1\.json"):
        store.get("runs/r1.json")
    with pytest.raises(OutputError, match=r"runs/r1\.json"):
        list(store.iter_bytes("runs/r1.json"))


def manifest_row(run_id: str, request_id: str) -> ManifestRow:
    return ManifestRow(
        run_id=run_id,
        harvested_at=datetime(2026, 12, 1, 3, 0, tzinfo=UTC),
        source_file="a.csv",
        source_line=2,
        model="fal-ai/flux/dev",
        request_id=request_id,
        request_status="ok",
        status="ok",
        sha256="ab" * 32,
        path=f"images/ab/{'ab' * 32}.png",
        bytes=1234,
    )


def test_a_manifest_part_reads_back_with_polars(store: Store) -> None:
    part = store.temp_dir / "part.parquet"
    table = rows_to_table([manifest_row("r1", f"req-{i}") for i in range(50)])
    pq.write_table(table, part, compression="zstd")
    store.put("manifest/r1/part-00000.parquet", part)
    source = manifest_glob(store)
    assert source.startswith(store.location)
    frame = pl.scan_parquet(
        source, schema=polars_schema(), storage_options=store.storage_options
    ).collect()
    assert frame.height == 50
    assert frame["request_id"].to_list() == [f"req-{i}" for i in range(50)]
    assert frame.schema == polars_schema()


def test_the_lock_refuses_a_second_run_until_the_first_ends(store: Store) -> None:
    with store.lock(owner="run-1") as held:
        held.check()
        assert not held.lost
        with pytest.raises(LockedError, match="already running"), store.lock(owner="run-2"):
            pass
        holder = store.holder()
        assert holder is not None
    assert store.holder() is None
    with store.lock(owner="run-3"):
        pass


@pytest.mark.s3
def test_a_lease_is_refused_while_live_and_taken_over_after_expiry(
    s3_gateway: Gateway, s3_bucket: str, tmp_path: Path
) -> None:
    clock = Clock()
    first = make_s3(s3_gateway, s3_bucket, tmp_path, clock).lease(owner="run-1")
    second = make_s3(s3_gateway, s3_bucket, tmp_path, clock).lease(owner="run-2")
    first.acquire()
    with pytest.raises(LockedError) as refused:
        second.acquire()
    assert "run-1" in str(refused.value)
    clock.now += 59
    with pytest.raises(LockedError):
        second.acquire()
    clock.now += 2  # 61 s: run-1 stopped renewing (killed, or hung)
    second.acquire()
    with pytest.raises(LockedError, match="taken over"):
        first.renew()
    assert first.lost
    with pytest.raises(LockedError, match="stops writing"):
        first.check()
    first.release()  # a lost lease is not released over its new holder
    holder = make_s3(s3_gateway, s3_bucket, tmp_path, clock).holder()
    assert holder is not None and holder.owner == "run-2"


@pytest.mark.s3
def test_renewal_extends_the_lease(s3_gateway: Gateway, s3_bucket: str, tmp_path: Path) -> None:
    clock = Clock()
    first = make_s3(s3_gateway, s3_bucket, tmp_path, clock).lease(owner="run-1")
    second = make_s3(s3_gateway, s3_bucket, tmp_path, clock).lease(owner="run-2")
    first.acquire()
    clock.now += 50
    first.renew()
    clock.now += 50  # 100 s after the start, 50 after the renewal
    with pytest.raises(LockedError):
        second.acquire()
    first.renew()
    first.release()
    second.acquire()  # released: no wait for expiry
    keys = [info.key for info in make_s3(s3_gateway, s3_bucket, tmp_path, clock).list(".lock/")]
    assert len(keys) == 1  # older generations are pruned


@pytest.mark.s3
def test_a_hung_holder_that_wakes_after_a_takeover_learns_it_lost(
    s3_gateway: Gateway, s3_bucket: str, tmp_path: Path
) -> None:
    clock = Clock()
    hung = make_s3(s3_gateway, s3_bucket, tmp_path, clock).lease(owner="hung")
    other = make_s3(s3_gateway, s3_bucket, tmp_path, clock).lease(owner="other")
    hung.acquire()
    clock.now += 61
    other.acquire()
    other.renew()
    other.renew()  # the generation after hung's is pruned by now
    with pytest.raises(LockedError):
        hung.renew()
    holder = make_s3(s3_gateway, s3_bucket, tmp_path, clock).holder()
    assert holder is not None and holder.owner == "other"


@pytest.mark.s3
def test_bad_credentials_are_an_output_error_that_never_shows_them(
    s3_gateway: Gateway, s3_bucket: str, tmp_path: Path
) -> None:
    env = s3_gateway.env() | {"AWS_SECRET_ACCESS_KEY": "wrong-secret-5e1f9a"}
    store = S3Store(f"s3://{s3_bucket}/x", env=env, scratch=tmp_path)
    with pytest.raises(OutputError) as info:
        store.put("runs/r.json", b"{}")
    message = str(info.value)
    assert message.startswith(f"cannot write s3://{s3_bucket}/x/runs/r.json: ")
    assert "403" in message and "AWS_SECRET_ACCESS_KEY" in message
    assert "wrong-secret-5e1f9a" not in message and s3_gateway.access_key not in message


@pytest.mark.s3
def test_a_missing_bucket_is_an_output_error(s3_gateway: Gateway, tmp_path: Path) -> None:
    store = S3Store("s3://no-such-bucket/x", env=s3_gateway.env(), scratch=tmp_path)
    with pytest.raises(OutputError, match="no-such-bucket"):
        store.put_new("images/aa/aa.png", b"x")


def test_open_store_picks_the_backend(tmp_path: Path) -> None:
    assert isinstance(open_store(tmp_path / "out"), LocalStore)
    assert isinstance(open_store(str(tmp_path / "out")), LocalStore)
    env = {"AWS_REGION": "eu-west-1", "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    s3 = open_store("s3://bucket/a/b/", env=env)
    assert isinstance(s3, S3Store) and s3.location == "s3://bucket/a/b"
    with pytest.raises(OutputError, match="name a bucket"):
        open_store("s3://")
    with pytest.raises(OutputError, match="gs:// is not supported"):
        open_store("gs://bucket/x")


@pytest.mark.s3
def test_a_renewal_whose_answer_was_lost_is_not_a_lost_lease(
    s3_gateway: Gateway, s3_bucket: str, tmp_path: Path
) -> None:
    clock = Clock()
    lease = make_s3(s3_gateway, s3_bucket, tmp_path, clock).lease(owner="run-1")
    lease.acquire()
    clock.now += 20
    assert lease._create(lease.generation + 1)  # stored, but say the answer timed out
    lease.renew()  # the next tick finds its own generation there
    assert not lease.lost
    other = make_s3(s3_gateway, s3_bucket, tmp_path, clock).lease(owner="run-2")
    other._create(lease.generation + 1)  # another run's generation is not ours
    with pytest.raises(LockedError):
        lease.renew()


def test_a_shard_that_runs_again_first_removes_its_earlier_attempts_parts(
    store: Store, tmp_path: Path
) -> None:
    """A shard re-run after its process or node died deletes the parts its earlier attempt
    wrote in this run, and only those, so no pair is recorded twice."""
    from types import SimpleNamespace

    from harvester.run.shard import forget_earlier_attempts

    keys = [
        "manifest/run-1/shard-0001-part-00000.parquet",
        "manifest/run-1/shard-0001-part-00001.parquet",
        "manifest/run-1/shard-0002-part-00000.parquet",
        "manifest/run-1/part-00000.parquet",
        "manifest/run-0/shard-0001-part-00000.parquet",
    ]
    for key in keys:
        store.put(key, b"part")
    spec = SimpleNamespace(run_id="run-1", index=1)

    assert forget_earlier_attempts(spec, store) == 2  # type: ignore[arg-type]
    assert sorted(i.key for i in store.list("manifest/")) == sorted(keys[2:])
    assert forget_earlier_attempts(spec, store) == 0  # type: ignore[arg-type]


def test_a_store_travels_to_another_process_whole(store: Store) -> None:
    """A shard in another process (or on another node) gets the store the driver opened:
    same location, same settings, a working client of its own."""
    import pickle

    store.put("runs/r1.json", b"{}")
    copy: Store = pickle.loads(pickle.dumps(store))  # noqa: S301  # our own bytes
    assert copy.location == store.location
    assert copy.temp_dir == store.temp_dir
    assert copy.get("runs/r1.json") == b"{}"


def test_a_folder_never_reads_through_a_link_out_of_it(tmp_path: Path) -> None:
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"not yours")
    store = LocalStore(tmp_path / "out")
    store.prepare()
    link = store.layout.images / "ab" / ("ab" * 32 + ".png")
    link.parent.mkdir(parents=True)
    link.symlink_to(outside)
    with pytest.raises(OutputError, match="links out of the output folder"):
        store.get(f"images/ab/{'ab' * 32}.png")
    with pytest.raises(OutputError, match="links out of the output folder"):
        list(store.iter_bytes(f"images/ab/{'ab' * 32}.png"))


def test_a_folder_delete_leaves_no_empty_folders(tmp_path: Path) -> None:
    local = LocalStore(tmp_path / "out")
    local.layout.prepare()
    local.put("manifest/r1/part-00000.parquet", b"p0")
    local.put("manifest/r1/part-00001.parquet", b"p1")
    local.delete("manifest/r1/part-00000.parquet")
    assert (tmp_path / "out" / "manifest" / "r1").is_dir()  # still holds a part
    local.delete("manifest/r1/part-00001.parquet")
    assert not (tmp_path / "out" / "manifest" / "r1").exists()
    assert (tmp_path / "out" / "manifest").is_dir()  # the layout's own folder stays
    local.put("manifest/r1/part-00002.parquet", b"p2")  # made again when needed
    assert [i.key for i in local.list("manifest/")] == ["manifest/r1/part-00002.parquet"]


def test_a_folder_another_process_removed_is_made_again_at_the_next_put(tmp_path: Path) -> None:
    """A server keeps writing into its run folder while a compaction (another process, its
    own store) deletes the folder's last part, and the folder with it."""
    server = LocalStore(tmp_path / "out")
    server.prepare()
    server.put("manifest/r1/part-00000.parquet", b"p0")
    server.put_new("inbox/done/ab/one", b"")
    other = LocalStore(tmp_path / "out")
    other.delete("manifest/r1/part-00000.parquet")
    other.delete("inbox/done/ab/one")
    assert not (tmp_path / "out" / "manifest" / "r1").exists()
    server.put("manifest/r1/part-00001.parquet", b"p1")
    assert server.put_new("inbox/done/ab/two", b"")
    assert server.get("manifest/r1/part-00001.parquet") == b"p1"
    assert server.get("inbox/done/ab/two") == b""


def test_a_temp_folder_of_its_own_is_apart_from_the_runs_and_travels(store: Store) -> None:
    """What a server writes through its own temp folder, nothing a run's start empties holds;
    the folder goes when the block ends."""
    import pickle

    with store.own_temp("20261201T000000.000Z-abcdef") as own:
        assert own.temp_dir != store.temp_dir and own.temp_dir.is_dir()
        assert own.temp_dir.parent.name == ".serve-tmp"
        (own.temp_dir / "spill.part").write_bytes(b"x")
        assert store.clean_temp() == 0 and (own.temp_dir / "spill.part").exists()
        own.put("runs/r1.json", b"{}")
        assert own.put_new("images/ab/x.png", b"y")
        copy: Store = pickle.loads(pickle.dumps(own))  # noqa: S301  # our own bytes
        assert copy.temp_dir == own.temp_dir and copy.get("runs/r1.json") == b"{}"
        assert own.clean_temp() == 1 and not any(own.temp_dir.iterdir())
        folder = own.temp_dir
    assert not folder.exists()
