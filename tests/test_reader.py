"""CSV exports: headers, messy cells, bad rows with file and line, dedup, batching."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harvester.counters import Counters
from harvester.errors import InputError
from harvester.run import reader
from harvester.run.reader import BadRow, Pair

SAMPLES = Path(__file__).resolve().parent.parent / "sample_inputs"


def items(*paths: Path, done: set[int] | None = None) -> list[Pair | BadRow]:
    files = reader.inspect(list(paths))
    return [item for batch in reader.iter_items(files, done=done) for item in batch]


def pairs(found: list[Pair | BadRow]) -> list[tuple[str, str]]:
    return [(i.model, i.request_id) for i in found if isinstance(i, Pair)]


def write(tmp_path: Path, text: str, name: str = "e.csv", encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def test_header_case_spaces_bom_crlf_quotes_extra_columns(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '\ufeff  Note, MODEL ,Request_ID \r\n"x, y", fal-ai/flux ,"  abc  "\r\n'
        "\r\n,,\r\nn,fal-ai/flux/dev,def\r\n",
    )
    assert pairs(items(path)) == [("fal-ai/flux", "abc"), ("fal-ai/flux/dev", "def")]


def test_bad_rows_name_file_and_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "model,request_id\nfal-ai/flux,ok-1\nfal-ai/flux,\n,abc\n"
        "fal-ai/flux,a/b\nfal-ai/flux,..\nfal-ai/flux,x\x01y\nfal-ai/flux\n",
    )
    found = items(path)
    bad = [i for i in found if isinstance(i, BadRow)]
    assert [(b.line, b.reason.split(" ")[0]) for b in bad] == [
        (3, "missing"),
        (4, "missing"),
        (5, "request_id"),
        (6, "request_id"),
        (7, "request_id"),
        (8, "missing"),
    ]
    assert all(b.source == str(path) for b in bad)
    assert pairs(found) == [("fal-ai/flux", "ok-1")]


def test_duplicates_within_and_across_files_come_out_once(tmp_path: Path) -> None:
    a = write(tmp_path, "model,request_id\nm/a,1\nm/a,2\nm/a,1\n", "a.csv")
    b = write(tmp_path, "request_id,model\n2,m/a\n3,m/a\n1,m/b\n", "b.csv")
    assert pairs(items(a, b)) == [("m/a", "1"), ("m/a", "2"), ("m/a", "3"), ("m/b", "1")]


def test_done_pairs_are_skipped_and_counted(tmp_path: Path) -> None:
    a = write(tmp_path, "model,request_id\nm/a,1\nm/a,2\nm/a,2\n")
    counts = Counters()
    files = reader.inspect([a])
    found = [
        i
        for b in reader.iter_items(files, done={reader.pair_key("m/a", "1")}, counts=counts)
        for i in b
    ]
    assert pairs(found) == [("m/a", "2")]
    assert (counts.skipped, counts.duplicates) == (1, 1)


def test_missing_columns_names_what_was_found(tmp_path: Path) -> None:
    path = write(tmp_path, "Endpoint,ID\nx,y\n")
    with pytest.raises(InputError, match=r"columns found: 'endpoint', 'id'"):
        reader.inspect([path])


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_file_is_an_input_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "e.csv"
    path.write_bytes(content)
    with pytest.raises(InputError, match="is empty"):
        reader.inspect([path])


def test_binary_file_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "e.csv"
    path.write_bytes(b"PK\x03\x04\x00\x00binary")
    with pytest.raises(InputError, match="binary"):
        reader.inspect([path])


def test_missing_file_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        reader.inspect([tmp_path / "nope.csv"])


def test_non_utf8_rows_are_bad_rows_not_a_crash(tmp_path: Path) -> None:
    path = write(
        tmp_path, "model,request_id\nfal-ai/flux,caf\xe9\nfal-ai/flux,ok\n", encoding="latin-1"
    )
    found = items(path)
    assert pairs(found) == [("fal-ai/flux", "ok")]
    (bad,) = [i for i in found if isinstance(i, BadRow)]
    assert bad.line == 2
    assert "UTF-8" in bad.reason
    assert bad.request_id == "caf\ufffd"


def test_gigantic_line_is_one_bad_row(tmp_path: Path) -> None:
    huge = "x" * (reader.MAX_LINE_CHARS * 3)
    path = write(tmp_path, f"model,request_id\nfal-ai/flux,{huge}\nfal-ai/flux,after\n")
    found = items(path)
    assert pairs(found) == [("fal-ai/flux", "after")]
    (bad,) = [i for i in found if isinstance(i, BadRow)]
    assert bad.line == 2
    assert "longer than" in bad.reason


def test_inspect_counts_rows_and_hashes(tmp_path: Path) -> None:
    path = write(tmp_path, "model,request_id\nm/a,1\n\nm/a,2\n")
    (info,) = reader.inspect([path])
    assert info.rows == 2
    assert len(info.sha256) == 64
    assert info.columns == ("model", "request_id")


def test_batches_are_bounded(tmp_path: Path) -> None:
    rows = "".join(f"m/a,{i}\n" for i in range(2_500))
    path = write(tmp_path, "model,request_id\n" + rows)
    sizes = [len(b) for b in reader.iter_items(reader.inspect([path]), batch_size=1_000)]
    assert sizes == [1_000, 1_000, 500]


def test_sample_inputs_read_with_their_bad_rows() -> None:
    found = items(*sorted(SAMPLES.glob("*.csv")))
    bad = [i for i in found if isinstance(i, BadRow)]
    assert len(pairs(found)) > 50
    assert {b.source.rsplit("/", 1)[-1] for b in bad} == {"messy.csv"}
    assert len(bad) >= 5


cell = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12
)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=60)
@given(rows=st.lists(st.tuples(cell, cell, cell), max_size=20))
def test_any_csv_round_trips_or_reports(tmp_path: Path, rows: list[tuple[str, str, str]]) -> None:
    """Whatever the cells, every non-blank row is either a pair (trimmed, as written) or a bad
    row; nothing raises and nothing is dropped silently."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(["extra", "model", "request_id"])
    writer.writerows(rows)
    path = tmp_path / "p.csv"
    path.write_text(buffer.getvalue(), encoding="utf-8")
    found = items(path)
    expected = [r for r in rows if any(c.strip() for c in r)]
    unique_pairs = {(m.strip(), i.strip()) for _, m, i in expected}
    got_pairs = pairs(found)
    assert len(got_pairs) == len(set(got_pairs))
    assert set(got_pairs) <= unique_pairs
    bad_keys = {(b.model or "", b.request_id or "") for b in found if isinstance(b, BadRow)}
    assert unique_pairs <= set(got_pairs) | bad_keys | {
        (m, i) for m, i in unique_pairs if "\r" in m + i or "\n" in m + i
    } | {(reader._clean(m), reader._clean(i)) for m, i in unique_pairs}


def test_a_folder_or_other_separator_gets_a_hint(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"is a folder; pass the CSV files in it"):
        reader.inspect([tmp_path])
    path = write(tmp_path, "model;request_id\nfal-ai/flux;abc\n")
    with pytest.raises(InputError, match="separated by something other than commas"):
        reader.inspect([path])


def test_a_duplicate_of_a_done_pair_counts_as_a_duplicate(tmp_path: Path) -> None:
    a = write(tmp_path, "model,request_id\nm/a,1\nm/a,1\nm/a,2\n")
    counts = Counters()
    done = {reader.pair_key("m/a", "1")}
    found = [i for b in reader.iter_items(reader.inspect([a]), done=done, counts=counts) for i in b]
    assert pairs(found) == [("m/a", "2")]
    assert (counts.skipped, counts.duplicates) == (1, 1)


def test_an_unterminated_quote_past_the_field_limit_loses_one_line_only(tmp_path: Path) -> None:
    """One stray quote in a 30,001-row export swallowed every row up to the field limit."""
    ids = [f"req-{i:06d}" for i in range(30_000)]
    lines = [f"fal-ai/flux,{rid}" for rid in ids]
    lines[99] = 'fal-ai/flux,"req-broken'  # line 101 of the file
    path = write(tmp_path, "model,request_id\n" + "\n".join(lines) + "\n")

    found = items(path)

    bad = [i for i in found if isinstance(i, BadRow)]
    assert len(bad) == 1 and bad[0].line == 101
    assert "unterminated quote" in bad[0].reason
    end = int(bad[0].reason.split("runs to line ")[1].split(" ")[0])
    assert end > 10_000  # the field limit stopped it, far away
    assert f"lines 102-{end} are read again" in bad[0].reason
    assert pairs(found) == [("fal-ai/flux", rid) for i, rid in enumerate(ids) if i != 99]
    assert reader.inspect([path])[0].rows == 30_000


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ids=st.lists(
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12),
        min_size=1,
        max_size=40,
        unique=True,
    ),
    where=st.integers(min_value=0),
    closing=st.booleans(),
)
def test_a_stray_quote_never_loses_another_row(
    tmp_path: Path, ids: list[str], where: int, closing: bool
) -> None:
    """Wherever a row opens a quote it never closes (or closes on a later line), every other
    row is still read, and the bad row names the lines it swallowed."""
    broken = where % len(ids)
    lines = [f"fal-ai/flux,{rid}" for rid in ids]
    lines[broken] = 'fal-ai/flux,"stray'
    if closing and broken + 2 < len(lines):
        lines[broken + 2] = 'fal-ai/flux,x"y'  # a quote on a later line closes the field
    path = write(tmp_path, "model,request_id\n" + "\n".join(lines) + "\n")

    found = items(path)

    kept = {
        ("fal-ai/flux", rid) for i, rid in enumerate(ids) if i != broken and '"' not in lines[i]
    }
    assert kept <= set(pairs(found))
    if broken + 1 < len(lines):  # a quote on the last line swallows nothing
        [bad] = [i for i in found if isinstance(i, BadRow) and i.line == broken + 2]
        assert "unterminated quote" in bad.reason and f"on line {broken + 2} runs" in bad.reason


def test_an_ok_row_skips_its_request_by_owner_app_or_by_id_alone(tmp_path: Path) -> None:
    """``request_key`` of an ok row: the queue's owner/app and the id, or the id alone for a
    delivery that named no model."""
    a = write(
        tmp_path,
        "model,request_id\n"
        "fal-ai/flux,1\nfal-ai/flux/schnell,1\nother/app,1\n"
        "any/model,2\nworkflows/me/wf,3\nme/wf,3\nm/a,4\n",
    )
    done = {reader.request_key("fal-ai/flux/dev", "1"), reader.request_key(None, "2")}
    done.add(reader.request_key("workflows/me/wf/step", "3"))
    counts = Counters()
    found = [i for b in reader.iter_items(reader.inspect([a]), done=done, counts=counts) for i in b]
    assert pairs(found) == [("other/app", "1"), ("me/wf", "3"), ("m/a", "4")]
    assert counts.skipped == 4
    assert reader.request_key("fal-ai/flux", "a/b") is None  # names no request
