"""The report: the paper's tables and figures and a generated verdict, for one run or several side by side.

Everything is rebuilt from what a run directory stores (records, the metric table, stability, the manifest and
the verification report), so ``moeaudit report RUN_DIR`` regenerates it without the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from moeaudit.errors import RunDirectoryError
from moeaudit.report import _tables as T
from moeaudit.report._attribution_control import attribution_control_blocks
from moeaudit.report._document import Block, Figure, Heading, Paragraph, figure_block, write_document
from moeaudit.report._paper import comparison
from moeaudit.report._verdict import verdict_parts
from moeaudit.rundir import RunDirectory


@dataclass
class RunData:
    """One run directory, read back."""

    path: Path
    manifest: dict[str, Any]
    config: dict[str, Any]
    label: str
    records: pd.DataFrame
    tables: dict[str, pd.DataFrame]
    metrics: pd.DataFrame | None
    stability: pd.DataFrame | None
    verification: dict | None
    validation: dict | None = None

    @property
    def layers(self) -> list[int]:
        return sorted(int(x) for x in self.records["layer"].unique()) if len(self.records) else []


def load_run(path: str | Path, *, label: str | None = None) -> RunData:
    """Read a run directory and recompute its summary tables from its records.

    Raises:
        RunDirectoryError: ``path`` is not a run directory, or holds no finished cell.
    """
    from moeaudit.experiments import add_domain_tables, summarize, summary_settings

    run_dir = RunDirectory(path)
    manifest = run_dir.manifest()
    config = manifest["config"]
    records = run_dir.read_records()
    if records.empty:
        raise RunDirectoryError(f"{run_dir.path} holds no finished cell yet (records/ is empty); run or resume it "
                                "first.")
    stored_label = str(records["model"].iloc[0])
    label = label or stored_label
    if label != stored_label:
        records = records.assign(model=label)
    metrics = run_dir.read_parquet("metrics.parquet")
    tables = summarize(records, metrics=metrics, **summary_settings(config))
    add_domain_tables(tables, records, metrics, manifest, seed=int(config.get("seed", 0)))
    return RunData(path=run_dir.path, manifest=manifest, config=config, label=label, records=records,
                   tables=tables,
                   metrics=metrics,
                   stability=run_dir.read_parquet("stability.parquet"),
                   verification=run_dir.read_json("verification.json"),
                   validation=run_dir.read_json("validation.json"))


def load_runs(paths: list[str | Path]) -> list[RunData]:
    """Several runs; labels made unique (``label (directory)``) when two runs share one."""
    runs = [load_run(p) for p in paths]
    labels = [r.label for r in runs]
    if len(set(labels)) < len(labels):
        runs = [load_run(r.path, label=f"{r.label} ({r.path.name})") if labels.count(r.label) > 1 else r
                for r in runs]
    return runs


def _answer_blocks(runs: list[RunData]) -> list[Block]:
    """The Answer (per run, at most five sentences from the metric-level tests and estimates) and the scorecard."""
    from moeaudit.report._answer import answer_sentences, scorecard_figure

    blocks: list[Block] = []
    for run in runs:
        sentences = answer_sentences(run.tables.get("metrics"), run.tables.get("audit"), run.validation)
        if not sentences:
            continue
        blocks.append(Heading("Answer" if len(runs) == 1 else f"Answer: {run.label}"))
        blocks.append(Paragraph(" ".join(sentences)))
        fig = scorecard_figure(run.tables["audit"], run.label)
        if fig is not None:
            blocks.append(_figure(f"{_stem(run.label)}-scorecard", "Scorecard: each cell's d as a percentile among "
                                  "random rankings of the layer's experts (red: above most random rankings) and, at "
                                  "informative layers, its share of the causal ceiling (d / d_ceiling); hatched "
                                  "layers are uninformative (the ceiling does not rise above the random band).", fig))
    return blocks


def _concat(runs: list[RunData], name: str) -> pd.DataFrame:
    parts = [r.tables.get(name) for r in runs if r.tables.get(name) is not None and len(r.tables[name])]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


#: The file the long per-cell tables, the figures per model and the validation section go to.
DETAILS = "report-details"


def build(runs: list[RunData]) -> tuple[str, list[Block]]:
    """The report's title and blocks: what a reader finishes (the Answer, the scorecard, the metric-level table, a
    table per layer, the verdict, the headline numbers); :func:`build_details` holds the rest."""
    from moeaudit.report import _domains as D
    from moeaudit.report import _figures as F
    from moeaudit.report import _overview as O

    title = "moeaudit report: " + ", ".join(r.label for r in runs)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    blocks: list[Block] = [Paragraph(
        f"Generated {now} from {len(runs)} run director{'y' if len(runs) == 1 else 'ies'} "
        f"({', '.join(f'`{r.path}`' for r in runs)}). Every number is recomputed from the stored per-token records. "
        "Question: do observational expert statistics (how often the router picks an expert, how large its output "
        "is) predict what removing the expert does to the next-token loss, token by token? Every cell with all its "
        f"tests, the figures per model and the validation are in `{DETAILS}.md` (`{DETAILS}.html`) and the "
        "`tables/` CSVs.")]
    blocks += _answer_blocks(runs)
    versus = D.comparison(runs)
    side = D.side_by_side_blocks(runs, versus)  # two or more runs: every metric-level row in one table
    blocks += side
    for run in runs:
        for table in (None if side else O.metric_table(run.tables.get("metrics"), run.label),
                      O.layer_table(run.tables.get("audit"), run.tables.get("control"), run.label)):
            if table is not None:
                blocks.append(table)
    blocks += [Heading("Verdict")]
    for run in runs:
        if len(runs) > 1:
            blocks.append(Heading(run.label, 3))
        for warning in (_incomplete(run), _fewer_positions(run), _precision_note(run)):
            if warning:
                blocks.append(Paragraph(warning))
        main, _ = verdict_parts(run.tables, run.stability, run.verification)
        blocks += [Paragraph(p) for p in main]
        against = comparison(run.config["model"], run.tables, _last_dtype(run))
        if against:
            blocks.append(Paragraph(against))
        if len(run.tables.get("domains", ())):
            blocks.append(Paragraph(D.domain_sentence(run.tables["domains"], run.label)))
    blocks += [T.headline_table(runs), Heading("Runs"), T.runs_table(runs)]

    audit_all, control_all = _concat(runs, "audit"), _concat(runs, "control")
    fig = F.control_vs_depth(audit_all, control_all) if len(control_all) else None
    if fig is not None:
        blocks += [Heading("Figure 1: effect size against depth"), _figure(
            "control_vs_depth", "Effect size d of the routing-weight control against relative depth, per model; the "
            "shaded band spans every observational-metric cell at that layer; the hatched band is the 95% range of d "
            "under random rankings of the layer's experts (what an arbitrary ranking achieves); triangles mark the "
            "causal ceiling, the d of experts ranked by their mean ΔL on half of the documents and scored on the "
            "other half (bars: 2.5-97.5% over 200 random halvings). Filled markers: control cells with E[D] > 0 (the "
            "one-sided document-level test of the mean, Holm, at a measured level that holds .05).", fig)]
    if versus is not None:
        blocks += D.comparison_blocks(runs, versus)
    if any(len(r.tables.get("domains", ())) for r in runs):
        blocks.append(Heading("Results per domain"))
        for run in runs:
            blocks += D.domain_blocks(run)
    blocks += [Heading("How to read this report"), Paragraph(
        "For each sampled position t and layer, the active experts are ranked by a metric; the highest- and the "
        "lowest-ranked are removed in turn (their weighted output set to zero at that token only) and the change "
        "of the next-token cross-entropy is measured: D = ΔL_high − ΔL_low. A valid metric gives D > 0. Two "
        "estimands are reported because heavy-tailed D makes them differ: the mean of D (effect size d = "
        "mean(D) / sd(D), Cohen's d_z, with a BCa bootstrap interval) and the typical token (the share of D > 0 "
        "and the Hodges–Lehmann estimate of the typical D in nats). Positions of one document are not independent, "
        "so every test treats the document as the unit. Two questions, two tests: whether a metric ranks a layer's "
        "experts better than random rankings of the same experts (the metric-level test pooled over layers, the "
        "Answer), and, per cell, whether E[D] > 0 (the one-sided document-level test of the mean, Holm, read at "
        "its measured level on the cell's own skewed null). The typical token is described, not tested for the "
        "decision. Absence is claimed only as 'less than half of the causal ceiling' where an interval shows it. "
        "The routing-weight control ranks experts by their per-token router weight instead of a corpus "
        "statistic.")]
    return title, blocks


def build_details(runs: list[RunData]) -> tuple[str, list[Block]]:
    """``report-details``: per model every cell's table, the figures and the validation section."""
    from moeaudit.report import _figures as F

    title = "moeaudit report, details: " + ", ".join(r.label for r in runs)
    blocks: list[Block] = [Paragraph("The per-cell tables, figures and validation behind `report.md`; every column "
                                     "of every table is also in the run's `tables/` CSVs.")]
    for run in runs:
        _, more = verdict_parts(run.tables, run.stability, run.verification)
        if more:
            blocks += [Heading(f"{run.label}: verdict, continued")] + [Paragraph(p) for p in more]
        blocks += _model_section(run, F)
    return title, blocks


def expected_cells(config: dict[str, Any], manifest: dict[str, Any]) -> list[tuple[str, int]]:
    """The (kind, layer) cells a finished run with ``config`` holds."""
    layers = config.get("layers") or manifest.get("model", {}).get("moe_layers", [])
    experiments = config.get("experiments", [])
    single = any(e not in ("progressive", "stability") for e in experiments)
    cells = [("single", int(layer)) for layer in layers if single]
    return cells + [("progressive", int(layer)) for layer in layers if "progressive" in experiments]


def _incomplete(run: RunData) -> str | None:
    """A warning paragraph for a run that has not finished (killed, failed, or still running)."""
    expected = expected_cells(run.config, run.manifest)
    finished = set(RunDirectory(run.path).finished_cells())
    missing = [c for c in expected if c not in finished]
    status = run.manifest.get("status", "?")
    if status == "complete" and not missing:
        return None
    return (f"**This run is incomplete** (status: {status}; {len(expected) - len(missing)} of {len(expected)} "
            f"cells finished): the numbers below cover the finished cells only. Run the same command again to "
            "resume it.")


def _fewer_positions(run: RunData) -> str | None:
    """A note for a run that used fewer positions than it asked for (``allow_fewer``: the corpus had no more)."""
    short = [(kind, p) for kind, p in run.manifest.get("positions", {}).items() if p["n"] < p["requested"]]
    if not short:
        return None
    names = {"single": "n", "progressive": "n_progressive"}
    parts = [f"{names.get(kind, kind)} = {p['n']} positions per cell instead of the {p['requested']} asked for"
             for kind, p in short]
    return (f"**Fewer positions than asked for.** The corpus has no more valid positions, so this run used "
            f"{' and '.join(parts)} (run with allow-fewer); the tests below have that n.")


def _last_dtype(run: RunData) -> str | None:
    sessions = [s for s in run.manifest.get("sessions", []) if s.get("dtype")]
    return sessions[-1]["dtype"] if sessions else None


def _precision_note(run: RunData) -> str | None:
    dtypes = {s.get("dtype") for s in run.manifest.get("sessions", []) if s.get("dtype")}
    half = sorted(dtypes & {"bfloat16", "float16"})
    if not half:
        return None
    return (f"**Precision.** This run computed in {', '.join(half)}: every single ΔL carries rounding noise (on "
            "tiny models of the same families, about 0.01 nats mean absolute against float32, in the fast and the "
            "naive engine alike). Cell statistics average over hundreds of positions, but small per-token effects "
            "are below that resolution; use float32 where memory allows.")


def _model_section(run: RunData, F) -> list[Block]:
    label, tables = run.label, run.tables
    blocks: list[Block] = [Heading(f"{label}: tables")]
    for table in (T.audit_table(tables["audit"], label), T.control_table(tables["control"], label),
                  T.rank_validity_table(tables["rank_validity"], label),
                  T.progressive_table(tables["progressive"], label),
                  T.progressive_arms_table(tables.get("progressive_arms"), label),
                  T.redistribution_table(tables["redistribution_layers"], label),
                  T.stability_table(run.stability, label)):
        if table is not None:
            blocks.append(table)
    blocks += attribution_control_blocks(tables, label)
    figures = [
        ("progressive", F.progressive_curves(tables["progressive"], label),
         "Progressive ablation: ΔL when k active experts are removed together, per layer, one row per removal "
         "order (highest routing weight first, lowest first, a seeded random order)."),
        ("scatter", F.paired_scatter(run.records, label),
         "ΔL_low against ΔL_high per position and cell; points above the diagonal favour the metric."),
        ("difference_hist", F.difference_histograms(run.records, label),
         "Histograms of D = ΔL_high − ΔL_low per cell, with zero and the mean marked."),
        ("metric_vs_importance", F.metric_vs_importance(run.records, run.metrics, label)
         if run.metrics is not None else None,
         "Each expert's metric value against its mean ΔL when removed alone (ρ: Spearman across experts)."),
    ]
    figures = [(n, f, c) for n, f, c in figures if f is not None]
    if figures:
        blocks.append(Heading(f"{label}: figures"))
        stem = _stem(label)
        blocks += [_figure(f"{stem}-{name}", caption, fig) for name, fig, caption in figures]
    if run.validation:
        from moeaudit.report._validation import validation_blocks, validation_figure

        blocks += validation_blocks(run.validation, label, len(run.records))
        fig = validation_figure(run.validation, label)
        if fig is not None:
            blocks.append(_figure(f"{_stem(label)}-validation", "Left: rejection rates at α = .05 under a true null "
                                  "(random pairs) and under random expert rankings, with exact 95% intervals; "
                                  "dashed: 5%. Middle: detection rate of planted metrics against their strength. "
                                  "Right: detection rate against the true d; red: the minimum detectable d.", fig))
    return blocks


def _figure(name: str, caption: str, fig) -> Figure:
    return figure_block(name, caption, fig)


def _stem(label: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-") or "model"


def write_report(paths: list[str | Path], out: str | Path) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and ``figures/*.png|pdf`` for the runs at ``paths`` into ``out``.

    Returns:
        ``{"markdown": ..., "html": ..., "figures": ..., "details_markdown": ..., "details_html": ...}``
        (``report-details.md`` / ``.html``: the per-cell tables, the figures per model and the validation).
    """
    if not paths:
        raise ValueError("write_report needs at least one run directory.")
    from moeaudit.report._prune import REPORTERS

    tools = [RunDirectory(p).manifest().get("tool") for p in paths]
    if any(t in REPORTERS for t in tools):  # map / prune-eval directories have reports of their own
        if len(paths) != 1:
            raise ValueError("`moeaudit map` and `moeaudit prune-eval` directories are reported one at a time; pass "
                             "one directory.")
        return REPORTERS[tools[0]](paths[0], out)
    runs = load_runs(list(paths))
    title, blocks = build(runs)
    details_title, details = build_details(runs)
    written = write_document(title, blocks, out)
    more = write_document(details_title, details, out, stem=DETAILS)
    written.update(details_markdown=more["markdown"], details_html=more["html"])
    _write_cross_tables(runs, Path(out))
    return written


def _write_cross_tables(runs: list[RunData], out: Path) -> None:
    """``tables/domains.csv`` (every run's per-domain results) and, for two or more runs,
    ``tables/model_comparison.csv`` and every run's rows of ``metrics.csv`` and ``layer_z.csv`` in the report's
    directory."""
    from moeaudit.report import _domains as D

    domains = _concat(runs, "domains")
    versus = D.comparison(runs) if len(runs) > 1 else None
    if len(domains) or versus is not None:
        (out / "tables").mkdir(parents=True, exist_ok=True)
    if len(domains):
        domains.to_csv(out / "tables" / "domains.csv", index=False)
    for name in ("metrics", "layer_z") if len(runs) > 1 else ():
        both = _concat(runs, name)
        if len(both):
            (out / "tables").mkdir(parents=True, exist_ok=True)
            both.to_csv(out / "tables" / f"{name}.csv", index=False)
    if versus is not None:
        versus.to_csv(out / "tables" / "model_comparison.csv", index=False)
