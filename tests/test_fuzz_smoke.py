"""A short smoke run of the atheris fuzz target (fuzz/fuzz_session.py); `make fuzz` runs it
for real. Bounded: 5,000 inputs, a few seconds."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import timeout

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None,
    reason="atheris is not installed (it has wheels for Linux only; `make test` installs it there)",
)
def test_fuzz_target_smoke_run(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "fuzz" / "fuzz_session.py"), "-runs=5000", "-max_len=512"],
        cwd=tmp_path,  # crash files, if any, land here
        capture_output=True,
        text=True,
        timeout=timeout(120),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Done 5000 runs" in out.stderr
    assert not list(tmp_path.glob("crash-*"))
