"""A run killed with SIGKILL mid-way (twice) and restarted ends with the same records and summary as an
uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd

from moeaudit.config import RunConfig
from moeaudit.run.pipeline import run_audit
from moeaudit.rundir import RunDirectory

FLAGS = {"model": "builtin:tiny-moe", "name": "tiny", "corpus": "builtin", "layers": "1,3,5,7", "n": "40",
         "n_progressive": "20", "n_docs": "8", "n_docs_progressive": "8", "max_length": "96", "n_boot": "100",
         "device": "cpu", "dtype": "float32"}
N_CELLS = 8


def _command(out) -> list[str]:
    args = [sys.executable, "-m", "moeaudit", "run", "--out", str(out), "--no-report"]
    for key, value in FLAGS.items():
        args += [f"--{key.replace('_', '-')}", value]
    return args


def _run_until_cells(out, n_cells: int, timeout: float = 240) -> int:
    """Start the CLI, SIGKILL it as soon as ``n_cells`` cell files exist; return how many exist after the kill."""
    proc = subprocess.Popen(_command(out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if len(RunDirectory(out).finished_cells()) >= n_cells or proc.poll() is not None:
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return len(RunDirectory(out).finished_cells())


def test_kill_9_then_resume_equals_a_clean_run(tmp_path):
    out = tmp_path / "killed"
    first = _run_until_cells(out, 1)
    assert 0 < first < N_CELLS
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "running" and (out / ".lock").exists()  # left behind by the killed process
    second = _run_until_cells(out, first + 2)
    assert first < second < N_CELLS
    done = subprocess.run(_command(out), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stdout and f"{N_CELLS - second} cells computed, {second} resumed" in done.stdout

    clean = run_audit(RunConfig.from_mapping(FLAGS), tmp_path / "clean", report=False)
    resumed = RunDirectory(out).read_records()
    assert len(resumed) == len(clean.records) > 0
    pd.testing.assert_frame_equal(resumed, clean.records)
    assert (out / "summary.csv").read_text() == (tmp_path / "clean" / "summary.csv").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and len(manifest["sessions"]) == 3
    assert not list(out.rglob(".tmp-*")) and not (out / ".lock").exists()
