"""Run directories: atomic writes, binding to one configuration, cell files, locks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pandas as pd
import pytest

from moeaudit.errors import RunDirectoryError
from moeaudit.rundir import FORMAT_VERSION, RunDirectory, atomic_path, atomic_write_json, atomic_write_text


def _manifest(config):
    return {"format_version": FORMAT_VERSION, "config": config, "sessions": []}


def test_atomic_write_replaces_whole_files_and_cleans_up_on_error(tmp_path):
    target = tmp_path / "a" / "x.json"
    atomic_write_json(target, {"k": 1})
    assert json.loads(target.read_text()) == {"k": 1}
    mode = target.stat().st_mode & 0o777
    assert mode & 0o044, f"files should be readable by others per umask, got {oct(mode)}"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"k": 2')  # half written
        raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"k": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.json"]


def test_stale_temporaries_are_removed(tmp_path):
    run = RunDirectory(tmp_path)
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / ".tmp-abc.parquet").write_bytes(b"partial")
    atomic_write_text(tmp_path / "keep.txt", "ok")
    assert run.remove_stale_temporaries() == 1
    assert not (tmp_path / "records" / ".tmp-abc.parquet").exists() and (tmp_path / "keep.txt").exists()


def test_claim_creates_then_resumes_then_refuses_other_config(tmp_path):
    run = RunDirectory(tmp_path / "run")
    cfg = {"model": "m", "n": 12}
    manifest, resumed = run.claim(cfg, _manifest(cfg))
    assert not resumed and run.exists()
    _, resumed = run.claim(cfg, _manifest(cfg))
    assert resumed
    with pytest.raises(RunDirectoryError) as err:
        run.claim({"model": "m", "n": 13}, _manifest({}))
    msg = str(err.value)
    assert "n: stored 12, requested 13" in msg and "(out=)" in msg and "\n" not in msg
    assert "config.toml" not in msg, "no config.toml holds the stored configuration: advising it would be circular"
    assert "older moeaudit" not in msg
    # a run from before a setting existed: compared as the older version behaved (``defaults``)
    legacy = {"progressive_arms": ["highest"]}
    with pytest.raises(RunDirectoryError) as err:
        run.claim({**cfg, "progressive_arms": ["highest", "lowest"]}, _manifest({}), defaults=legacy)
    msg = str(err.value)
    assert ("progressive_arms: stored ['highest'], requested ['highest', 'lowest'] (the run predates this "
            "setting; it ran as the stored value)") in msg
    assert "`moeaudit report` still reads a run written by an older moeaudit" in msg
    _, resumed = run.claim({**cfg, "progressive_arms": ["highest"]}, _manifest({}), defaults=legacy)
    assert resumed


def test_a_changed_config_is_advised_to_resume_from_config_toml_only_when_that_file_resumes_it(tmp_path):
    from moeaudit.config import RunConfig

    run = RunDirectory(tmp_path / "run")
    cfg = RunConfig(n=12)
    run.claim(cfg.to_dict(), _manifest(cfg.to_dict()))
    run.write_text("config.toml", cfg.to_toml())
    with pytest.raises(RunDirectoryError, match=r"resume it with its stored configuration: moeaudit run '.*config\.toml'"):
        run.claim(cfg.replace(n=13).to_dict(), _manifest({}))
    run.write_text("config.toml", cfg.replace(seed=5).to_toml())  # edited by hand: no longer the stored config
    with pytest.raises(RunDirectoryError) as err:
        run.claim(cfg.replace(n=13).to_dict(), _manifest({}))
    assert "config.toml" not in str(err.value)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    manifest["config"]["extra"] = 1  # a key moeaudit does not have: say so instead of "use the stored config"
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RunDirectoryError, match="stores configuration key\\(s\\) 'extra' that moeaudit does not "
                                                "have.*delete them from its \"config\""):
        run.claim(cfg.to_dict(), _manifest({}))


def test_claim_refuses_a_foreign_directory_and_a_damaged_manifest(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunDirectoryError, match="not empty and holds no moeaudit run"):
        RunDirectory(tmp_path).claim({}, _manifest({}))
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "manifest.json").write_text("{")
    with pytest.raises(RunDirectoryError, match="damaged"):
        RunDirectory(damaged).manifest()
    (damaged / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(RunDirectoryError, match="format 99"):
        RunDirectory(damaged).manifest()
    for value, problem in ([], "it holds a JSON list, not an object"), \
            ({"format_version": FORMAT_VERSION, "config": {}, "sessions": "x"}, "its 'sessions' is str, not a list"), \
            ({"format_version": FORMAT_VERSION, "sessions": []}, "its 'config' is missing, not a dict"):
        (damaged / "manifest.json").write_text(json.dumps(value))
        with pytest.raises(RunDirectoryError, match=f"damaged \\({problem}\\); restore it"):
            RunDirectory(damaged).manifest()
    with pytest.raises(RunDirectoryError, match="not a moeaudit run directory"):
        RunDirectory(tmp_path / "nothing").manifest()


def test_cells_are_listed_and_read_in_layer_order(tmp_path):
    run = RunDirectory(tmp_path)
    frames = {}
    for kind, layer in [("progressive", 10), ("single", 2), ("single", 10), ("progressive", 2)]:
        frames[(kind, layer)] = pd.DataFrame({"layer": [layer], "kind": [kind]})
        run.write_cell(kind, layer, frames[(kind, layer)])
    (tmp_path / "records" / "notes.parquet").write_bytes(b"")  # ignored: not a cell name
    assert set(run.finished_cells()) == set(frames)
    records = run.read_records()
    assert list(zip(records["layer"], records["kind"])) == [(2, "single"), (2, "progressive"), (10, "single"),
                                                             (10, "progressive")]
    with pytest.raises(ValueError, match="cell kind"):
        run.write_cell("audit", 1, frames[("single", 2)])
    run.check_files()
    cell = tmp_path / "records" / "L010-single.parquet"
    cell.write_bytes(cell.read_bytes()[:-20])  # truncated (a copy cut short, a full disk outside moeaudit)
    for check in (run.check_files, run.read_records):
        with pytest.raises(RunDirectoryError, match=r"L010-single\.parquet' is damaged \(not a readable Parquet "
                                                    r"file: .*\); delete it to recompute that cell"):
            check()


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    run = RunDirectory(tmp_path)
    lock = tmp_path / ".lock"
    lock.write_text(f"{socket.gethostname()}\n{os.getppid()}\n")  # a live process on this host
    with pytest.raises(RunDirectoryError, match="in use by process"), run.lock():
        pass
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(f"{socket.gethostname()}\n{dead.pid}\n")
    with run.lock():
        assert lock.read_text().split()[1] == str(os.getpid())
    assert not lock.exists()
