"""The settings of ``harvester serve``: each field an option sets takes its default from the
option's declaration (``harvester.options``), and ``ServeConfig.from_options`` puts option
values where their declarations say."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from harvester import options
from harvester.errors import UsageError
from harvester.storage.objects import Location

CONNECT_TIMEOUT: Final = 10.0
SHUTDOWN_GRACE: Final = 20.0
"""Seconds SIGTERM waits for requests in flight to be answered."""

_DEFAULT: Final = options.defaults(options.SERVE)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServeConfig:
    """What one ``serve`` does. Fields an option sets are documented by the option's help."""

    out: Location
    listen: str = _DEFAULT["listen"]
    jwks_url: str = _DEFAULT["jwks_url"]
    user_ids: tuple[str, ...] = _DEFAULT["fal_user_id"]
    """Accounts whose deliveries are accepted; empty: any."""
    keep_days: float = _DEFAULT["keep_deliveries"]
    max_body_bytes: int = _DEFAULT["max_body_bytes"]
    image_concurrency: int = _DEFAULT["image_concurrency"]
    max_image_bytes: int = _DEFAULT["max_image_bytes"]
    allow_private_images: bool = _DEFAULT["allow_private_images"]
    read_timeout: float = _DEFAULT["timeout"]
    """Seconds to receive a delivery's body, and an image's next bytes."""
    seconds_per_part: float = _DEFAULT["flush_every"]

    @classmethod
    def from_options(cls, values: Mapping[str, Any], **given: Any) -> ServeConfig:
        """The configuration of option ``values`` (by Python name, as ``ServeJob`` holds
        them), each put where its declaration's ``setting`` says; ``given`` sets the others."""
        for option in options.for_command(options.SERVE):
            if option.target is not None and option.attr in values:
                value = values[option.attr]
                given[option.target] = tuple(value) if option.kind == "texts" else value
        return cls(**given)

    def setting(self, target: str) -> Any:
        """The value at an option's ``target``."""
        return getattr(self, target)

    @property
    def host(self) -> str:
        return parse_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return parse_listen(self.listen)[1]

    def validate(self) -> None:
        """Check the values before anything is opened: ``UsageError`` naming the option."""
        for option in options.for_command(options.SERVE):
            value = None if option.target is None else self.setting(option.target)
            refusal = None if value is None else option.refusal(value)
            if refusal:
                raise UsageError(f"--{option.name} {refusal}")
        try:
            parse_listen(self.listen)
        except ValueError as exc:
            raise UsageError(str(exc)) from None


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8790`` for IPv6) as a host and a port; ``ValueError``."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--listen {text}: expected HOST:PORT, as in 127.0.0.1:8790")
    host = host.removeprefix("[").removesuffix("]")
    return host or "127.0.0.1", int(port)
