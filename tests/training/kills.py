"""kill -9 a `wildpdiff` command at a chosen moment: the crash-safety tests of zoo, fit and pipeline."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def wildpdiff(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "training", *map(str, args), "--profile", "smoke", "--quiet"]


def manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())  # replaced atomically: always whole


def kill_when(command: list[str], ready: Callable[[], bool], delay: float = 0.0, deadline: float = 180) -> None:
    """Run `command`; once `ready()` holds, wait `delay` seconds more, then SIGKILL its whole process group."""
    process = subprocess.Popen(command, start_new_session=True)
    try:
        stop = time.time() + deadline
        while time.time() < stop and process.poll() is None and not ready():
            time.sleep(0.1)
        time.sleep(delay)
        assert process.poll() is None, "the command ended before it could be killed"
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group is gone if the command ended on its own
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def mtimes(root: Path, relpaths) -> dict[str, int]:
    return {relpath: (root / relpath).stat().st_mtime_ns for relpath in relpaths}
