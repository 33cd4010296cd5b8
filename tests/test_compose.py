"""docker-compose.yml is valid compose (Debian's `docker-compose`, which .ci/run installs when it can) and hands
the API keys from the environment to both API services."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

COMPOSE_FILE = Path(__file__).resolve().parents[1] / "docker-compose.yml"


def compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (.ci/run installs Debian's package): compose file not checked")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WILDPDIFF_")}
    command = [binary, "--project-directory", str(COMPOSE_FILE.parent), "-f", str(COMPOSE_FILE), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env={**clean, **(env or {})})


def test_compose_file_is_valid():
    result = compose("config", "-q")
    assert result.returncode == 0, result.stderr


def test_compose_passes_the_api_keys_on():
    result = compose("--profile", "gpu", "config", env={"WILDPDIFF_API_KEYS": "compose-key-1,compose-key-2"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("WILDPDIFF_API_KEYS: compose-key-1,compose-key-2") == 2  # api and api-gpu
