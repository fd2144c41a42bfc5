"""Whole runs into run directories: every artefact, resume (no-op and partial), refusals, the verification gate,
report regeneration from records, several runs side by side, and the HTML rendered in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from moeaudit.config import RunConfig
from moeaudit.errors import RunDirectoryError, VerificationError
from moeaudit.experiments import decision_counts, summarize
from moeaudit.run.pipeline import run_audit
from moeaudit.rundir import RunDirectory

CONFIG = RunConfig(model="builtin:tiny-moe", name="tiny", corpus="builtin", n_docs=6, n_docs_progressive=8,
                   max_length=96, layers=(1, 5), n=12, n_progressive=8, n_boot=100, device="cpu", dtype="float32",
                   seed=7, sesoi_d=0.3)
CELLS = {("single", 1), ("single", 5), ("progressive", 1), ("progressive", 5)}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "clean"
    result = run_audit(CONFIG, out)
    return out, result


def _without_timestamp(text: str) -> str:
    return re.sub(r"Generated \d{4}-\d\d-\d\d \d\d:\d\d UTC from \d+ run director\w+ \(.*?\)\.", "", text)


def test_every_artefact_is_written(clean):
    out, result = clean
    for name in ("manifest.json", "config.toml", "verification.json", "metrics.parquet", "stability.parquet",
                 "summary.csv", "summary.json", "report.md", "report.html", "tables/audit.csv", "tables/metrics.csv"):
        assert (out / name).is_file(), name
    assert set(RunDirectory(out).finished_cells()) == CELLS
    figures = {p.name for p in (out / "figures").iterdir()}
    for stem in ("control_vs_depth", "tiny-progressive", "tiny-scatter", "tiny-difference_hist",
                 "tiny-metric_vs_importance"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= figures
    assert not list(out.rglob(".tmp-*")) and not (out / ".lock").exists()
    assert sorted(result.computed_cells) == sorted(f"L{layer}-{kind}" for kind, layer in CELLS)


def test_manifest_records_config_environment_and_stages(clean):
    out, _ = clean
    m = json.loads((out / "manifest.json").read_text())
    assert m["config"] == CONFIG.to_dict() and m["status"] == "complete"
    assert RunConfig.from_toml(out / "config.toml") == CONFIG
    session = m["sessions"][-1]
    env = session["environment"]
    assert {"python", "torch", "transformers", "moeaudit", "git_revision"} <= set(env)
    assert session["device"] == "cpu" and session["dtype"] == "float32" and session["verification_passed"]
    assert {"load_model", "load_corpus", "observe", "verification", "cell L1-single", "summary", "report"} \
        <= set(session["stages"])
    assert session["started"] <= session["ended"]
    assert m["model"]["family"] == "olmoe" and m["corpus"]["n_sequences"] == 8 and len(m["corpus"]["sha256"]) == 64


def test_summary_files_equal_the_records_summary(clean):
    out, result = clean
    records = RunDirectory(out).read_records()
    pd.testing.assert_frame_equal(records, result.records)
    tables = summarize(records, metrics=RunDirectory(out).read_parquet("metrics.parquet"), n_boot=CONFIG.n_boot,
                       seed=CONFIG.seed, sesoi_d=CONFIG.sesoi_d)
    stored = json.loads((out / "summary.json").read_text())
    for name, table in tables.items():
        left = pd.DataFrame(stored[name])  # a column that is all NaN comes back from JSON as None
        left = left.astype({c: float for c in left.columns if left[c].isna().all()})
        pd.testing.assert_frame_equal(left.reset_index(drop=True), table.reset_index(drop=True), check_dtype=False,
                                      rtol=1e-12)
    long = pd.read_csv(out / "summary.csv")
    assert (long["table"] == "audit").sum() == 8 and (long["table"] == "control").sum() == 2
    audit = tables["audit"]
    assert set(audit["layer"]) == {1, 5} and (audit["n"] == 12).all() and (audit["sesoi_d"] == 0.3).all()
    # the columns downstream scripts rely on
    contract = {"p_cluster", "tost_p", "bf0plus", "hl_estimate", "p_sign", "p_perm", "d_perm_low", "d_perm_high",
                "d_ceiling", "d_ceiling_low", "d_ceiling_high"}
    for name in ("audit", "control"):
        assert contract <= set(pd.read_csv(out / "tables" / f"{name}.csv").columns), name
        assert contract <= set(stored[name][0]), name
        assert pd.read_csv(out / "tables" / f"{name}.csv")["p_perm"].between(0, 1).all(), name
    assert stored["families"][0]["family"] == "audit" and stored["families"][0]["mde_d"] > 0


def test_rerun_is_a_noop_and_partial_resume_recomputes_only_missing_cells(clean, tmp_path):
    out, result = clean
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["config"]["sesoi_d"]  # as written by a version without the key
    (copy / "manifest.json").write_text(json.dumps(manifest))
    again = run_audit(CONFIG.replace(sesoi_d=0.2), copy, report=False)  # a missing key counts as its default
    assert again.computed_cells == [] and len(again.resumed_cells) == 4
    with pytest.raises(RunDirectoryError, match="sesoi_d: stored 0.2, requested 0.3"):
        run_audit(CONFIG, copy, report=False)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["config"]["sesoi_d"] = CONFIG.sesoi_d
    (copy / "manifest.json").write_text(json.dumps(manifest))
    (copy / "records" / "L005-single.parquet").unlink()
    (copy / "records" / ".tmp-x.parquet").write_bytes(b"half a file")  # a write killed mid-way
    partial = run_audit(CONFIG, copy, report=False)
    assert partial.computed_cells == ["L5-single"]
    pd.testing.assert_frame_equal(partial.records, result.records)
    assert (copy / "summary.csv").read_text() == (out / "summary.csv").read_text()
    manifest = json.loads((copy / "manifest.json").read_text())
    assert len(manifest["sessions"]) == 3 and manifest["sessions"][-1]["computed_cells"] == ["L5-single"]


def test_a_directory_with_another_config_is_refused(clean, tmp_path):
    out, _ = clean
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = sorted(p.name for p in copy.rglob("*"))
    with pytest.raises(RunDirectoryError, match="n: stored 12, requested 13"):
        run_audit(CONFIG.replace(n=13), copy)
    assert sorted(p.name for p in copy.rglob("*")) == before


def test_a_changed_corpus_is_refused(tmp_path):
    corpus = tmp_path / "docs.txt"
    text = " ".join(["The quick brown fox jumps over the lazy dog."] * 12)
    corpus.write_text(f"{text}\n\n{text} again\n")
    cfg = CONFIG.replace(corpus=str(corpus), n_docs=2, n_docs_progressive=2, n=3, n_progressive=2, layers=[1],
                         experiments=["audit"], min_length=16)
    run_audit(cfg, tmp_path / "run", report=False)
    corpus.write_text(f"Changed: {text}\n\n{text} again\n")
    with pytest.raises(RunDirectoryError, match="tokenises differently"):
        run_audit(cfg, tmp_path / "run", report=False)


def test_failed_verification_collects_nothing(tmp_path, monkeypatch):
    import moeaudit.intervene._verify as verify_module

    real = verify_module.verify

    def broken(*args, **kwargs):
        report = real(*args, **kwargs)
        bad = verify_module.CheckResult(name="engines_agree", passed=False, value=1.0, threshold=1e-4,
                                        detail="injected failure")
        return verify_module.VerificationReport((*report.checks[:-1], bad), report.dtype, report.n_sequences,
                                                report.seed)

    monkeypatch.setattr(verify_module, "verify", broken)
    out = tmp_path / "run"
    with pytest.raises(VerificationError, match="injected failure"):
        run_audit(CONFIG.replace(experiments=["audit"], layers=[1]), out)
    assert RunDirectory(out).finished_cells() == {}
    assert json.loads((out / "verification.json").read_text())["passed"] is False
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "VerificationError" in manifest["sessions"][-1]["error"]


def test_report_is_regenerated_from_records_alone(clean, tmp_path):
    from moeaudit.report import write_report

    out, _ = clean
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    for name in ("report.md", "report.html", "summary.json", "summary.csv"):
        (copy / name).unlink()
    shutil.rmtree(copy / "figures")
    paths = write_report([copy], copy)
    assert _without_timestamp(paths["markdown"].read_text()) == _without_timestamp(
        (out / "report.md").read_text()).replace(str(out), str(copy))
    assert (copy / "figures" / "control_vs_depth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_of_an_unfinished_run_says_so(clean, tmp_path):
    from moeaudit.report import write_report

    out, _ = clean
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "records" / "L005-progressive.parquet").unlink()
    md = write_report([copy], copy)["markdown"].read_text()
    assert "**This run is incomplete** (status: complete; 3 of 4 cells finished)" in md
    assert "This run is incomplete" not in (out / "report.md").read_text()


def test_report_contents_follow_the_numbers(clean):
    out, result = clean
    md = (out / "report.md").read_text()
    audit = result.tables["audit"]
    n_sig = int(audit["significant"].sum())
    assert re.search(rf"\b{n_sig} of 8 metric × layer cells shows? E\[D\] > 0", md)
    assert decision_counts(audit, "audit").split(": ", 1)[1].split(" (")[0] in md
    assert "does the metric rank experts better than random rankings?" in md and "tiny: per layer" in md
    assert "report-details.md" in md and "tiny: tables" not in md  # the long tables are in the details
    details = (out / "report-details.md").read_text()
    for _, row in audit.iterrows():  # every audit cell appears with its d
        assert f"| L{row['layer']} |" in details and f"{row['cohens_d']:+.3f}" in details
    assert "k=1" in details and "ρ(weight, gap)" in details and "Kendall τ" in details
    assert "All 5 checks passed" in md and (out / "report-details.html").is_file()


def test_report_compares_the_progressive_arms(clean):
    out, result = clean
    md = (out / "report.md").read_text()
    details = (out / "report-details.md").read_text()
    arms = result.tables["progressive_arms"]
    assert len(arms) == 2 * 3 * 3  # layers x k x pairs of orders
    assert "does the removal order matter?" in details and "**Does the removal order matter?**" in details
    assert f"of {len(arms)} paired comparisons" in details and "min(±0.05 nats, 10% of the layer's mean ΔL" in details
    assert "Does the removal order matter?" not in md  # report.md keeps the cells' decisions and the control
    for decision, count in arms["decision"].value_counts().items():
        assert f"| {decision} |" in details and count > 0
    assert "random order" in details and (out / "tables" / "progressive_arms.csv").is_file()


def test_a_run_directory_from_before_the_arms_is_still_reported(clean, tmp_path):
    """Progressive records with roles top<k> (highest weight first) and a manifest without the arm settings:
    the report reads them as the highest arm, without a comparison; resuming is refused with the reason."""
    from moeaudit.report import write_report

    out, _ = clean
    old = tmp_path / "old"
    (old / "records").mkdir(parents=True)
    for path in (out / "records").glob("*-progressive.parquet"):  # the progressive cells only: a quick report
        frame = pd.read_parquet(path)
        frame = frame[frame["role"].str.startswith("highest:")]
        frame.assign(role="top" + frame["k"].astype(str)).to_parquet(old / "records" / path.name, index=False)
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("progressive_arms", "progressive_sesoi"):
        del manifest["config"][key]
    manifest["config"]["experiments"] = ["progressive"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    paths = write_report([old], old)
    md = paths["markdown"].read_text()
    assert "highest weight first" in paths["details_markdown"].read_text() and "Does the removal order matter?" not in md
    assert "**Progressive ablation.**" in paths["details_markdown"].read_text()
    with pytest.raises(RunDirectoryError, match="predates this setting"):
        run_audit(CONFIG.replace(experiments=["progressive"]), old, report=False)


def test_two_runs_side_by_side(clean, tmp_path):
    from moeaudit.report import build_details, load_runs, write_report

    out, _ = clean
    other = tmp_path / "other"
    run_audit(CONFIG.replace(name="tiny-renorm", mode="renormalize", experiments=["audit", "control"]), other,
              report=False)
    runs = load_runs([out, other])
    assert [r.label for r in runs] == ["tiny", "tiny-renorm"]
    _, blocks = build_details(runs)
    headings = [b.text for b in blocks if type(b).__name__ == "Heading"]
    assert "tiny: tables" in headings and "tiny-renorm: tables" in headings
    paths = write_report([out, other], tmp_path / "both")
    md = paths["markdown"].read_text()
    assert len(re.findall("metric × layer cells shows? E\\[D\\] > 0", md)) == 2
    headline = md[md.index("**Headline numbers per model**"):md.index("## Runs")]
    for run in runs:
        audit = run.tables["audit"]
        assert f"| {run.label} | {len(audit)} | {int(audit['significant'].sum())} |" in headline
    # both runs' metric-level rows: in one table near the top and in the report's tables/metrics.csv
    assert md.index("## Both models side by side") < md.index("## Verdict")
    metrics = pd.read_csv(tmp_path / "both" / "tables" / "metrics.csv")
    assert set(metrics["model"]) == {"tiny", "tiny-renorm"}
    # the same run twice gets unique labels
    assert [r.label for r in load_runs([out, out])] == ["tiny (clean)", "tiny (clean)"]


def test_report_needs_records(tmp_path):
    from moeaudit.report import write_report

    with pytest.raises(RunDirectoryError, match="not a moeaudit run directory"):
        write_report([tmp_path], tmp_path / "r")


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (.ci/run installs "
                                                              "it)")
def test_html_report_renders_in_headless_chromium(clean, tmp_path):
    out, _ = clean
    html = (out / "report.html").read_text()
    assert not re.search(r'(src|href)="(https?:|//|figures/)', html), "the HTML must be self-contained"
    n_images = html.count("<img ")
    assert n_images == 2  # the scorecard at the top and Figure 1; the model's figures are in the details
    assert (out / "report-details.html").read_text().count("<img ") == 4
    probe = html.replace("</body>", "<script>window.addEventListener('load', () => { const ok = [...document.images]"
                         ".filter(i => i.complete && i.naturalWidth > 100).length; document.title = "
                         "`images:${ok}/${document.images.length}`; });</script></body>")
    page = tmp_path / "probe.html"
    page.write_text(probe)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run(["chromium", *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    assert f"<title>images:{n_images}/{n_images}</title>" in dom
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", *flags, "--window-size=1200,2400", f"--screenshot={shot}", (out / "report.html")
                    .as_uri()], capture_output=True, timeout=120, check=True)
    from matplotlib.image import imread

    pixels = imread(shot)[..., :3]
    coloured = (pixels.max(axis=-1) - pixels.min(axis=-1)) > 0.2  # not grey: figure colours on the page
    assert coloured.mean() > 0.001, "the screenshot shows no figure"


def test_ctrl_c_marks_the_run_interrupted_and_keeps_finished_cells(clean, tmp_path):
    out, result = clean

    def interrupt(kind, layer):
        raise KeyboardInterrupt

    cfg = CONFIG
    with pytest.raises(KeyboardInterrupt):
        run_audit(cfg, tmp_path / "run", report=False, on_cell=interrupt)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and "KeyboardInterrupt" in manifest["sessions"][-1]["error"]
    assert len(RunDirectory(tmp_path / "run").finished_cells()) == 1 and not (tmp_path / "run" / ".lock").exists()
    resumed = run_audit(cfg, tmp_path / "run", report=False)
    assert len(resumed.resumed_cells) == 1 and len(resumed.computed_cells) == 3
    pd.testing.assert_frame_equal(resumed.records, result.records)


def test_half_precision_runs_carry_a_precision_note(tmp_path):
    out = tmp_path / "bf16"
    run_audit(CONFIG.replace(dtype="bfloat16", experiments=["audit", "control"], layers=[5]), out)
    md = (out / "report.md").read_text()
    assert "**Precision.** This run computed in bfloat16" in md
    assert "Precision." not in RunDirectory(out).path.joinpath("config.toml").read_text()


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v2"])
def test_a_saved_checkpoint_of_another_family_runs_end_to_end(family, tmp_path):
    """Any HuggingFace MoE checkpoint directory: shared experts, dense layers (Qwen2 mlp_only_layers, DeepSeek's
    first dense layer) and group-limited routing go through the whole pipeline, report included."""
    from moeaudit.models import describe, load_model
    from moeaudit.testing import tiny_model

    _, tokenizer = load_model("builtin:tiny-moe")
    model = tiny_model(family, seed=0, vocab_size=len(tokenizer))
    checkpoint = tmp_path / family
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    desc = describe(model)
    cfg = RunConfig(model=str(checkpoint), corpus="builtin", n_docs=4, n_docs_progressive=4, max_length=64,
                    n=8, n_progressive=4, n_boot=50, device="cpu", dtype="float32")
    result = run_audit(cfg, tmp_path / "run")
    assert cfg.label == family
    assert sorted(set(result.records["layer"])) == list(desc.moe_layers)  # dense layers skipped
    audit = result.tables["audit"]
    assert len(audit) == 4 * len(desc.moe_layers) and (audit["n"] == 8).all()
    expected_depth = audit["layer"] / (desc.n_layers - 1)
    assert np.allclose(audit["relative_depth"], expected_depth)
    md = (tmp_path / "run" / "report.md").read_text()
    assert f"| {family} | {desc.family} |" in md and "Against the paper" not in md


def test_validate_writes_validation_json_and_the_report_section(clean, tmp_path):
    import shutil

    from typer.testing import CliRunner

    import moeaudit
    from moeaudit.cli import app

    out, _ = clean
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    result = moeaudit.validate(copy, n_families=20, n_power_draws=4)
    stored = json.loads((copy / "validation.json").read_text())
    assert set(stored) >= {"null_rate", "fwer", "power", "mde_d", "random_ranking_rate", "null_rate_skewed",
                           "null_rate_docflip", "power_rule", "p_detect_ceiling", "n_needed"}
    assert set(stored["null_rate_skewed"]["mean_test"]) == {"rate", "ci_low", "ci_high", "n_draws"}
    assert {row["scope"] for row in stored["power_rule"]} >= {"pooled"}
    assert stored["null_rate"]["t"]["n_draws"] == 20 * 8  # 20 families x 8 audit cells
    assert stored["fwer"]["family_size"] == 8 and stored["n_records"] == len(RunDirectory(copy).read_records())
    assert {row["n"] for row in stored["power"]} == {10, 12}
    assert result["null_rate"] == stored["null_rate"]
    cli = CliRunner().invoke(app, ["validate", str(copy), "--n-families", "10", "--n-power-draws", "2"])
    assert cli.exit_code == 0, cli.output
    assert "family-wise rate" in cli.output and "minimum detectable d" in cli.output
    report = (copy / "report-details.md").read_text()
    assert "validation of the tests" in report and "figures/tiny-validation.png" in report
    assert (copy / "figures" / "tiny-validation.png").is_file()
    bad = CliRunner().invoke(app, ["validate", str(tmp_path / "nothing")])
    assert bad.exit_code == 2 and "not a moeaudit run directory" in bad.output
