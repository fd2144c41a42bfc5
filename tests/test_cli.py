"""The command line on the embedded model: inspect, verify, run (run directories, resume, TOML), report, bad input."""

from __future__ import annotations

import json

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
    assert "Loading weights" not in result.output, "transformers' own bar would interleave with ours"


RUN = ["--layers", "7", "--n", "12", "--n-progressive", "6", "--n-docs", "6", "--n-docs-progressive", "6",
       "--max-length", "96", "--n-boot", "50", "--device", "cpu"]


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("demo", "run", "merge", "report", "verify", "inspect", "bench", "validate"):
        assert command in result.output


def test_bench_help_lists_every_option():
    import dataclasses

    from moeaudit.bench import BenchConfig

    result = runner.invoke(app, ["bench", "--help"], terminal_width=200, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for f in dataclasses.fields(BenchConfig):
        assert f"--{f.name.replace('_', '-')}" in result.output, f.name
    assert "olmoe-1b-7b" in result.output and "deepseek-v2-lite" in result.output
    bad = runner.invoke(app, ["bench", "--preset", "olmoe-7b"])
    assert bad.exit_code == 2 and "unknown bench preset 'olmoe-7b'" in bad.output


def test_run_writes_a_run_directory_and_report_regenerates_it(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", *RUN, "--out", str(out)])
    assert result.exit_code == 0, result.output
    records = pd.read_parquet(out / "records" / "L007-single.parquet")
    assert set(records["layer"]) == {7}
    audit = pd.read_csv(out / "tables" / "audit.csv")
    assert len(audit) == 4 and (audit["n"] == 12).all()
    assert "4 cells" not in result.output and "2 cells computed, 0 resumed" in result.output
    again = runner.invoke(app, ["run", *RUN, "--out", str(out)])
    assert again.exit_code == 0 and "0 cells computed, 2 resumed" in again.output
    (out / "report.md").unlink()
    regen = runner.invoke(app, ["report", str(out)])
    assert regen.exit_code == 0, regen.output
    assert (out / "report.md").is_file()


def test_run_from_toml_with_flag_override(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('model = "builtin:tiny-moe"\nlayers = [7]\nn = 12\nn_progressive = 6\nn_docs = 6\n'
                      'n_docs_progressive = 6\nmax_length = 96\nn_boot = 50\nexperiments = ["audit"]\n'
                      'device = "cpu"\n')
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(config), "--name", "from-toml", "--out", str(out), "--no-report"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["name"] == "from-toml" and manifest["config"]["experiments"] == ["audit"]
    assert not (out / "report.md").exists()


def test_run_refuses_another_config_in_the_same_directory(tmp_path):
    out = tmp_path / "run"
    args = ["run", *RUN, "--experiments", "audit", "--no-report", "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    result = runner.invoke(app, [*args, "--seed", "1"])
    assert result.exit_code == 2
    assert "different configuration" in result.output and "seed: stored 0, requested 1" in result.output


def test_run_bad_input_is_one_clear_message(tmp_path):
    result = runner.invoke(app, ["run", *RUN, "--metrics", "utilisation", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "utilization_rate" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()
    result = runner.invoke(app, ["run", "paper-olmo"])
    assert result.exit_code == 2 and "does not exist" in result.output and "paper-olmoe" in result.output
    result = runner.invoke(app, ["run", *RUN, "--layers", "3,99", "--out", str(tmp_path / "y")])
    assert result.exit_code == 2 and "--layers=3,99: 99 not MoE layer(s)" in result.output
    assert not (tmp_path / "y").exists(), "a run refused for bad input leaves nothing on disk"
    result = runner.invoke(app, ["report", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "not a moeaudit run directory" in result.output


def test_every_config_key_has_a_run_flag_showing_its_default():
    import dataclasses

    from moeaudit.config import RunConfig

    result = runner.invoke(app, ["run", "--help"], terminal_width=240, env={"COLUMNS": "240"})
    lines = {line.split()[1]: line for line in result.output.splitlines() if line.startswith("│ --")}
    for f in dataclasses.fields(RunConfig):
        flag = f"--{f.name.replace('_', '-')}"
        assert flag in lines, f.name
        assert "[default: " in lines[flag], (flag, lines[flag])
    assert "[default: (200)]" in lines["--n"] and "[default: (builtin:tiny-moe)]" in lines["--model"]
    assert "--allow-fewer" in lines and "--trust-remote-code" in lines


def test_demo_help_is_one_paragraph():
    result = runner.invoke(app, ["demo", "--help"], terminal_width=240, env={"COLUMNS": "240"})
    summary = result.output.split("Usage:")[1].split("╭")[0].strip().splitlines()[1:]
    assert [line for line in summary if line.strip()] == [
        " The whole audit (all five experiments, then the report) of both embedded models and corpus, side by side."]
