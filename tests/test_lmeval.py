"""lm-evaluation-harness scores of pruned models, in memory: a local task (YAML + JSONL data files) scored through
lm-eval's HF wrapper on the pruned embedded model equals the same quantity computed by plain forwards of a
checkpoint with the experts deleted; prune-eval writes the scores of every pruned model to lm_eval.csv."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'moeaudit[lmeval]')")

from moeaudit import load_model  # noqa: E402
from moeaudit.pruning import PruneConfig, plan_removal, prune_eval, prune_geometry, slice_experts  # noqa: E402
from moeaudit.pruning._lmeval import lm_eval_scores  # noqa: E402

# contexts end without whitespace: lm-eval moves trailing spaces of a context into its continuation
DOCS = [("def add(a, b):\n    return", " a + b"), ("The capital of France is", " Paris"),
        ("2 + 2 =", " 4"), ("for i in range(10):", "\n    print(i)"), ("Hello, my name", " is Ada"),
        ("import os\nimport", " sys"), ("The quick brown fox", " jumps over"), ("x = [1, 2,", " 3]")]


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
    return root


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
