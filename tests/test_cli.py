"""The command line on the embedded model: inspect, verify, audit (files written), bench, bad input."""

from __future__ import annotations

import pandas as pd
from typer.testing import CliRunner

from moeaudit.cli import app

runner = CliRunner()


def test_inspect_builtin():
    result = runner.invoke(app, ["inspect", "builtin:tiny-moe", "--n", "2"])
    assert result.exit_code == 0, result.output
    assert "family: olmoe" in result.output and "n_experts: 16" in result.output


def test_verify_builtin_passes():
    result = runner.invoke(app, ["verify", "--model", "builtin:tiny-moe", "--n", "2"])
    assert result.exit_code == 0, result.output
    assert "engines_agree" in result.output


def test_audit_writes_records_and_tables(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["audit", "--layers", "7", "--n", "20", "--n-progressive", "10", "--n-docs", "8",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    records = pd.read_parquet(out / "records.parquet")
    assert set(records["layer"]) == {7}
    audit = pd.read_csv(out / "audit.csv")
    assert len(audit) == 4 and (audit["n"] == 20).all()
    for name in ("control", "rank_validity", "progressive", "redistribution_layers", "metrics"):
        assert (out / f"{name}.csv").is_file()


def test_audit_bad_metric_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["audit", "--layers", "7", "--n", "5", "--n-docs", "4", "--metrics", "utilisation",
                                 "--out", str(tmp_path / "x")])
    assert result.exit_code != 0
    assert "utilization_rate" in str(result.exception)
