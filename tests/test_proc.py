"""adapters.proc: waiting for a child's unix socket to listen (a real socket, a real child)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from libvirt_cgrep.adapters.proc import listening_unix_paths, wait_listening
from libvirt_cgrep.errors import UnavailableError


def test_a_bound_socket_listens_only_after_listen(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(path)
        assert Path(path).exists() and path not in listening_unix_paths()  # the window a connect is refused in
        s.listen()
        assert path in listening_unix_paths()
    assert path not in listening_unix_paths()  # closed: its file stays, nobody listens


def test_wait_listening_returns_once_the_child_listens(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    code = (
        "import socket, sys, time; s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); "
        "time.sleep(0.3); s.listen(); sys.stdin.read()"
    )
    child = subprocess.Popen([sys.executable, "-c", code, path], stdin=subprocess.PIPE)
    try:
        wait_listening([path], child, what="the child", timeout=10.0)
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(path)  # not refused
    finally:
        child.kill()
        child.wait()


def test_wait_listening_reports_the_childs_last_words(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit('no such socket dir')"], stderr=subprocess.PIPE)
    with pytest.raises(UnavailableError, match=r"^the child did not start: no such socket dir$"):
        wait_listening([str(tmp_path / "never.sock")], child, what="the child", timeout=10.0)
    assert child.stderr is not None
    child.stderr.close()


def test_wait_listening_has_a_deadline(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(UnavailableError, match=r"no listening socket within 0\.2 s"):
            wait_listening([str(tmp_path / "never.sock")], child, what="the child", timeout=0.2)
        assert child.poll() is None  # left as it is
    finally:
        child.kill()
        child.wait()
