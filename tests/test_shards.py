"""Runs on the embedded model: shards run from the command line (with shared clean passes) and merged equal an
unsharded run without shared clean passes (records, summary.csv bytes), and what must not merge is refused by
name."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from typer.testing import CliRunner

from moeaudit.cli import app
from moeaudit.config import RunConfig
from moeaudit.errors import ConfigError, RunDirectoryError
from moeaudit.report import expected_cells
from moeaudit.run.execution import Cell, Execution, Shard, canonical_cells, merge_runs, parse_bytes
from moeaudit.run.pipeline import run_audit
from moeaudit.rundir import RunDirectory

FLAGS = {"model": "builtin:tiny-moe", "name": "tiny", "corpus": "builtin", "n_docs": "6", "n_docs_progressive": "8",
         "max_length": "96", "layers": "1,5", "n": "12", "n_progressive": "8", "n_boot": "100", "device": "cpu",
         "dtype": "float32"}
CONFIG = RunConfig.from_mapping(FLAGS)
N_CELLS = 4
runner = CliRunner()


def _cli(*args: str) -> list[str]:
    flags = [x for k, v in FLAGS.items() for x in (f"--{k.replace('_', '-')}", v)]
    return ["run", *flags, "--no-report", *args]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The run without shared clean passes (as every cell ran before), and its two shards run from the command
    line (with shared clean passes, the default)."""
    root = tmp_path_factory.mktemp("shards")
    reference = run_audit(CONFIG, root / "alone", report=False, execution=Execution(clean_cache_bytes=0))
    for i in range(2):
        result = runner.invoke(app, _cli("--shard", f"{i}/2", "--out", str(root / f"s{i}")))
        assert result.exit_code == 0, result.output
    return root, reference


def _manifest(path):
    return json.loads((path / "manifest.json").read_text())


def _clean_passes(records: pd.DataFrame) -> tuple[int, int]:
    """(one per sequence and cell, one per sequence): the clean passes without and with sharing."""
    per_cell = records.groupby(["layer", "experiment"])["seq_id"].nunique()
    cells = per_cell.xs("pool", level="experiment").sum() + per_cell.xs("progressive", level="experiment").sum()
    return int(cells), records["seq_id"].nunique()


@pytest.mark.slow
def test_shared_clean_passes_run_one_per_sequence(runs):
    root, reference = runs
    alone = _manifest(root / "alone")["sessions"][-1]["execution"]["clean_states"]
    assert (alone["clean_passes"], alone["reused"]) == (_clean_passes(reference.records)[0], 0)
    for i in range(2):
        records = RunDirectory(root / f"s{i}").read_records()
        per_cell, once = _clean_passes(records)
        stats = _manifest(root / f"s{i}")["sessions"][-1]["execution"]["clean_states"]
        assert stats["clean_passes"] == once < per_cell and stats["reused"] == per_cell - once


@pytest.mark.slow
def test_shards_split_the_cells_round_robin_and_merge_to_the_unsharded_run(runs):
    root, reference = runs
    s0, s1 = RunDirectory(root / "s0"), RunDirectory(root / "s1")
    cells = canonical_cells([1, 5], single=True, progressive=True)
    assert set(s0.finished_cells()) == {c.key for c in cells[0::2]} == {("single", 1), ("progressive", 1)}
    assert set(s1.finished_cells()) == {c.key for c in cells[1::2]}
    assert (root / "s0" / "stability.parquet").is_file() and not (root / "s1" / "stability.parquet").exists()
    assert _manifest(root / "s1")["shard"] == {"index": 1, "count": 2}
    assert not (root / "s0" / "report.md").exists()

    result = runner.invoke(app, ["merge", str(root / "s1"), str(root / "s0"), "--out", str(root / "merged"),
                                 "--no-report"])
    assert result.exit_code == 0, result.output
    merged = root / "merged"
    pd.testing.assert_frame_equal(RunDirectory(merged).read_records(), reference.records)
    assert (merged / "summary.csv").read_bytes() == (root / "alone" / "summary.csv").read_bytes()
    for name in ("metrics.parquet", "stability.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(merged / name), pd.read_parquet(root / "alone" / name))
    manifest = _manifest(merged)
    assert manifest["status"] == "complete" and manifest["config"] == CONFIG.to_dict() and "shard" not in manifest
    assert [s["shard"] for s in manifest["merged"]["shards"]] == ["0/2", "1/2"]
    assert {s["shard"] for s in manifest["sessions"] if "shard" in s} == {"0/2", "1/2"}
    assert manifest["sessions"][-1]["merged"] and manifest["sessions"][-1]["device"] == "cpu"
    assert json.loads((merged / "verification.json").read_text())["passed"]
    assert set(RunDirectory(merged).finished_cells()) == set(expected_cells(manifest["config"], manifest))
    assert not list(root.glob(".tmp-merge-*")) and not list(merged.rglob(".tmp-*"))


@pytest.mark.slow
def test_merge_refuses_what_does_not_make_one_run(runs, tmp_path):
    root, _ = runs
    s0, s1 = root / "s0", root / "s1"

    def refused(dirs, match):
        out = tmp_path / "out"
        with pytest.raises(RunDirectoryError, match=match):
            merge_runs(dirs, out)
        assert not out.exists() and not list(tmp_path.glob(".tmp-merge-*")), "a refused merge writes nothing"

    refused([s0], r"missing L5-single, L5-progressive; not given: shard 1/2")
    refused([s0, s0], r"shard 0/2 is given twice")
    refused([s0, root / "alone"], r"alone is not a shard \(it was run without --shard i/N\)")

    def copy_of_s1(name):
        target = tmp_path / name
        shutil.copytree(s1, target)
        return target

    other = copy_of_s1("other-config")
    manifest = _manifest(other)
    manifest["config"]["n_boot"] = 99
    (other / "manifest.json").write_text(json.dumps(manifest))
    refused([s0, other], r"different configurations \(n_boot: 100 in .*s0, 99 in .*other-config\)")

    metrics = copy_of_s1("other-metrics")
    table = pd.read_parquet(metrics / "metrics.parquet")
    table.loc[0, "utilization_rate"] += 1e-9
    table.to_parquet(metrics / "metrics.parquet", index=False)
    refused([s0, metrics], r"observe tables \(metrics.parquet\) of shard 0/2 .* and shard 1/2 .*differ")

    partial = copy_of_s1("partial")
    (partial / "records" / "L005-progressive.parquet").unlink()
    refused([s0, partial], r"missing L5-progressive\.")

    doubled = copy_of_s1("doubled")
    shutil.copy(s0 / "records" / "L001-single.parquet", doubled / "records")
    refused([s0, doubled], r"held twice: L1-single \(in .*s0, .*doubled\)")

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("something")
    with pytest.raises(RunDirectoryError, match="already exists and is not empty"):
        merge_runs([s0, s1], tmp_path / "full")


@pytest.mark.slow
def test_a_shard_resumes_only_as_the_same_shard(runs, tmp_path):
    root, _ = runs
    copy = tmp_path / "s0"
    shutil.copytree(root / "s0", copy)
    with pytest.raises(RunDirectoryError, match=r"holds shard 0/2, but shard 1/2 was requested"):
        run_audit(CONFIG, copy, execution=Execution(shard="1/2"))
    with pytest.raises(RunDirectoryError, match=r"holds shard 0/2, but every cell \(no --shard\) was requested"):
        run_audit(CONFIG, copy)
    with pytest.raises(RunDirectoryError, match=r"holds an unsharded run"):
        run_audit(CONFIG, root / "alone", execution=Execution(shard="0/2"))
    again = run_audit(CONFIG, copy, report=False, execution=Execution(shard=Shard(0, 2)))
    assert again.computed_cells == [] and again.resumed_cells == ["L1-single", "L1-progressive"]


def test_ray_without_ray_installed_is_refused_before_anything_runs(monkeypatch, tmp_path):
    import importlib.util

    from moeaudit.run.execution import check_executor

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs Ray, which is not installed here: pip install 'moeaudit\[ray\]'"):
        run_audit(CONFIG, tmp_path / "run", execution=Execution(executor="ray"))
    assert not (tmp_path / "run").exists()
    check_executor(Execution())  # the local executor needs nothing


def test_shard_and_size_specs():
    assert Shard.parse("3/4") == Shard(3, 4) and str(Shard(3, 4)) == "3/4"
    cells = [Cell("single", layer) for layer in range(7)]
    parts = [Shard(i, 3).select(cells) for i in range(3)]
    assert sorted(c for p in parts for c in p) == sorted(cells) and [len(p) for p in parts] == [3, 2, 2]
    with pytest.raises(ConfigError, match=r"use 0\.\.3 \(a SLURM array for it: --array=0-3\)"):
        Shard.parse("4/4")
    with pytest.raises(ConfigError, match="INDEX/COUNT"):
        Shard.parse("1-4")
    with pytest.raises(ConfigError, match="positive number of shards"):
        Shard.parse("0/0")
    assert [parse_bytes(x) for x in ("8GiB", "8g", "500MB", "0", "auto", "1.5KiB")] == \
        [8 * 2**30, 8 * 2**30, 500 * 10**6, 0, None, 1536]
    with pytest.raises(ConfigError, match="is not a size"):
        parse_bytes("lots")
    with pytest.raises(ConfigError, match="executor 'rya' is not valid; valid: local, ray. Did you mean 'ray'"):
        Execution(executor="rya")
    with pytest.raises(ConfigError, match="add --executor ray"):
        Execution(ray_actors=2)
    result = runner.invoke(app, _cli("--shard", "2/2", "--out", "nowhere"))
    assert result.exit_code == 2 and "use 0..1" in result.output
