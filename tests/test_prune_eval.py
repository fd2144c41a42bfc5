"""prune-eval and the causal importance map: the pieces against independent computations (losses against the
model's own loss, the importance table against pandas / statsmodels, decisions against the numbers), the config,
and the whole run on the embedded model (run directory, resume, refusal, report, saved checkpoint, CLI)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import cached_tiny, random_ids
from typer.testing import CliRunner

from moeaudit.cli import app
from moeaudit.errors import ConfigError, RunDirectoryError
from moeaudit.experiments import ExperimentSettings
from moeaudit.pruning import (
    IMPORTANCE_COLUMNS,
    MapConfig,
    PruneConfig,
    PruneUnit,
    build_units,
    collect_pool,
    importance_table,
    prune_geometry,
    sequence_losses,
)
from moeaudit.pruning._compare import answer_table, fold_agreement, loss_tables
from moeaudit.report._style import metric_label
from moeaudit.run._prune import prune_eval


def test_sequence_losses_are_the_models_own_loss_per_token():
    model = cached_tiny("qwen2_moe")
    seqs = [random_ids(20, seed=1), random_ids(33, seed=2)]
    losses = sequence_losses(model, seqs)
    assert losses.shape == (19 + 32,)
    with torch.no_grad():
        own = [float(model(input_ids=s[None], labels=s[None]).loss) for s in seqs]
    assert losses[:19].mean() == pytest.approx(own[0], abs=1e-5)
    assert losses[19:].mean() == pytest.approx(own[1], abs=1e-5)


def test_importance_table_against_pandas_and_statsmodels():
    import statsmodels.api as sm

    model = cached_tiny("olmoe")
    seqs = [random_ids(40, seed=s) for s in range(4)]
    settings = ExperimentSettings(n=24, seed=0, mode="reroute")
    pool = pd.concat([collect_pool(model, seqs, settings, layer) for layer in (0, 2)], ignore_index=True)
    table = importance_table(pool, [0, 2], 16)
    assert list(table.columns) == list(IMPORTANCE_COLUMNS) and len(table) == 32
    flat = pool.assign(expert=[int(e[0]) for e in pool["ablated_experts"]])
    direct = flat.groupby(["layer", "expert"])["delta"].agg(["count", "mean"])
    routed = table[~table["never_routed"]].set_index(["layer", "expert"])
    assert routed["n_routed"].sum() == len(pool) == int(direct["count"].sum())
    assert np.allclose(routed.loc[direct.index, "mean_delta"], direct["mean"], atol=1e-12)
    never = table[table["never_routed"]]
    assert (never["n_routed"] == 0).all() and never["mean_delta"].isna().all()
    layer, expert = routed["n_docs"].idxmax()
    part = flat[(flat["layer"] == layer) & (flat["expert"] == expert)]
    fit = sm.OLS(part["delta"].to_numpy(), np.ones(len(part))).fit(cov_type="cluster",
                                                                   cov_kwds={"groups": part["seq_id"]})
    assert routed.loc[(layer, expert), "se"] == pytest.approx(float(fit.bse[0]), rel=1e-9)
    assert routed.loc[(layer, expert), "share_hurts"] == pytest.approx(float((part["delta"] > 0).mean()))


def test_units_cover_every_criterion_fraction_seed_and_layer():
    model = cached_tiny("mixtral")
    geometry = prune_geometry(model)
    layers = geometry.moe_layers
    metrics = pd.DataFrame({"layer": np.repeat(layers, 8), "expert": np.tile(np.arange(8), len(layers)),
                            "m": np.tile(np.arange(8.0), len(layers))})
    units = build_units(["m", "random"], [0.25, 0.5], random_seeds=3, seed=10, geometry=geometry, layers=layers,
                        metrics=metrics, importance=None, per_layer=True)
    everywhere = [u for u in units if u.layer is None]
    assert len(everywhere) == 1 + 2 * (1 + 3)
    assert len(units) - len(everywhere) == 2 * 4 * len(layers)
    by_m = next(u for u in everywhere if u.criterion == "m" and u.fraction == 0.5)
    assert all(experts == (0, 1, 2, 3) for _, experts in by_m.removed), "the lowest values are removed"
    seeds = {u.seed for u in everywhere if u.criterion == "random"}
    assert seeds == {10, 11, 12}
    one = next(u for u in units if u.criterion == "m" and u.fraction == 0.5 and u.layer == layers[-1])
    assert one.removal == {layers[-1]: by_m.removal[layers[-1]]}
    assert len({u.key for u in units}) == len(units), "distinct removals have distinct keys"


def _synthetic(shift_a: float, n_docs: int = 30, seeds: int = 20, seed: int = 0, folds: int = 2):
    """Per-token losses of criterion 'a' (shifted), a causal reference and random seeds, with document effects and
    right-skewed seed effects, split into ``folds`` folds of documents."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(20, 60, n_docs)
    doc_of = np.repeat(np.arange(n_docs), sizes)
    base_all = 2.0 + rng.normal(0, 0.5, n_docs)[doc_of] + rng.normal(0, 0.3, doc_of.size)
    seed_effects = 0.5 + rng.lognormal(-2.5, 0.8, seeds)
    fold_of_doc = np.arange(n_docs) % folds
    units, losses, eval_docs = [], {}, {}
    for fold in range(folds):
        mask = fold_of_doc[doc_of] == fold
        docs, base = doc_of[mask], base_all[mask]
        eval_docs[fold] = docs

        def add(criterion, s, values, removed, fold=fold):
            unit = PruneUnit(criterion, 0.25, s, None, removed, fold)
            units.append(unit)
            losses[unit.loss_key] = values

        add("none", 0, base, ())
        for s in range(seeds):
            add("random", s, base + seed_effects[s] + rng.normal(0, 0.05, docs.size), ((0, (s, 100)),))
        add("causal", 0, base + 0.5 + rng.normal(0, 0.05, docs.size), ((0, (1, 2)),))
        add("a", 0, base + 0.5 + shift_a + rng.normal(0, 0.05, docs.size), ((0, (3, 4)),))
    return units, losses, eval_docs


def test_decisions_follow_the_numbers_and_share_is_a_count_from_prune_csv():
    units, losses, eval_docs = _synthetic(-0.4)
    answer = answer_table(units, losses, eval_docs, n_perm=2000, n_boot=200).set_index("criterion")
    a = answer.loc["a"]
    assert a["decision_random"] == "better" and a["decision_causal"] == "better" and a["delta_causal"] < 0
    # independent: pool prune.csv over folds by hand and count the random prunings at least as good
    prune, _ = loss_tables(units, losses)
    prune["total"] = prune["mean_loss"] * prune["n_tokens"]
    pooled = prune.groupby(["criterion", "seed"])[["total", "n_tokens"]].sum()
    pooled = pooled["total"] / pooled["n_tokens"]
    for name in ("a", "causal"):
        count = int((pooled.loc["random"] <= pooled.loc[(name, 0)]).sum())
        assert answer.loc[name, "share_random_better"] == pytest.approx(count / 20)
        assert answer.loc[name, "mean_loss"] == pytest.approx(pooled.loc[(name, 0)], abs=1e-12)
    assert a["delta_causal"] == pytest.approx(pooled.loc[("a", 0)] - pooled.loc[("causal", 0)], abs=1e-12)
    assert answer.loc["random", "mean_loss"] == pytest.approx(float(np.median(pooled.loc["random"])), abs=1e-12)
    units, losses, eval_docs = _synthetic(0.0, seed=3)
    same = answer_table(units, losses, eval_docs, n_perm=2000, n_boot=200).set_index("criterion").loc["a"]
    assert same["decision_causal"] == "inconclusive" and same["group"] == 1


def test_fold_agreement_and_recommendation_sentences():
    from moeaudit.report._prune_answer import recommendations, verdict

    units, losses, eval_docs = _synthetic(-0.4)
    answer = answer_table(units, losses, eval_docs, n_perm=500, n_boot=200)
    prune, _ = loss_tables(units, losses)
    agreement = fold_agreement(prune, answer)
    row = agreement.iloc[0]
    assert row["best"] == "a" and row["best_per_fold"] == "a,a" and row["holds_vs_random"]
    (text,) = recommendations(answer, None, 0.05)
    a = answer.set_index("criterion").loc["a"]
    assert text.startswith(f"At f = 0.25: {metric_label('a')} ({a['mean_loss']:.3f} nats), δ = "
                           f"{a['delta_causal']:+.3f}")
    assert "beating 100% [" in text and "(better than random)" in text
    sentences = verdict(answer, agreement, prune, 0.05)
    assert len(sentences) <= 10 and any("2 of 2 at f = 0.25" in s for s in sentences)


def test_prune_config_refuses_bad_values_and_round_trips(tmp_path):
    for values, fragment in [({"fractions": [0.0, 0.5]}, r"not in \(0, 1\)"), ({"fractions": [0.5, 0.5]}, "repeat"),
                             ({"random_seeds": 1}, "at least 2"), ({"n_docs_eval": 1}, "at least 2"),
                             ({"alpha": 1.5}, "alpha"), ({"criteria": []}, "criteria= is empty"),
                             ({"mode": "rerout"}, "Did you mean 'reroute'"), ({"fraction": 0.5}, "'fractions'"),
                             ({"lm_eval_include": "x"}, "lm_eval_tasks= is empty")]:
        with pytest.raises(ConfigError, match=fragment):
            PruneConfig.from_mapping(values)
    for name, cfg in PruneConfig._PRESETS.items():
        path = tmp_path / f"{name}.toml"
        path.write_text(cfg.to_toml())
        assert PruneConfig.from_toml(path) == cfg
    assert PruneConfig.from_mapping({"fractions": "0.1, 0.3", "criteria": "reap,random"}).fractions == (0.1, 0.3)
    assert PruneConfig.preset("demo").map_config() == MapConfig.preset("demo").replace(n=None)


SMALL = dict(model="builtin:tiny-moe", corpus="builtin", n_docs=4, n_docs_eval=4, max_length=64, n=8,
             criteria=("reap", "causal", "random"), fractions=(0.25, 0.5), random_seeds=2, n_boot=50, n_perm=200,
             dtype="float32", device="cpu")


@pytest.mark.slow
def test_prune_eval_end_to_end_resumes_refuses_and_saves(tmp_path):
    from moeaudit import load_model
    from moeaudit.builtin import builtin_labelled_documents

    config = PruneConfig(**SMALL, allocation=("uniform", "causal"))
    out, saved = tmp_path / "run", tmp_path / "pruned"
    result = prune_eval(config, out, save_pruned=saved, save_criterion="reap", save_fraction=0.5)
    for name in ("prune.csv", "answer.csv", "fold_agreement.csv", "allocation.csv", "pruned.parquet",
                 "eval_tokens.parquet", "importance.parquet", "splits.json", "report.md", "report.html",
                 "figures/perplexity.png", "figures/importance.png", "figures/answer.png"):
        assert (out / name).is_file(), name
    prune = pd.read_csv(out / "prune.csv")
    keys = ["criterion", "fraction", "seed", "fold", "allocation", "method"]
    assert len(prune) == 2 * (1 + 2 * 2 * (2 + 2)) and not prune.duplicated(keys).any()
    assert set(prune.columns) >= {*keys, "n_tokens", "mean_loss", "perplexity"}
    assert set(prune.loc[prune["criterion"] != "none", "method"]) == {"delete"}
    assert set(prune.loc[prune["criterion"] == "none", "method"]) == {"none"}  # the unpruned model removes nothing
    # splits: disjoint within a fold, every document evaluated once, every builtin domain in both splits
    splits = json.loads((out / "splits.json").read_text())
    domains = [d for d, _ in builtin_labelled_documents("heldout")]
    evaluated = [d for f in splits["folds"] for d in f["evaluation"]]
    assert len(splits["folds"]) == 2 and len(evaluated) == len(set(evaluated)) == 8
    for f in splits["folds"]:
        assert not set(f["calibration"]) & set(f["evaluation"])
        assert {domains[d] for d in f["calibration"]} == {domains[d] for d in f["evaluation"]} == set(domains)
    tokens = pd.read_parquet(out / "eval_tokens.parquet")
    assert sorted(tokens["doc_id"]) == sorted(evaluated)
    for f in splits["folds"]:
        mine = tokens[tokens["fold"] == f["fold"]]
        assert sorted(mine["doc_id"]) == f["evaluation"]
        n_tok = int(sum(len(t) - 1 for t in mine["input_ids"]))
        assert (prune.loc[prune["fold"] == f["fold"], "n_tokens"] == n_tok).all()
    # pruned.parquet: every removed expert; equal totals across allocations
    pruned_rows = pd.read_parquet(out / "pruned.parquet")
    totals = pruned_rows.groupby(keys).size()
    assert set(totals.xs(0.5, level="fraction")) == {64} and set(totals.xs(0.25, level="fraction")) == {32}
    # the removal costs from the fold's own pool records (brute force) and the causal ranking uses them
    importance = pd.read_parquet(out / "importance.parquet")
    records = pd.concat([pd.read_parquet(p) for p in sorted((out / "fold1" / "records").iterdir())])
    records = records[records["experiment"] == "pool"]
    mine = importance[importance["fold"] == 1].set_index(["layer", "expert"])
    for (layer, expert), row in mine.sample(10, random_state=0).iterrows():
        at = records[records["layer"] == layer]
        n_pos = len(at[["seq_id", "position"]].drop_duplicates())
        hit = at[[e[0] == expert for e in at["ablated_experts"]]]
        assert row["removal_cost"] == pytest.approx(hit["delta"].sum() / n_pos, abs=1e-12)
    causal = pruned_rows[(pruned_rows["criterion"] == "causal") & (pruned_rows["fold"] == 1)
                         & (pruned_rows["fraction"] == 0.25) & (pruned_rows["allocation"] == "uniform")]
    for layer, g in causal.groupby("layer"):
        assert set(g["expert"]) == set(mine.loc[layer]["removal_cost"].nsmallest(4).index)
    # the saved checkpoint (experts really deleted) reproduces the in-memory pruned loss of fold 0
    reap = pruned_rows[(pruned_rows["criterion"] == "reap") & (pruned_rows["fraction"] == 0.5)
                       & (pruned_rows["fold"] == 0) & (pruned_rows["allocation"] == "uniform")]
    assert len(reap) == 8 * 8  # 8 of 16 experts at each of 8 layers
    model, tokenizer = load_model(saved, dtype="float32")
    assert model.config.num_experts == 8
    removed = {layer: tuple(g["expert"]) for layer, g in reap.groupby("layer")}
    ids = [torch.tensor(t) for t in tokens[tokens["fold"] == 0]["input_ids"]]
    on_disk = sequence_losses(model, ids)
    in_memory, _ = load_model("builtin:tiny-moe", dtype="float32")
    assert np.allclose(on_disk, sequence_losses(in_memory, ids, removed), atol=1e-5)
    row = prune[(prune["criterion"] == "reap") & (prune["fraction"] == 0.5) & (prune["fold"] == 0)
                & (prune["allocation"] == "uniform")].iloc[0]
    assert row["mean_loss"] == pytest.approx(float(on_disk.mean()), abs=1e-6)
    answer = pd.read_csv(out / "answer.csv")
    assert len(answer) == 2 * 2 * 3 and not answer.duplicated(["criterion", "fraction", "allocation", "method"]).any()
    report = (out / "report.md").read_text()
    assert "## Recommendation" in report and "At f = 0.25:" in report and "figures/answer.png" in report
    # a second run resumes every unit and reproduces the tables; another configuration is refused
    stored = [*(out / "losses").iterdir(), *(out / "fold0" / "records").iterdir()]
    before = {p: p.stat().st_mtime_ns for p in stored}
    again = prune_eval(config, out, report=False)
    assert {p: p.stat().st_mtime_ns for p in stored} == before
    pd.testing.assert_frame_equal(again.tests, result.tests)
    with pytest.raises(RunDirectoryError, match="different configuration"):
        prune_eval(dataclasses.replace(config, fractions=(0.25,)), out)
    with pytest.raises(ConfigError, match="one expert count"):
        prune_eval(dataclasses.replace(config, allocation=("causal",)), tmp_path / "refused",
                   save_pruned=tmp_path / "x", save_criterion="reap", save_fraction=0.5)
    assert not (tmp_path / "refused").exists()


runner = CliRunner()


@pytest.mark.slow
def test_cli_map_and_prune_eval(tmp_path):
    args = ["--n-docs", "3", "--max-length", "48", "--n", "6", "--layers", "0,7", "--dtype", "float32",
            "--device", "cpu"]
    result = runner.invoke(app, ["map", "demo", *args, "--out", str(tmp_path / "map")])
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(tmp_path / "map" / "importance.parquet")
    assert sorted(table["layer"].unique()) == [0, 7] and len(table) == 32
    assert (tmp_path / "map" / "report.html").is_file()
    result = runner.invoke(app, ["prune-eval", "demo", *args, "--n-docs-eval", "3", "--criteria",
                                 "utilization_rate,random", "--fractions", "0.25", "--random-seeds", "2",
                                 "--per-layer", "--n-boot", "40", "--out", str(tmp_path / "prune")])
    assert result.exit_code == 0, result.output
    per_layer = pd.read_csv(tmp_path / "prune" / "per_layer.csv")
    assert set(per_layer["layer"]) == {0, 7} and set(per_layer["criterion"]) == {"utilization_rate", "random"}
    bad = runner.invoke(app, ["prune-eval", "demo", *args, "--criteria", "reapp", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "Did you mean 'reap'" in bad.output and not (tmp_path / "x").exists()
    bad = runner.invoke(app, ["prune-eval", "demo", *args, "--fractions", "0.01", "--out", str(tmp_path / "y")])
    assert bad.exit_code == 2 and "removes no expert" in bad.output and not (tmp_path / "y").exists()


def test_every_config_key_has_a_flag():
    for command, cls in (("map", MapConfig), ("prune-eval", PruneConfig)):
        result = runner.invoke(app, [command, "--help"], terminal_width=200, env={"COLUMNS": "200"})
        for f in dataclasses.fields(cls):
            assert f"--{f.name.replace('_', '-')}" in result.output, (command, f.name)


@pytest.mark.slow
def test_prune_eval_with_layers_offloaded_to_disk_equals_the_plain_run(tmp_path):
    """prune-eval (importance map, observe criteria, in-memory pruning, held-out losses) on a model whose layers 1
    and 7 accelerate keeps on disk gives the plain run's numbers; saving a sliced checkpoint needs the whole model
    and is refused before any work."""
    pytest.importorskip("accelerate", reason="accelerate is not installed (pip install accelerate)")
    layers = {f"model.layers.{i}": "disk" if i in (1, 7) else "cpu" for i in range(8)}
    (tmp_path / "map.json").write_text(json.dumps({"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", **layers,
                                                   "model.norm": "cpu", "lm_head": "cpu"}))
    config = PruneConfig(**{**SMALL, "device": "auto"})
    plain = prune_eval(config, tmp_path / "plain", report=False)
    spread_config = dataclasses.replace(config, device_map=str(tmp_path / "map.json"))
    spread = prune_eval(spread_config, tmp_path / "spread", report=False)
    pd.testing.assert_frame_equal(spread.pruned, plain.pruned)
    assert np.allclose(spread.prune["mean_loss"], plain.prune["mean_loss"], atol=1e-5)
    assert np.allclose(spread.importance["mean_delta"], plain.importance["mean_delta"], atol=1e-5, equal_nan=True)
    session = json.loads((tmp_path / "spread" / "manifest.json").read_text())["sessions"][-1]
    assert session["device_map"]["model.layers.7"] == "disk"
    with pytest.raises(ConfigError, match="--save-pruned slices the checkpoint from the loaded model"):
        prune_eval(spread_config, tmp_path / "refused", save_pruned=tmp_path / "out", save_criterion="reap",
                   save_fraction=0.5)
    assert not (tmp_path / "refused").exists()


def test_allocation_table_is_the_pooled_difference_with_uniform():
    from moeaudit.pruning._compare import allocation_table

    units, losses, eval_docs = _synthetic(-0.4, seeds=3)
    extra = []
    for u in [u for u in units if u.criterion in ("a", "random")]:
        other = dataclasses.replace(u, allocation="causal", removed=((1, (u.seed, 7)),))
        losses[other.loss_key] = losses[u.loss_key] - 0.05 - 0.01 * u.fold
        extra.append(other)
    table = allocation_table(units + extra, losses, eval_docs, n_perm=200, n_boot=200)
    assert list(table["criterion"]) == ["a"] and table["allocation"].item() == "causal"
    tokens = {f: d.size for f, d in eval_docs.items()}
    expected = -(0.05 * tokens[0] + 0.06 * tokens[1]) / (tokens[0] + tokens[1])
    assert table["delta_uniform"].item() == pytest.approx(expected, abs=1e-12)
    assert table["delta_uniform_high"].item() < 0
