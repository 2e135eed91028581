"""Alert delivery: the log, a JSON-lines file, and an optional command (argv, never a shell).

The command gets the alert in its environment: CGREP_ALERT_KIND, CGREP_ALERT_GROUP,
CGREP_ALERT_STATE, CGREP_ALERT_MESSAGE, CGREP_ALERT_TIME (UTC ISO 8601). It
runs detached with a 30 s limit; its failure is logged, never fatal.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger("libvirt_cgrep.alerts")


@dataclass(frozen=True)
class Alert:
    kind: str
    group: str
    state: str
    message: str
    time: datetime

    def as_dict(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "group": self.group,
            "state": self.state,
            "message": self.message,
            "time": self.time.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        }


class AlertSink:
    def __init__(self, jsonl: str = "", command: Sequence[str] = ()) -> None:
        self.jsonl = Path(jsonl) if jsonl else None
        self.command = list(command)

    def deliver(self, alert: Alert) -> None:
        level = logging.INFO if alert.kind.endswith("-restored") or alert.kind == "continuous-stopped" else logging.WARNING
        log.log(level, "%s %s: %s", alert.kind, alert.group, alert.message)
        if self.jsonl is not None:
            try:
                self.jsonl.parent.mkdir(parents=True, exist_ok=True)
                with open(self.jsonl, "a") as f:
                    f.write(json.dumps(alert.as_dict()) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as exc:
                log.error("cannot write alert to %s: %s", self.jsonl, exc)
        if self.command:
            env = dict(os.environ, **{f"CGREP_ALERT_{k.upper()}": v for k, v in alert.as_dict().items()})
            threading.Thread(target=self._run, args=(env,), daemon=True).start()

    def _run(self, env: dict[str, str]) -> None:
        try:
            subprocess.run(self.command, env=env, timeout=30, check=True, stdin=subprocess.DEVNULL, capture_output=True)
        except (OSError, subprocess.SubprocessError) as exc:
            log.error("alert command %s failed: %s", self.command[0], exc)
