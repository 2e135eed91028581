"""The agent's configuration (TOML, read with tomllib). Unknown keys are errors."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from libvirt_cgrep.errors import NotFoundError, UsageError

DEFAULT_PATH = Path("/etc/libvirt-cgrep/agent.toml")


@dataclass(frozen=True)
class AgentConfig:
    uri: str = "qemu:///system"
    concurrency: int = 2
    margin: float = 1.0
    tick: float = 0.2
    rescan: float = 30.0
    stop_timeout: float = 60.0
    state_dir: str = ""
    spool: str = "/var/lib/libvirt-cgrep/spool"
    alerts_file: str = ""
    alert_command: tuple[str, ...] = ()
    metrics: str = ""
    log_level: str = "info"
    only: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= self.concurrency <= 64:
            raise UsageError("concurrency must be between 1 and 64")
        if not 0 <= self.margin <= 3600 or not 0.01 <= self.tick <= 10 or not 1 <= self.rescan <= 3600:
            raise UsageError("margin, tick or rescan out of range")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise UsageError(f"invalid log_level {self.log_level!r}")


def load(path: Path | None, overrides: dict[str, Any] | None = None) -> AgentConfig:
    """Read ``path`` (missing default file: defaults) and apply command-line overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        if not path.exists():
            if path != DEFAULT_PATH:
                raise NotFoundError(f"config file {path} does not exist")
        else:
            try:
                data = tomllib.loads(path.read_text())
            except tomllib.TOMLDecodeError as exc:
                raise UsageError(f"{path}: {exc}") from exc
    known = {f.name for f in fields(AgentConfig)}
    unknown = set(data) - known
    if unknown:
        raise UsageError(f"{path}: unknown keys: {', '.join(sorted(unknown))}")
    if "alert_command" in data:
        cmd = data["alert_command"]
        if not (isinstance(cmd, list) and all(isinstance(x, str) for x in cmd)):
            raise UsageError(f"{path}: alert_command must be a list of strings (argv, never a shell line)")
        data["alert_command"] = tuple(cmd)
    if "only" in data:
        data["only"] = tuple(data["only"])
    try:
        cfg = AgentConfig(**data)
    except TypeError as exc:
        raise UsageError(f"{path}: {exc}") from exc
    return replace(cfg, **{k: v for k, v in (overrides or {}).items() if v is not None})
