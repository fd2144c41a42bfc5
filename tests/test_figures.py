"""Report figures on a tiny OLMoE run: grid shapes, plotted data against independent computations, colours, files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import cached_tiny, random_ids
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

from moeaudit.experiments import ExperimentSettings, run_experiments, summarize
from moeaudit.report._figures import (
    METRIC_COLORS,
    control_vs_depth,
    difference_histograms,
    expert_importance,
    metric_color,
    metric_label,
    metric_vs_importance,
    paired_scatter,
    progressive_curves,
    save,
    to_png_bytes,
)

MODEL = "tiny"


@pytest.fixture(scope="module")
def run():
    model = cached_tiny("olmoe")
    seqs = [random_ids(40, seed=i) for i in range(5)]
    settings = ExperimentSettings(n=12, n_progressive=10, seed=1, model_name=MODEL)
    return run_experiments(model, seqs, settings)


def _drawn(fig: Figure) -> list:
    return [ax for ax in fig.axes if ax.get_visible() and (ax.lines or ax.collections or ax.patches)]


def _panel(fig: Figure, title: str):
    (ax,) = [ax for ax in fig.axes if ax.get_title() == title]
    return ax


def _two_models(table: pd.DataFrame) -> pd.DataFrame:
    other = table.assign(model="other", cohens_d=-table["cohens_d"] - 1.0)
    return pd.concat([table, other], ignore_index=True)


def _line(ax, model: str):
    (line,) = [ln for ln in ax.lines if ln.get_gid() == f"control:{model}"]
    return line


def _band_vertices(ax, model: str) -> np.ndarray:
    (band,) = [c for c in ax.collections if c.get_gid() == f"band:{model}"]
    return np.concatenate([p.vertices for p in band.get_paths()])


# --- shapes and empty input ------------------------------------------------------------------------------------


def test_grids_have_one_drawn_panel_per_layer_and_metric(run):
    layers = run.records["layer"].nunique()
    assert len(_drawn(paired_scatter(run.records, MODEL))) == layers * 5  # four metrics + the control
    assert len(_drawn(difference_histograms(run.records, MODEL))) == layers * 5
    assert len(_drawn(metric_vs_importance(run.records, run.metrics, MODEL))) == layers * 4
    fig = progressive_curves(run.tables["progressive"], MODEL)
    assert len(_drawn(fig)) == 3 * 3  # a row per removal order, columns mean / median / P95
    for ax in fig.axes:
        assert sorted(ln.get_label() for ln in ax.lines if ln.get_label().startswith("L")) == \
            [f"L{layer}" for layer in range(layers)]
    assert len(_drawn(control_vs_depth(run.tables["audit"], run.tables["control"]))) == 1


def test_progressive_curves_plot_each_arms_table_values(run):
    table = run.tables["progressive"]
    fig = progressive_curves(table, MODEL)
    lines = {ln.get_gid(): ln for ax in fig.axes for ln in ax.lines if ln.get_gid()}
    assert len(lines) == 3 * 3 * table["layer"].nunique()  # arms x statistics x layers
    for (arm, layer), cell in table.groupby(["arm", "layer"]):
        cell = cell.sort_values("k")
        for column in ("mean", "median", "p95"):
            line = lines[f"progressive:{arm}:{column}:L{layer}"]
            np.testing.assert_array_equal(line.get_xdata(), cell["k"])
            np.testing.assert_allclose(line.get_ydata(), cell[column])
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0].endswith("highest weight first") and titles[3].endswith("lowest weight first")
    assert titles[6].endswith("random order")


def test_columns_follow_the_audit_order_with_the_control_last(run):
    fig = paired_scatter(run.records, MODEL)
    titles = [ax.get_title() for ax in fig.axes[:5]]
    assert titles == ["L0 · utilization", "L0 · activation norm", "L0 · mean weight (active)",
                      "L0 · activation std", "L0 · routing weight (control)"]


def test_missing_cells_are_hidden_not_drawn(run):
    records = run.records[~((run.records["layer"] == 1) & (run.records["metric"] == "activation_std"))]
    fig = paired_scatter(records, MODEL)
    assert len(_drawn(fig)) == run.records["layer"].nunique() * 5 - 1


def test_none_without_the_needed_experiment(run):
    empty = pd.DataFrame()
    progressive_only = run.records[run.records["experiment"] == "progressive"]
    assert control_vs_depth(run.tables["audit"], empty) is None
    assert progressive_curves(empty, MODEL) is None
    assert progressive_curves(run.tables["progressive"], "no such model") is None
    assert paired_scatter(empty, MODEL) is None
    assert paired_scatter(progressive_only, MODEL) is None
    assert difference_histograms(progressive_only, MODEL) is None
    assert metric_vs_importance(progressive_only, run.metrics, MODEL) is None
    assert metric_vs_importance(run.records, empty, MODEL) is None
    assert metric_vs_importance(run.records, run.metrics, "no such model") is None


# --- Figure 1 --------------------------------------------------------------------------------------------------


def test_control_line_and_band_match_the_tables(run):
    audit, control = _two_models(run.tables["audit"]), _two_models(run.tables["control"])
    ax = control_vs_depth(audit, control).axes[0]
    colors = set()
    for model in (MODEL, "other"):
        line = _line(ax, model)
        expected = control[control["model"] == model].sort_values("relative_depth")
        np.testing.assert_allclose(line.get_xdata(), expected["relative_depth"])
        np.testing.assert_allclose(line.get_ydata(), expected["cohens_d"])
        colors.add(to_rgb(line.get_color()))
        vertices = _band_vertices(ax, model)
        cells = audit[audit["model"] == model]
        for depth, per_layer in cells.groupby("relative_depth"):
            ys = vertices[np.isclose(vertices[:, 0], depth), 1]
            assert ys.min() == pytest.approx(per_layer["cohens_d"].min())
            assert ys.max() == pytest.approx(per_layer["cohens_d"].max())
    assert len(colors) == 2
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:2] == [MODEL, "other"] and any("significant" in t for t in labels)


def test_filled_markers_are_the_significant_cells(run):
    control = run.tables["control"].copy()
    control["significant"] = [i % 2 == 0 for i in range(len(control))]
    ax = control_vs_depth(run.tables["audit"], control).axes[0]
    markers = [ln for ln in ax.lines if ln.get_marker() == "o" and ln.get_linestyle() == "None"]
    filled = [ln for ln in markers if to_rgb(ln.get_markerfacecolor()) != (1.0, 1.0, 1.0)]
    hollow = [ln for ln in markers if to_rgb(ln.get_markerfacecolor()) == (1.0, 1.0, 1.0)]
    ordered = control.sort_values("relative_depth")
    np.testing.assert_allclose(filled[0].get_xdata(), ordered.loc[ordered["significant"], "relative_depth"])
    np.testing.assert_allclose(hollow[0].get_xdata(), ordered.loc[~ordered["significant"], "relative_depth"])


# --- Figures 3-5 -----------------------------------------------------------------------------------------------


def test_scatter_points_and_effect_sizes_match_the_records_and_the_audit_table(run):
    fig = paired_scatter(run.records, MODEL)
    audit = run.tables["audit"].set_index(["layer", "metric"])
    for layer, metric in [(0, "activation_norm"), (2, "utilization_rate")]:
        ax = _panel(fig, f"L{layer} · {metric_label(metric)}")
        cell = run.records[(run.records["experiment"] == "audit") & (run.records["layer"] == layer)
                           & (run.records["metric"] == metric)]
        wide = cell.pivot_table(index=["seq_id", "position"], columns="role", values="delta")
        np.testing.assert_allclose(np.sort(ax.collections[0].get_offsets()[:, 0]), np.sort(wide["low"]))
        np.testing.assert_allclose(np.sort(ax.collections[0].get_offsets()[:, 1]), np.sort(wide["high"]))
        corner = " ".join(t.get_text() for t in ax.texts)
        assert f"d = {audit.at[(layer, metric), 'cohens_d']:+.2f}" in corner


def test_histogram_counts_every_position(run):
    fig = difference_histograms(run.records, MODEL)
    ax = _panel(fig, "L1 · routing weight (control)")
    counts = sum(p.get_height() for p in ax.patches)
    assert counts == run.tables["control"].set_index("layer").at[1, "n"]


def _importance_points(fig: Figure, layer: int, metric: str) -> np.ndarray:
    ax = _panel(fig, f"L{layer} · {metric_label(metric)}")
    (points,) = [c for c in ax.collections if c.get_gid() == f"experts:{layer}:{metric}"]
    return points.get_offsets().data


def test_importance_is_the_mean_delta_per_expert(run):
    fig = metric_vs_importance(run.records, run.metrics, MODEL)
    single = run.records[(run.records["experiment"] == "rank_validity")
                         & (run.records["metric"] == "activation_norm")]  # one metric's rows: no repeats
    expected = single.assign(expert=single["ablated_experts"].str[0]).groupby(["layer", "expert"])["delta"].mean()
    metrics = run.metrics.set_index(["layer", "expert"])
    for layer in (0, 3):
        for metric in ("utilization_rate", "activation_std"):
            points = _importance_points(fig, layer, metric)
            want = expected.loc[layer]
            assert len(points) == len(want)
            np.testing.assert_allclose(points[:, 1], want.to_numpy())
            np.testing.assert_allclose(points[:, 0], metrics.loc[[(layer, e) for e in want.index], metric])


def test_importance_counts_each_ablation_once(run):
    single = run.records[(run.records["experiment"] == "rank_validity") & (run.records["metric"] == "utilization_rate")]
    counts = single.assign(expert=single["ablated_experts"].str[0]).groupby(["layer", "expert"]).size()
    table = expert_importance(run.records, MODEL).set_index(["layer", "expert"])
    np.testing.assert_array_equal(table["n"], counts.reindex(table.index))


def test_importance_falls_back_to_redistribution(run):
    records = run.records[run.records["experiment"] != "rank_validity"]
    fig = metric_vs_importance(records, run.metrics, MODEL)
    table = summarize(records, n_boot=10)["redistribution_experts"]
    want = table[table["layer"] == 2].sort_values("expert")
    np.testing.assert_allclose(_importance_points(fig, 2, "activation_norm")[:, 1], want["mean_delta"])


# --- colours, labels, files ------------------------------------------------------------------------------------


def test_a_metric_has_one_colour_in_every_figure(run):
    scatter = paired_scatter(run.records, MODEL)
    hist = difference_histograms(run.records, MODEL)
    importance = metric_vs_importance(run.records, run.metrics, MODEL)
    for metric in ("activation_norm", "routing_weight"):
        title = f"L1 · {metric_label(metric)}"
        want = to_rgb(METRIC_COLORS[metric])
        assert to_rgb(_panel(scatter, title).collections[0].get_facecolor()[0]) == want
        assert to_rgb(_panel(hist, title).patches[0].get_facecolor()) == want
        if metric != "routing_weight":
            assert to_rgb(_panel(importance, title).collections[0].get_facecolor()[0]) == want


def test_labels_and_fallback_colours():
    assert metric_label("soft_utilization") == "soft utilization"
    assert metric_color("soft_utilization") == metric_color("soft_utilization")
    assert metric_color("soft_utilization") not in METRIC_COLORS.values()


def test_save_writes_png_and_pdf_atomically(run, tmp_path):
    fig = control_vs_depth(run.tables["audit"], run.tables["control"])
    paths = save(fig, tmp_path / "figures", "control")
    assert [p.name for p in paths] == ["control.png", "control.pdf"]
    assert paths[0].read_bytes().startswith(b"\x89PNG")
    assert paths[1].read_bytes().startswith(b"%PDF")
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["control.pdf", "control.png"]
    assert to_png_bytes(fig) == to_png_bytes(control_vs_depth(run.tables["audit"], run.tables["control"]))
