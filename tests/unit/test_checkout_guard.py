"""The suite's guard (tests/conftest.py): a session in which a test created, changed or removed a file in the
checkout fails, naming the file, even when every test passed."""

from __future__ import annotations

import subprocess
import sys
import uuid

from tests.conftest import ROOT


def _session(tmp_path, body: str) -> subprocess.CompletedProcess:
    probe = tmp_path / "test_probe.py"
    probe.write_text(f"from pathlib import Path\n\ndef test_probe():\n{body}\n")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                           "--rootdir", str(ROOT), str(probe)], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_a_stray_file_fails_the_session(tmp_path):
    stray = ROOT / f"stray-{uuid.uuid4().hex}.txt"
    try:
        res = _session(tmp_path, f"    Path({str(stray)!r}).write_text('x')")
    finally:
        stray.unlink(missing_ok=True)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "1 passed" in res.stdout and "inside the checkout" in res.stdout and stray.name in res.stdout


def test_writing_under_tmp_path_is_fine(tmp_path):
    res = _session(tmp_path, f"    Path({str(tmp_path / 'ok.txt')!r}).write_text('x')")
    assert res.returncode == 0, res.stdout + res.stderr
