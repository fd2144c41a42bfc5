"""The paper's published headline results, and a generated comparison for runs of the paper's checkpoints.

Source: *From Observation to Intervention: A Causal Audit of Expert Importance in MoE Models* (Section 3 and
Appendix A; the numbers restored in ``PAPER-NOTES.md``). Only headline claims survive the paper's text extraction, so
the comparison checks those: no Bonferroni-significant audit cell, |d| below 0.17 everywhere, and the routing-weight
control significant only at OLMoE's last MoE layer (d = +0.231, p = 0.0013).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd


@dataclass(frozen=True)
class Published:
    name: str
    layers: tuple[int, ...]
    max_abs_d: float  # every audit cell had |d| below this
    control_significant: dict[int, float]  # layer -> d of the significant control cells
    precision: str


PUBLISHED: dict[str, Published] = {
    "allenai/OLMoE-1B-7B-0924": Published("OLMoE-1B-7B-0924", (0, 4, 7, 11, 15), 0.17, {15: 0.231}, "float32"),
    "Qwen/Qwen1.5-MoE-A2.7B": Published("Qwen1.5-MoE-A2.7B", (0, 6, 12, 18, 23), 0.17, {}, "bfloat16"),
    "deepseek-ai/DeepSeek-V2-Lite": Published("DeepSeek-V2-Lite", (1, 7, 13, 20, 26), 0.17, {}, "float16"),
}


#: The summary column holding the paper's decision rule (unclustered, direction-blind), so like is compared with like.
_PAPER_RULE = "significant_paper_rule"


def _published_for(model: str) -> Published | None:
    if model in PUBLISHED:
        return PUBLISHED[model]
    tail = model.rstrip("/").split("/")[-1]  # a local copy of the checkpoint keeps its directory name
    return next((p for key, p in PUBLISHED.items() if key.split("/")[-1] == tail), None)


def comparison(model: str, tables: dict[str, pd.DataFrame], dtype: str | None) -> str | None:
    """A paragraph comparing this run's headline numbers with the paper's, or ``None`` for other models."""
    paper = _published_for(model)
    if paper is None:
        return None
    audit, control = tables.get("audit"), tables.get("control")
    parts = [f"**Against the paper ({paper.name}).** By the paper's own rule (t-test and Wilcoxon on positions, "
             "both Bonferroni-significant):"]
    if audit is not None and len(audit):
        n_sig = int(audit[_PAPER_RULE].sum())
        max_d = float(audit["cohens_d"].abs().max())
        same = n_sig == 0 and max_d < paper.max_abs_d
        parts.append(f"The paper found no Bonferroni-significant audit cell and |d| < {paper.max_abs_d} in every cell; "
                     f"this run has {n_sig} significant cell{'s' if n_sig != 1 else ''} and max |d| = {max_d:.3f} "
                     f"({'consistent' if same else 'different'}).")
    if control is not None and len(control):
        sig = control[control[_PAPER_RULE].astype(bool)]
        found = {int(r["layer"]): float(r["cohens_d"]) for _, r in sig.iterrows()}
        expected = ", ".join(f"L{k} (d = {v:+.3f})" for k, v in paper.control_significant.items()) or "none"
        got = ", ".join(f"L{k} (d = {v:+.3f})" for k, v in found.items()) or "none"
        same = set(found) == set(paper.control_significant)
        parts.append(f"Significant routing-weight control cells: paper {expected}; this run {got} "
                     f"({'consistent' if same else 'different'}).")
    tested = sorted(set(audit["layer"]) if audit is not None and len(audit) else set())
    if tested and tuple(tested) != paper.layers:
        parts.append(f"This run tested layers {', '.join(f'L{x}' for x in tested)}, the paper "
                     f"{', '.join(f'L{x}' for x in paper.layers)}.")
    if dtype and dtype != paper.precision:
        parts.append(f"The paper ran this model in {paper.precision}; this run in {dtype}.")
    return " ".join(parts) if len(parts) > 1 else None
