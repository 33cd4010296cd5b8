"""Schemathesis over the OpenAPI schema against a live server on the smoke store, with API keys: every operation,
a few hundred generated cases, every check, and no 5xx.

One check is left out: `positive_data_acceptance` expects every schema-valid request to succeed, but a schema
cannot say "a decodable image" or "at most one of adapter_id, adapter, background", so its random file bytes
are rightly refused with 415/422 (the rest of tests/app sends real images). `ignored_auth` is in: requests
without the key must get 401.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.app.conftest import serve

KEY = "schemathesis-key"
EXAMPLES = 50  # per operation and phase: about 300 cases, a few seconds


def schemathesis() -> str:
    found = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    if found is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    return found


def test_schemathesis_finds_nothing(make_app, tmp_path):
    st = schemathesis()
    with serve(make_app(api_keys=KEY)) as url:
        command = [
            st, "run", f"{url}/openapi.json", "--checks", "all", "--exclude-checks", "positive_data_acceptance",
            "--max-examples", str(EXAMPLES), "--seed", "0", "--generation-database", "none", "--workers", "1",
            "--header", f"Authorization: Bearer {KEY}", "--request-timeout", "60", "--no-color",
            "--report", "json", "--report-json-path", str(tmp_path / "report.json"),
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}) as http:
            metrics = http.get("/metrics").text
            operations = sum(len(methods) for methods in http.get("/openapi.json").json()["paths"].values())
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    cases = int(re.search(r"(\d+) generated", result.stdout).group(1))
    assert cases >= 200, result.stdout[-3000:]
    assert f"Tested: {operations}" in result.stdout  # every operation
    served = [line for line in metrics.splitlines() if line.startswith("wildpdiff_requests_total")]
    assert served and not [line for line in served if 'status="5' in line]
