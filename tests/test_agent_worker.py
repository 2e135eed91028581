"""The agent's children (agent.worker): output and status come back whole; a child dies with its parent.

No QEMU here: the children are ``virt-cgrep version`` and sleepers. The agent-level proof (a SIGKILLed agent
mid-cycle leaves no sync holding the target) is in test_agent_faults.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from libvirt_cgrep.agent import worker
from libvirt_cgrep.errors import InternalError, NotFoundError


@pytest.mark.parametrize("mode", ["fork", "exec"])
def test_output_and_status(mode: str) -> None:
    r = worker.Runner(mode)
    rc, out, err = r.run(["version", "--json"], 60)
    assert (rc, out.replace(" ", "").replace("\n", ""), err) == (0, '{"version":"0.1.0"}', "")
    rc, out, err = r.run(["points", "relative/path"], 60)
    assert rc == 64 and out == "" and "invalid target" in err
    assert r.live() == []


def shout(n: int) -> int:
    sys.stdout.write("x" * n)
    print("and some", file=sys.stderr)
    return 5


def test_fork_mode_big_output_and_crashes() -> None:
    r = worker.Runner("fork")
    rc, out, err = r.call(shout, [1 << 20], 60)  # more than a pipe holds: returned whole after the exit
    assert (rc, len(out), err) == (5, 1 << 20, "and some\n")
    rc, out, err = r.call(int, ["not a number"], 60)  # an exception: reported as an internal error, with its traceback
    assert rc == worker.EXIT_INTERNAL and "ValueError" in err
    rc, out, err = r.call(os._exit, [3], 60)  # a child that dies without reporting
    assert rc == 3 and "died" in err
    rc, out, err = r.call(time.sleep, [30], 1)  # past its timeout: killed
    assert rc == -signal.SIGKILL


def state(pid: int) -> str | None:
    """The process's state letter (None: gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


PARENT = textwrap.dedent(
    """
    import sys, threading, time
    from libvirt_cgrep.agent import worker

    if __name__ == "__main__":
        r = worker.Runner(sys.argv[1])
        if r.mode == "exec":
            r.exec_prefix = [sys.executable, "-c", "import time; time.sleep(120)"]
            threading.Thread(target=r.run, args=([], 300), daemon=True).start()
        else:
            threading.Thread(target=r.call, args=(time.sleep, [120], 300), daemon=True).start()
        while not r.live():
            time.sleep(0.01)
        print(r.live()[0].pid, flush=True)
        time.sleep(300)
    """
)


@pytest.mark.parametrize("mode", ["fork", "exec"])
def test_child_dies_with_its_sigkilled_parent(mode: str, tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script), mode], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert state(child) not in (None, "Z")
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    t0 = time.monotonic()
    while state(child) not in (None, "Z"):
        assert time.monotonic() - t0 < 5, f"the {mode} child outlived its SIGKILLed parent by 5 s"
        time.sleep(0.01)
    print(f"{mode}: child gone {1000 * (time.monotonic() - t0):.0f} ms after its parent's SIGKILL")


def not_found(what: str) -> int:
    raise NotFoundError(f"{what} is not here")


@pytest.mark.parametrize("mode", ["fork", "exec"])
def test_typed_calls_return_values_and_errors(mode: str) -> None:
    r = worker.Runner(mode)
    got = r.invoke(divmod, (7, 2), 60)  # a value comes back as itself, pickled over the child's connection
    assert got.ok and got.value == (3, 1) and got.status == 0
    got = r.invoke(not_found, ("the target",), 60)  # our error: its class and message, its exit status
    assert (got.ok, got.error, got.message, got.status) == (False, NotFoundError, "the target is not here", 65)
    got = r.invoke(int, ("not a number",), 60)  # anything else: an internal error
    assert got.error is InternalError and "ValueError" in got.message and got.status == worker.EXIT_INTERNAL
    got = r.invoke(time.sleep, (30,), 1)  # past its timeout: killed
    assert got.error is InternalError and "died" in got.message
    assert r.live() == []
