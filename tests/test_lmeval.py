"""lm-evaluation-harness scores of pruned models, in memory: a local task (YAML + JSONL data files) scored through
lm-eval's HF wrapper on the pruned embedded model equals the same quantity computed by plain forwards of a
checkpoint with the experts deleted, for a loglikelihood task and a multiple-choice one; prune-eval writes the
scores of every pruned model to lm_eval.csv, the per-item values to lm_eval_items/<task>.parquet (the aggregates
recomputed from them by hand) and the paired item-level statistics to lm_eval_answer.csv and answer.csv."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'moeaudit[lmeval]')")

from moeaudit import load_model  # noqa: E402
from moeaudit.pruning import PruneConfig, plan_removal, prune_geometry, slice_experts  # noqa: E402
from moeaudit.pruning._lmeval import lm_eval_scores  # noqa: E402
from moeaudit.run._prune import prune_eval  # noqa: E402

# contexts end without whitespace: lm-eval moves trailing spaces of a context into its continuation
DOCS = [("def add(a, b):\n    return", " a + b"), ("The capital of France is", " Paris"),
        ("2 + 2 =", " 4"), ("for i in range(10):", "\n    print(i)"), ("Hello, my name", " is Ada"),
        ("import os\nimport", " sys"), ("The quick brown fox", " jumps over"), ("x = [1, 2,", " 3]")]

MC = [{"question": q, "choices": c, "label": label} for q, c, label in [
    ("2 + 2 =", [" 4", " 5", " 22"], 0), ("The capital of France is", [" Rome", " Paris"], 1),
    ("def f(x):\n    return", [" x", " +", " ]"], 0), ("for i in range(10):", ["\n    print(i)", " fox"], 0),
    ("import os\nimport", [" sys", " the"], 0), ("Hello, my name", [" is", " 7"], 0),
    ("The quick brown", [" fox", " 3.5"], 0), ("x = [1, 2,", [" 3]", " cat"], 0)]]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    data = root / "tiny.jsonl"
    data.write_text("".join(json.dumps({"context": c, "continuation": t}) + "\n" for c, t in DOCS))
    (root / "tiny_ll.yaml").write_text(
        "task: moeaudit_tiny_ll\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: loglikelihood\ndoc_to_text: \"{{{{context}}}}\"\n"
        "doc_to_target: \"{{continuation}}\"\ntarget_delimiter: \"\"\nmetric_list:\n  - metric: perplexity\n"
        "    aggregation: perplexity\n    higher_is_better: false\n")
    mc = root / "mc.jsonl"
    mc.write_text("".join(json.dumps(item) + "\n" for item in MC))
    (root / "tiny_mc.yaml").write_text(
        "task: moeaudit_tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {mc}\ntest_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{{{question}}}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\ntarget_delimiter: \"\"\nmetric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return root


@torch.no_grad()
def _mc_correct(model, tokenizer) -> np.ndarray:
    """Per item: 1 when the labelled choice has the highest summed log-likelihood after the question, by plain
    forwards."""
    out = []
    for item in MC:
        start = len(tokenizer.encode(item["question"]))
        lls = []
        for choice in item["choices"]:
            whole = tokenizer.encode(item["question"] + choice)
            logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), dim=-1)
            lls.append(sum(float(logp[i - 1, whole[i]]) for i in range(start, len(whole))))
        out.append(float(int(np.argmax(lls)) == item["label"]))
    return np.array(out)


@torch.no_grad()
def _perplexity(model, tokenizer) -> float:
    """exp(-mean over documents of the continuation's summed log-likelihood), by plain forwards."""
    total = []
    for context, continuation in DOCS:
        whole = tokenizer.encode(context + continuation)
        start = len(tokenizer.encode(context))
        logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), dim=-1)
        total.append(sum(float(logp[i - 1, whole[i]]) for i in range(start, len(whole))))
    return math.exp(-float(np.mean(total)))


def test_in_memory_pruned_scores_equal_the_sliced_checkpoint(task_dir):
    model, tokenizer = load_model("builtin:tiny-moe", dtype="float32")
    geometry = prune_geometry(model)
    rng = np.random.default_rng(0)
    removal = plan_removal({layer: rng.random(16) for layer in geometry.moe_layers}, 0.5, geometry, seed=0)
    rows = lm_eval_scores(model, tokenizer, ["moeaudit_tiny_ll"], removal=removal, include=str(task_dir),
                          bootstrap_iters=10)
    pruned_ppl = next(r["value"] for r in rows if r["metric"] == "perplexity")
    clean = next(r["value"] for r in lm_eval_scores(model, tokenizer, ["moeaudit_tiny_ll"], include=str(task_dir),
                                                    bootstrap_iters=10) if r["metric"] == "perplexity")
    assert clean == pytest.approx(_perplexity(model, tokenizer), rel=1e-5)
    assert pruned_ppl == pytest.approx(_perplexity(slice_experts(model, removal), tokenizer), rel=1e-5)
    assert abs(pruned_ppl - clean) > 1e-3 * clean, "pruning must change the score for the test to bite"


def test_prune_eval_writes_lm_eval_scores_per_pruned_model(task_dir, tmp_path):
    config = PruneConfig(model="builtin:tiny-moe", n_docs=3, n_docs_eval=3, max_length=48, criteria=("reap",),
                         fractions=(0.25,), lm_eval_tasks=("moeaudit_tiny_ll",), lm_eval_include=str(task_dir),
                         n_boot=40, n_perm=100, dtype="float32", device="cpu")
    result = prune_eval(config, tmp_path / "run", report=False)
    table = pd.read_csv(tmp_path / "run" / "lm_eval.csv")
    assert set(table["criterion"]) == {"none", "reap"} and set(table["task"]) == {"moeaudit_tiny_ll"}
    assert len(result.lm_eval) == len(table) == 4  # (unpruned, reap) x 2 folds
    assert set(table["fold"]) == {0, 1} and set(table["allocation"]) == {"uniform"}
    with pytest.raises(ValueError, match="is not a directory"):
        prune_eval(config.replace(lm_eval_include=str(tmp_path / "nowhere")), tmp_path / "other")
    assert not (tmp_path / "other").exists()


@pytest.mark.slow
def test_mean_replacement_rows_are_left_out_of_lm_eval(task_dir, tmp_path):
    """--method delete,mean with lm-eval: only the deletions (and the unpruned model) are scored; answer.csv keeps
    its mean rows, without downstream scores."""
    config = PruneConfig(model="builtin:tiny-moe", n_docs=3, n_docs_eval=3, max_length=48, criteria=("reap",),
                         fractions=(0.25,), method=("delete", "mean"), lm_eval_tasks=("moeaudit_tiny_ll",),
                         lm_eval_include=str(task_dir), n_boot=40, n_perm=100, dtype="float32", device="cpu")
    run = tmp_path / "run"
    result = prune_eval(config, run, report=False)
    scores = pd.read_csv(run / "lm_eval.csv")
    items = pd.read_parquet(run / "lm_eval_items" / "moeaudit_tiny_ll.parquet")
    lm = pd.read_csv(run / "lm_eval_answer.csv")
    assert set(scores["method"]) == set(items["method"]) == {"none", "delete"}
    assert set(lm.loc[lm["criterion"] != "none", "method"]) == {"delete"}
    assert len(scores) == 4 and len(items) == len(DOCS) * 4  # (unpruned, reap delete) x 2 folds
    answer = pd.read_csv(run / "answer.csv").set_index("method")
    column = next(c for c in answer.columns if c.startswith("lm_eval:moeaudit_tiny_ll:"))
    reap = lm[lm["criterion"] == "reap"].iloc[0]
    assert answer.loc["delete", column] == pytest.approx(reap["score"]) and pd.isna(answer.loc["mean", column])
    assert result.methods is not None and len(result.methods) == 1
    assert not any(p.name.count("mean") for p in (run / "lm_eval").iterdir())


def test_multiple_choice_items_equal_plain_forwards_of_the_sliced_checkpoint(task_dir):
    from moeaudit.pruning._lmeval import lm_eval_run

    model, tokenizer = load_model("builtin:tiny-moe", dtype="float32")
    geometry = prune_geometry(model)
    rng = np.random.default_rng(1)
    removal = plan_removal({layer: rng.random(16) for layer in geometry.moe_layers}, 0.5, geometry, seed=0)
    rows, items = lm_eval_run(model, tokenizer, ["moeaudit_tiny_mc", "moeaudit_tiny_ll"], removal=removal,
                              include=str(task_dir), bootstrap_iters=10)
    acc = items[(items["task"] == "moeaudit_tiny_mc") & (items["metric"] == "acc")].sort_values("item")
    expected = _mc_correct(slice_experts(model, removal), tokenizer)
    assert acc["value"].to_numpy() == pytest.approx(expected, abs=0)
    assert next(r["value"] for r in rows if r["task"] == "moeaudit_tiny_mc" and r["metric"] == "acc") == \
        pytest.approx(expected.mean(), abs=1e-12)
    ll = items[items["task"] == "moeaudit_tiny_ll"]
    assert bool(ll["higher_is_better"].all()) and len(ll) == len(DOCS)
    ppl = next(r["value"] for r in rows if r["task"] == "moeaudit_tiny_ll" and r["metric"] == "perplexity")
    assert ppl == pytest.approx(math.exp(-ll["value"].mean()), rel=1e-9)


@pytest.mark.slow
def test_prune_eval_item_files_and_paired_answer(task_dir, tmp_path):
    config = PruneConfig(model="builtin:tiny-moe", n_docs=3, n_docs_eval=3, max_length=48,
                         criteria=("reap", "causal", "random"), random_seeds=3, fractions=(0.5,), n=60,
                         lm_eval_tasks=("moeaudit_tiny_ll", "moeaudit_tiny_mc"), lm_eval_include=str(task_dir),
                         n_boot=50, n_perm=200, dtype="float32", device="cpu")
    run = tmp_path / "run"
    result = prune_eval(config, run, report=False)
    scores = pd.read_csv(run / "lm_eval.csv")
    mc = pd.read_parquet(run / "lm_eval_items" / "moeaudit_tiny_mc.parquet")
    ll = pd.read_parquet(run / "lm_eval_items" / "moeaudit_tiny_ll.parquet")
    assert len(mc) == len(MC) * scores[scores["task"] == "moeaudit_tiny_mc"].shape[0]
    for frame, task, metric, agg in ((mc, "moeaudit_tiny_mc", "acc", np.mean),
                                     (ll, "moeaudit_tiny_ll", "perplexity", lambda v: math.exp(-np.mean(v)))):
        for _key, part in frame.groupby("key"):
            unit = part.iloc[0]
            row = scores[(scores["task"] == task) & (scores["metric"] == metric)
                         & (scores["criterion"] == unit["criterion"]) & (scores["fold"] == unit["fold"])
                         & (scores["seed"] == unit["seed"])]
            assert row["value"].iloc[0] == pytest.approx(agg(part[metric].to_numpy()), rel=1e-9)
    lm = pd.read_csv(run / "lm_eval_answer.csv")
    reap = lm[(lm["task"] == "moeaudit_tiny_mc") & (lm["criterion"] == "reap")].iloc[0]
    by_hand = mc[mc["criterion"] == "reap"].groupby("item")["acc"].mean()  # folds averaged per item
    assert reap["score"] == pytest.approx(by_hand.mean(), abs=1e-12) and reap["n_folds"] == 2
    clean = mc[mc["criterion"] == "none"].groupby("item")["acc"].mean()
    assert reap["delta_unpruned"] == pytest.approx(by_hand.mean() - clean.mean(), abs=1e-12)
    rand = mc[mc["criterion"] == "random"].groupby(["seed", "item"])["acc"].mean().groupby("seed").mean()
    assert reap["share_random_better"] == pytest.approx(np.mean(rand >= by_hand.mean()), abs=1e-12)
    answer = pd.read_csv(run / "answer.csv")
    assert answer.set_index("criterion").loc["reap", "lm_eval:moeaudit_tiny_mc:acc"] == pytest.approx(reap["score"])
    assert {"decision_unpruned", "decision_causal", "decision_random"} <= set(lm.columns)
    assert result.lm_eval_answer is not None
    from moeaudit.report._prune import write_prune_report

    write_prune_report(run)
    text = (run / "report.md").read_text()
    assert "downstream: moeaudit_tiny_ll mean item log-likelihood" in text and "moeaudit_tiny_mc acc 0." in text
    assert "paired item by item" in text
