"""``harvester verify``: missing, corrupt, orphaned and non-image files, bad parts -> exit 9."""

from __future__ import annotations

import base64
import hashlib
import shutil
import struct
from pathlib import Path

import polars as pl
import pytest

from harvester.errors import ExitCode
from harvester.sandbox import Sandbox
from harvester.storage.layout import Layout
from harvester.storage.lock import exclusive
from harvester.storage.manifest import manifest_glob
from tests.conftest import harvest_args, run_cli, write_csv

PNG = b"\x89PNG\r\n\x1a\n" + b"orphan" * 10


@pytest.fixture(scope="module")
def harvested(tmp_path_factory: pytest.TempPathFactory, sandbox: Sandbox) -> Path:
    """A small, healthy output folder, harvested once for the module."""
    base = tmp_path_factory.mktemp("verify")
    pairs = [("fal-ai/flux/dev", f"verify-{n:03d}") for n in range(8)]
    csv = write_csv(base / "e.csv", [*pairs, ("fal-ai/flux", "expiredimg-v1")])
    result = run_cli(harvest_args(sandbox, base / "out", csv))
    assert result.exit_code == ExitCode.INCOMPLETE, result.output
    return base / "out"


@pytest.fixture
def out(harvested: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "out"
    shutil.copytree(harvested, copy)
    return copy


def stored_paths(out: Path) -> list[str]:
    df = pl.read_parquet(manifest_glob(out))
    return sorted(df["path"].drop_nulls().unique().to_list())


def test_a_healthy_folder_passes(out: Path) -> None:
    result = run_cli(["verify", str(out)])
    assert result.exit_code == ExitCode.OK, result.output
    files = len(stored_paths(out))
    assert result.output.startswith(f"checked {files} image files (")
    assert "0 missing, 0 corrupt, 0 orphans, 0 unreadable parts" in result.output


def test_corrupt_missing_and_orphaned_files_are_reported(out: Path) -> None:
    first, second, *_ = stored_paths(out)
    (out / first).write_bytes(b"\x89PNG\r\n\x1a\n flipped bits")
    (out / second).unlink()
    sha = hashlib.sha256(PNG).hexdigest()
    orphan = f"images/{sha[:2]}/{sha}.png"
    (out / orphan).parent.mkdir(exist_ok=True)
    (out / orphan).write_bytes(PNG)
    misnamed = f"images/{'0' * 2}/{'0' * 64}.png"
    (out / misnamed).parent.mkdir(exist_ok=True)
    (out / misnamed).write_bytes(PNG)

    result = run_cli(["verify", str(out)])

    assert result.exit_code == ExitCode.VERIFY
    assert "1 missing, 2 corrupt, 1 orphans, 0 unreadable parts" in result.output
    assert f"  missing: {second}\n" in result.output
    assert f"  corrupt: {first}\n" in result.output
    assert f"  corrupt: {misnamed}\n" in result.output
    assert f"  orphan: {orphan}\n" in result.output
    assert "harvesting the same inputs again records them" in result.output
    assert "harvest those into a fresh folder (a CSV of model,request_id)" in result.output


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_an_unreadable_part_is_reported_and_orphans_are_not_guessed(out: Path, damage: str) -> None:
    part = next((out / "manifest").rglob("*part-*.parquet"))
    data = part.read_bytes()
    part.write_bytes(b"not parquet at all" if damage == "garbage" else data[: len(data) // 2])

    result = run_cli(["verify", str(out)])

    assert result.exit_code == ExitCode.VERIFY
    assert "0 missing, 0 corrupt, 0 orphans, 1 unreadable parts" in result.output
    assert f"  unreadable part: {part.relative_to(out)}: " in result.output
    assert "whether they are orphans cannot be told" in result.output
    assert "missing or corrupt files are" not in result.output
    assert "Traceback" not in result.output


def test_verify_waits_for_no_harvest(out: Path) -> None:
    """A harvest in progress has stored images whose rows are not written yet: verify refuses
    rather than call them orphans."""
    with exclusive(Layout(out)):
        result = run_cli(["verify", str(out)])
    assert result.exit_code == ExitCode.LOCKED
    assert "another harvest (pid " in result.output


def test_verify_needs_a_folder(tmp_path: Path) -> None:
    result = run_cli(["verify", str(tmp_path / "nope")])
    assert result.exit_code == ExitCode.USAGE
    assert "is not a folder" in result.output


def test_files_that_claim_an_image_format_but_have_no_header_are_flagged(tmp_path: Path) -> None:
    """A relay that sends JPEG framing around noise: the row is ok (the magic number says
    JPEG) but the manifest read no width and height, and verify says it is not an image.
    A real PNG passes; TIFF and AVIF, whose headers are not read, are never flagged."""
    from harvester.sandbox.images import make_png
    from tests.hostile import Answer, harvest, hostile_server, result_body, write_ids

    app0 = b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    noise = bytes(range(256)) * 4
    framed = b"\xff\xd8\xff\xe0" + struct.pack(">H", len(app0) + 2) + app0
    framed += b"\xff\xfe" + struct.pack(">H", len(noise) + 2) + noise + b"\xff\xd9"
    files = {
        "jpeg": ("image/jpeg", framed),
        "png": ("image/png", make_png(b"v", 2_000, width=20, height=10)),
        "tiff": ("image/tiff", b"II*\x00" + noise),
        "avif": ("image/avif", b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf" + noise),
    }
    script = {
        name: Answer(
            result_body(images=[{"url": f"data:{kind};base64," + base64.b64encode(data).decode()}])
        )
        for name, (kind, data) in files.items()
    }
    with hostile_server(script) as srv:
        csv = write_ids(tmp_path / "e.csv", list(script))
        out = tmp_path / "out"
        run = harvest(srv, out, csv, key="k")
    assert run.returncode == ExitCode.OK, run.stderr
    df = pl.read_parquet(manifest_glob(out))
    assert df["status"].to_list() == ["ok"] * 4
    broken = df.filter(pl.col("request_id") == "jpeg").row(0, named=True)
    assert broken["image_format"] is None and broken["image_width"] is None

    result = run_cli(["verify", str(out)])

    assert result.exit_code == ExitCode.VERIFY, result.output
    assert "0 corrupt, 0 orphans, 0 unreadable parts, 1 not images" in result.output
    assert f"  not an image: {broken['path']} (starts like a jpeg;" in result.output
    assert result.output.count("not an image:") == 1
