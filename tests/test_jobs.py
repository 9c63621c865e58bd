"""Job files: loading, the errors a user sees, and ``harvester run`` against the sandbox."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from harvester import options
from harvester.api.retry import RetryPolicy
from harvester.errors import ConfigError, ExitCode
from harvester.jobs import KEYS, Job, load_job
from harvester.run.config import HarvestConfig
from harvester.sandbox import Sandbox
from harvester.storage.objects import open_store
from tests.conftest import KEY, run_cli, write_csv

REPO = Path(__file__).resolve().parent.parent


def write_job(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_jobs_load() -> None:
    nightly = load_job(REPO / "jobs" / "nightly.toml")
    assert nightly.inputs == ("/srv/harvester/exports/*.csv",)
    assert nightly.out == Path("/srv/harvester/data")
    assert nightly.key_env == "FAL_KEY"
    sandbox = load_job(REPO / "jobs" / "sandbox.toml")
    assert sandbox.inputs == (str(REPO / "sample_inputs" / "*.csv"),)
    assert sandbox.out == REPO / "sandbox-out"  # not make run's harvest-out


def test_nightly_job_sets_every_key() -> None:
    text = (REPO / "jobs" / "nightly.toml").read_text()
    for key in KEYS:
        # metrics-file is shown commented out: its folder exists only with node_exporter;
        # ray-address too: RAY_ADDRESS is the default
        commented = key in ("metrics-file", "ray-address")
        shown = f"\n# {key} = " if commented else f"\n{key} = "
        assert shown in text, f"jobs/nightly.toml should show {key!r}"


def test_relative_paths_resolve_against_the_job_folder(tmp_path: Path) -> None:
    folder = tmp_path / "jobs"
    folder.mkdir()
    job = load_job(write_job(folder / "j.toml", 'inputs = "exports/*.csv"\nout = "../data"\n'))
    assert job.inputs == (str(folder / "exports/*.csv"),)
    assert job.out == tmp_path / "data"
    absolute = load_job(write_job(folder / "a.toml", 'inputs = ["/x/*.csv"]\nout = "/d"\n'))
    assert absolute.inputs == ("/x/*.csv",) and absolute.out == Path("/d")


def test_values_are_typed_and_integers_are_fine_for_numbers(tmp_path: Path) -> None:
    job = load_job(
        write_job(tmp_path / "j.toml", 'inputs = ["a.csv", "b/*.csv"]\nout = "o"\nrps = 5\n')
    )
    assert job.rps == 5.0 and isinstance(job.rps, float)
    assert len(job.inputs) == 2
    assert job.concurrency == 32  # a key left out keeps its default


def test_overrides_replace_file_values_and_can_supply_missing_keys(tmp_path: Path) -> None:
    path = write_job(tmp_path / "j.toml", 'inputs = "a.csv"\nrps = 5\n')
    job = load_job(path, {"out": Path("elsewhere"), "rps": 7.5, "inputs": ("b.csv",)})
    assert job.out == Path("elsewhere")  # relative to the current folder, as typed
    assert job.rps == 7.5
    assert job.inputs == ("b.csv",)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            'inputs = "a.csv"\nout = "o"\n\nrate = 5\n',
            "j.toml:4: unknown key 'rate'; known keys: inputs, out, base-url",
        ),
        (
            'inputs = "a.csv"\nout = "o"\nbase_url = "http://x"\n',
            "j.toml:3: unknown key 'base_url'; did you mean 'base-url'?",
        ),
        (
            'inputs = "a.csv"\nout = "o"\n# concurrency = 3\n  concurrency = "16"\n',
            "j.toml:4: 'concurrency' must be an integer, not a string ('16')",
        ),
        ('inputs = "a.csv"\nout = "o"\nrps = 0\n', "j.toml:3: 'rps' must be greater than 0, not 0"),
        (
            'inputs = "a.csv"\nout = "o"\nmax-attempts = 0\n',
            "j.toml:3: 'max-attempts' must be at least 1, not 0",
        ),
        (
            'inputs = "a.csv"\nout = "o"\nrps = true\n',
            "j.toml:3: 'rps' must be a number, not a boolean (True)",
        ),
        ('inputs = []\nout = "o"\n', "j.toml:1: 'inputs' must be a glob or a non-empty list"),
        (
            'inputs = "a.csv"\nout = "o"\nauth-scheme = "basic"\n',
            "j.toml:3: 'auth-scheme' must be one of auto, bearer, key",
        ),
        (
            'inputs = "a.csv"\nout = "o"\nbase-url = "queue.fal.run"\n',
            "j.toml:3: 'base-url' must start with http:// or https://",
        ),
        (
            'inputs = "a.csv"\nout = "o"\n\n[harvest]\nrps = 3\n',
            "j.toml:4: unknown key 'harvest'",
        ),
        (
            'inputs = "a.csv"\nout = "o"\ncompact = "yes"\n',
            "j.toml:3: 'compact' must be true or false, not a string ('yes')",
        ),
        (
            'inputs = "a.csv"\nout = "o"\ngive-up-after = 0\n',
            "j.toml:3: 'give-up-after' must be greater than 0, not 0",
        ),
        ('inputs = "a.csv"\n', "j.toml: missing key 'out' (the output folder)"),
        ('inputs = "a.csv"\nout = \n', "j.toml: not valid TOML: Invalid value (at line 2"),
    ],
)
def test_bad_job_files_name_the_key_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = write_job(tmp_path / "j.toml", text)
    with pytest.raises(ConfigError) as caught:
        load_job(path)
    assert message in str(caught.value)
    assert str(caught.value).startswith(str(path))


def test_a_pasted_key_is_refused_and_never_echoed(tmp_path: Path) -> None:
    secret = "sk-live-0f1e2d3c4b5a"
    for line in (f'api-key = "{secret}"', f'key-env = "{secret}"'):
        path = write_job(tmp_path / "j.toml", f'inputs = "a.csv"\nout = "o"\n{line}\n')
        with pytest.raises(ConfigError) as caught:
            load_job(path)
        assert ":3: " in str(caught.value)
        assert secret not in str(caught.value)


def test_job_defaults_match_the_library_defaults() -> None:
    """Job (the CLI's and job files' defaults) and HarvestConfig must not drift apart."""
    job = Job(inputs=(), out=Path())
    library = HarvestConfig(inputs=(), out=open_store(Path()), api_key="k")
    for name in ("base_url", "auth_scheme", "concurrency", "image_concurrency", "rps"):
        assert getattr(job, name) == getattr(library, name), name
    for name in ("give_up_after", "retry_expired"):
        assert getattr(job, name) == getattr(library, name), name
    assert (job.pending_wait, job.max_image_bytes) == (
        library.pending_wait,
        library.max_image_bytes,
    )
    assert job.timeout == library.read_timeout
    assert (job.max_attempts, job.retry_budget) == (
        RetryPolicy().max_attempts,
        RetryPolicy().budget,
    )
    assert set(options.defaults()) == {k.replace("-", "_") for k in KEYS}


def test_run_command_harvests_what_the_job_says(tmp_path: Path, sandbox: Sandbox) -> None:
    exports = tmp_path / "exports"
    exports.mkdir()
    write_csv(exports / "a.csv", [("fal-ai/flux", "job-1"), ("fal-ai/flux", "job-2")])
    write_csv(exports / "b.csv", [("fal-ai/flux", "job-2"), ("fal-ai/flux/dev", "job-3")])
    job = write_job(
        tmp_path / "nightly.toml",
        f'inputs = ["exports/*.csv"]\nout = "data"\nbase-url = "{sandbox.base_url}"\n'
        'key-env = "MY_RELAY_KEY"\nrps = 1000\n',
    )

    result = run_cli(["run", str(job)], key=None, env={"MY_RELAY_KEY": KEY})

    assert result.exit_code == ExitCode.OK, result.output
    assert "by status:  ok 3" in result.output
    [record] = [json.loads(p.read_text()) for p in (tmp_path / "data" / "runs").glob("*.json")]
    assert [Path(i["path"]).name for i in record["inputs"]] == ["a.csv", "b.csv"]
    assert all(len(i["sha256"]) == 64 for i in record["inputs"])
    assert record["duplicate_rows"] == 1


def test_run_command_options_override_the_job(tmp_path: Path, sandbox: Sandbox) -> None:
    write_csv(tmp_path / "a.csv", [("fal-ai/flux", "ovr-1")])
    write_csv(tmp_path / "b.csv", [("fal-ai/flux", "ovr-2")])
    job = write_job(
        tmp_path / "j.toml",
        f'inputs = "a.csv"\nout = "data"\nbase-url = "{sandbox.base_url}"\nrps = 1000\n',
    )
    other = tmp_path / "other"

    result = run_cli(["run", str(job), str(tmp_path / "b.csv"), "--out", str(other)])

    assert result.exit_code == ExitCode.OK, result.output
    assert not (tmp_path / "data").exists()
    [record] = [json.loads(p.read_text()) for p in (other / "runs").glob("*.json")]
    assert [Path(i["path"]).name for i in record["inputs"]] == ["b.csv"]


def test_run_command_bad_job_exits_8_with_the_line(tmp_path: Path) -> None:
    job = write_job(tmp_path / "j.toml", 'inputs = "a.csv"\nout = "o"\nconcurency = 4\n')
    result = run_cli(["run", str(job)])
    assert result.exit_code == ExitCode.CONFIG
    assert f"harvester: error: {job}:3: unknown key 'concurency'; did you mean 'concurrency'?" in (
        result.output
    )


def test_run_command_missing_job_file_exits_8(tmp_path: Path) -> None:
    result = run_cli(["run", str(tmp_path / "nope.toml")])
    assert result.exit_code == ExitCode.CONFIG
    assert "cannot read job file" in result.output


def test_the_docs_job_example_loads(tmp_path: Path) -> None:
    operations = (REPO / "docs" / "operations.md").read_text(encoding="utf-8")
    [block] = re.findall(r"^```toml\n(.*?)^```", operations, flags=re.S | re.M)
    job = load_job(write_job(tmp_path / "nightly.toml", block))
    assert job == load_job(REPO / "jobs" / "nightly.toml")
