"""Options are declared once: one declaration added here (and nowhere else) is a click option
of ``harvest`` and ``run``, a checked job-file key, and a value in the run's configuration."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from click.testing import CliRunner

import harvester.cli
from harvester import options
from harvester.api.retry import RetryPolicy
from harvester.errors import ConfigError, UsageError
from harvester.jobs import Job, load_job
from harvester.options import Option
from harvester.run.config import HarvestConfig
from harvester.serve.config import ServeConfig
from harvester.storage.objects import open_store

NEW = Option(
    name="connect-timeout",
    kind="number",
    default=12.5,
    minimum=0,
    above=True,
    help="Seconds to wait for a connection to the API or an image host.",
)


@pytest.fixture
def declared(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The declarations with ``NEW`` added, and a CLI module built from them (the commands'
    options are made when the module loads; ``harvester.cli`` itself is left as it is)."""
    monkeypatch.setattr(options, "OPTIONS", (*options.OPTIONS, NEW))
    spec = importlib.util.spec_from_file_location("cli_with_new_option", harvester.cli.__file__)
    assert spec is not None and spec.loader is not None
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


def test_a_declared_option_shows_up_in_help(declared: ModuleType) -> None:
    for command in ("harvest", "run"):
        result = CliRunner().invoke(declared.main, [command, "--help"], terminal_width=200)
        assert result.exit_code == 0, result.output
        assert "--connect-timeout FLOAT RANGE" in result.output
        assert "Seconds to wait for a connection to the API or an image host." in result.output
    harvest = CliRunner().invoke(declared.main, ["harvest", "--help"], terminal_width=200)
    assert "[default: 12.5; x>0]" in harvest.output
    refused = CliRunner().invoke(
        declared.main, ["harvest", "a.csv", "--out", "o", "--connect-timeout", "0"]
    )
    assert refused.exit_code == 2
    assert "Invalid value for '--connect-timeout': 0.0 is not in the range x>0." in refused.output


def test_a_declared_option_reaches_the_run_configuration_from_the_command_line(
    declared: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    jobs: list[Job] = []
    monkeypatch.setattr(declared, "_execute", lambda job, **_: jobs.append(job))
    csv = tmp_path / "a.csv"
    job_file = tmp_path / "j.toml"
    job_file.write_text(f'inputs = "{csv}"\nout = "o"\nconnect-timeout = 3\n', encoding="utf-8")
    csv.write_text("model,request_id\nfal-ai/flux,r1\n", encoding="utf-8")
    runner = CliRunner()
    runner.invoke(declared.main, ["harvest", str(csv), "--out", "o", "--connect-timeout", "2"])
    runner.invoke(declared.main, ["harvest", str(csv), "--out", "o"])
    runner.invoke(declared.main, ["run", str(job_file)])
    runner.invoke(declared.main, ["run", str(job_file), "--connect-timeout", "4"])

    configs = [job.harvest_config("k") for job in jobs]
    assert [config.connect_timeout for config in configs] == [2.0, 12.5, 3.0, 4.0]


def test_a_declared_option_is_a_checked_job_key(declared: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "j.toml"
    for text, message in (
        ('connect-timeout = "x"', "j.toml:3: 'connect-timeout' must be a number, not a string"),
        ("connect-timeout = 0", "j.toml:3: 'connect-timeout' must be greater than 0, not 0"),
        ("conect-timeout = 1", "j.toml:3: unknown key 'conect-timeout'; did you mean 'connect"),
    ):
        path.write_text(f'inputs = "a.csv"\nout = "o"\n{text}\n', encoding="utf-8")
        with pytest.raises(ConfigError, match=message):
            load_job(path)


def _values_for(command: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for option in options.for_command(command):
        if option.target is not None:
            values[option.attr] = {
                "number": 3.5,
                "integer": 3,
                "boolean": True,
                "texts": ("a", "b"),
            }.get(option.kind, option.choices[-1] if option.choices else "http://x")
    return values


def test_options_reach_the_settings_their_declarations_name() -> None:
    """Every declaration's setting is a field (or a field's attribute) of HarvestConfig, and a
    value given for each lands there."""
    values = _values_for(options.JOB_COMMAND)
    config = HarvestConfig.from_options(values, inputs=(), out=open_store(Path()), api_key="k")
    for option in options.for_command(options.JOB_COMMAND):
        if option.target is not None:
            assert config.setting(option.target) == values[option.attr], option.name


def test_serve_options_reach_the_settings_their_declarations_name() -> None:
    """The same for ``serve``: each of its options lands in the ``ServeConfig`` field its
    declaration names, and the defaults are the declarations'."""
    values = _values_for(options.SERVE)
    config = ServeConfig.from_options(values, out="o")
    for option in options.for_command(options.SERVE):
        if option.target is not None:
            assert config.setting(option.target) == values[option.attr], option.name
    default = ServeConfig(out="o")
    for option in options.for_command(options.SERVE):
        if option.target is not None:
            assert default.setting(option.target) == option.default_for("serve"), option.name


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"image_concurrency": 0}, "--image-concurrency must be at least 1"),
        ({"keep_days": 0.0}, "--keep-deliveries must be greater than 0"),
        ({"listen": "8790"}, "--listen must be HOST:PORT"),
        ({"listen": "h:99999"}, "--listen h:99999: expected HOST:PORT, as in 127.0.0.1:8790"),
    ],
)
def test_the_serve_configuration_is_checked_by_the_declarations(
    changes: dict[str, Any], message: str
) -> None:
    config = ServeConfig(out="o", **changes)
    with pytest.raises(UsageError, match=f"^{message}$"):
        config.validate()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"pending_wait": -1.0}, "--pending-wait must be at least 0"),
        ({"retry": RetryPolicy(budget=0)}, "--retry-budget must be greater than 0"),
        ({"engine": "spark"}, "--engine must be one of local, ray"),
        ({"image_concurrency": 0}, "--image-concurrency must be at least 1"),
    ],
)
def test_the_configuration_is_checked_by_the_declarations(
    changes: dict[str, Any], message: str
) -> None:
    config = HarvestConfig(inputs=(Path("a.csv"),), out=open_store(Path()), api_key="k", **changes)
    with pytest.raises(UsageError, match=f"^{message}$"):
        config.validate()


@pytest.mark.parametrize("base_url", ["HTTPS://relay.test", "Http://relay.test/api"])
def test_a_base_url_scheme_in_capitals_is_accepted(base_url: str) -> None:
    HarvestConfig(
        inputs=(Path("a.csv"),), out=open_store(Path()), api_key="k", base_url=base_url
    ).validate()


@pytest.mark.parametrize(
    ("base_url", "message"),
    [
        ("https://u:p@relay.test", "must not carry a user name or password"),
        (f"https://{'r' * 64}.test", "longer than DNS allows"),
    ],
)
def test_a_base_url_that_cannot_be_used_is_refused(base_url: str, message: str) -> None:
    config = HarvestConfig(
        inputs=(Path("a.csv"),), out=open_store(Path()), api_key="k", base_url=base_url
    )
    with pytest.raises(UsageError, match=message):
        config.validate()
