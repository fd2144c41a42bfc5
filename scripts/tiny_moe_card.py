"""The model card (README.md) of an embedded checkpoint trained by ``train_tiny_moe.py``, written from its
eval.json and training_log.csv (``train_tiny_moe.py --card-only`` rewrites it alone)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

#: Per family: (embedded name, transformers class, what its router does with the top-k weights).
FAMILY_FACTS = {
    "olmoe": ("tiny-moe", "OlmoeForCausalLM", "OLMoE", "`norm_topk_prob=False`"),
    "mixtral": ("tiny-mixtral", "MixtralForCausalLM", "Mixtral", "always renormalised over the k, as Mixtral does"),
}


def write_model_card(out: Path, ev: dict) -> None:
    a = ev["args"]
    name, cls, family, norm = FAMILY_FACTS[a.get("family", "olmoe")]
    tr = ev["trained"]
    rs = ev["trained_routing_summary"]
    rr = ev["random_init_same_config"]["routing_summary"]
    c = ev["corpus"]
    files = sorted(p for p in out.iterdir() if p.is_file() and p.name != "README.md")
    size_mb = sum(p.stat().st_size for p in files) / 1e6
    rows = "\n".join(
        f"| {L['layer']} | {L['min_fraction']:.4f} | {L['max_fraction']:.4f} | {L['cv']:.3f} | {L['normalised_entropy']:.3f} "
        f"| {L['mean_router_entropy_normalised']:.3f} | {L['domain_expert_mi_normalised']:.3f} "
        f"| {', '.join(f'{d}:{e}' for d, e in L['most_used_expert_by_domain'].items())} |"
        for L in tr["routing"]
    )
    dom_rows = "\n".join(
        f"| {split} | {d} | {v['documents']} | {v['characters']:,} | {v['tokens']:,} |"
        for split in ("train", "heldout")
        for d, v in c[split]["per_domain"].items()
    )
    with open(out / "training_log.csv", newline="") as fh:
        log = list(csv.DictReader(fh))
    curve = "\n".join(
        f"| {r['step']} | {r['lm_loss']} | {r['aux_loss']} | {r['heldout_ce']} | {r['elapsed_s']} |"
        for r in log
        if r["heldout_ce"] or r["step"] in ("0", "50")
    )

    def fmt(d: dict, k: str) -> str:
        return f"{d[k]['mean']:.3f} (min {d[k]['min']:.3f}, max {d[k]['max']:.3f})"

    text = f"""# {name}: an embedded demo/test checkpoint of moeaudit (`builtin:{name}`)

A ~{ev["parameters"] / 1e6:.1f}M-parameter **{family}-architecture** (`{cls}`) causal language model trained from
scratch on CPU on the deterministic built-in corpus (`moeaudit.builtin.corpus`). It exists so that moeaudit's
audit runs end to end offline in minutes and so that the test suite has a model whose routing was *learned*.

**Intended use: demos and tests only.** It is tiny and trained on ~{c["train"]["tokens"] / 1e6:.1f}M tokens of mostly
synthetic text; findings about its experts say nothing about large MoE language models.

## Loading

```python
import moeaudit
loaded = moeaudit.load_model("builtin:{name}")
# or, with plain transformers (no network access needed):
from transformers import AutoModelForCausalLM, AutoTokenizer
from moeaudit.builtin import builtin_model_path
path = builtin_model_path("{name}")
model = AutoModelForCausalLM.from_pretrained(path)
tokenizer = AutoTokenizer.from_pretrained(path)
```

Special tokens: `<|endoftext|>` (id {0}, eos, also used as bos; documents are encoded *without* a BOS and
terminated by it) and `<|pad|>` (id 1, pad). Maximum length 512 tokens (`max_position_embeddings` and
`model_max_length`). Weights are float32 (`model.safetensors`).

## Architecture

| field | value |
|---|---|
| architecture | `{cls}` (transformers {ev["environment"]["transformers"]}) |
| layers (all MoE) | {a["layers"]} |
| hidden size | {a["hidden_size"]} |
| attention heads (= KV heads) | {a["heads"]} |
| routed experts per layer | {a["experts"]} |
| experts per token (top-k) | {a["top_k"]} (weights {norm}) |
| shared experts | none |
| attention | full causal (no sliding window) |
| expert intermediate size | {a["intermediate_size"]} |
| vocabulary | {a["vocab_size"]} (byte-level BPE) |
| tied input/output embeddings | yes |
| router aux (load-balancing) loss coefficient | {a["aux_coef"]} |
| parameters | {ev["parameters"]:,} |
| files in this directory (excluding README) | {size_mb:.1f} MB |

## Data

The built-in corpus (see the docstring of `moeaudit/builtin/corpus.py`), built by code on the fly:
real English reference-manual text from the running Python's `pydoc_data.topics` (training split only,
because it varies between Python versions) plus four seeded generated domains (templated prose with
in-context facts and questions, small Python functions, arithmetic lines with correct results, CSV / JSON-lines
records). The held-out split is fully generated and byte-identical on CPython 3.10-3.13.
Corpus statistics for this build (Python {ev["environment"]["python"]}):

| split | domain | documents | characters | tokens (incl. one `<|endoftext|>` per doc) |
|---|---|---|---|---|
{dom_rows}

Totals: train {c["train"]["documents"]:,} documents / {c["train"]["characters"]:,} characters / {c["train"]["tokens"]:,} tokens;
held-out {c["heldout"]["documents"]} documents / {c["heldout"]["characters"]:,} characters / {c["heldout"]["tokens"]:,} tokens.

## Tokenizer

{tokenizer_text(a)}

## Training

```
{ev["command"].strip()}
```

Seed {a["seed"]}; AdamW (betas 0.9/0.95, weight decay {a["weight_decay"]} on matrices), peak LR {a["lr"]},
{a["warmup"]} warm-up steps then cosine decay to 10%; {a["steps"]} steps of {a["batch_size"]} packed sequences of
{a["seq_len"]} tokens ({a["steps"] * a["batch_size"] * a["seq_len"] / 1e6:.2f}M tokens, documents separated by
`<|endoftext|>`); gradient clipping 1.0; loss = LM cross-entropy + {a["aux_coef"]} x the model's own
load-balancing loss (`output_router_logits=True` during training, saved as `False`). Trained on
{ev["environment"]["cpu_threads"]} CPU threads ({ev["environment"]["machine"]}, shared with other jobs) in
**{ev["train_seconds"] / 60:.1f} minutes**; Python {ev["environment"]["python"]}, torch {ev["environment"]["torch"]}.
Full loss curve: `training_log.csv` (step, loss, lm_loss, aux_loss, lr, grad_norm, tokens_seen, elapsed_s,
heldout_ce on a quarter of the held-out documents). Excerpt:

| step | LM loss (train) | aux loss | held-out CE (subset) | elapsed s |
|---|---|---|---|---|
{curve}

## Held-out quality

Measured on the whole held-out split ({tr["heldout_tokens_scored"]:,} predicted tokens; each document scored
alone in windows of at most 512 tokens, targets include the final `<|endoftext|>`):

| metric | nats / token |
|---|---|
| next-token cross-entropy (this model) | **{tr["heldout_ce_nats"]:.3f}** |
| unigram entropy of the same target tokens (plug-in estimate from held-out frequencies) | {tr["heldout_unigram_entropy_nats"]:.3f} |
| reduction vs unigram entropy | **{100 * tr["ce_reduction_vs_unigram"]:.1f}%** (bar: >= 40%) |
| random-init model of the same config | {ev["random_init_same_config"]["heldout_ce_nats"]:.3f} |

## Routing (learned, not uniform)

Utilisation = fraction of the held-out (token, top-k slot) assignments that go to each expert, per layer.
"router entropy" is the mean per-token entropy of the full softmax over experts / log({a["experts"]}).
"domain MI" is the mutual information between the document's domain and the chosen expert divided by the
entropy of the utilisation.

| statistic (mean over layers) | trained | random init, same config |
|---|---|---|
| coefficient of variation of utilisation | {fmt(rs, "cv")} | {fmt(rr, "cv")} |
| min expert fraction | {fmt(rs, "min_fraction")} | {fmt(rr, "min_fraction")} |
| max expert fraction (uniform = {1 / a["experts"]:.4f}) | {fmt(rs, "max_fraction")} | {fmt(rr, "max_fraction")} |
| normalised utilisation entropy | {fmt(rs, "normalised_entropy")} | {fmt(rr, "normalised_entropy")} |
| normalised router entropy per token | {fmt(rs, "mean_router_entropy_normalised")} | {fmt(rr, "mean_router_entropy_normalised")} |
| normalised domain-expert MI | {fmt(rs, "domain_expert_mi_normalised")} | {fmt(rr, "domain_expert_mi_normalised")} |

Reading: with the load-balancing loss, aggregate utilisation has a normalised entropy of
{rs["normalised_entropy"]["mean"]:.2f} (1 = perfectly balanced) and is not uniform: the busiest expert of a layer gets on average
{rs["max_fraction"]["mean"] / (1 / a["experts"]):.1f}x its uniform share and the least used {rs["min_fraction"]["mean"] / (1 / a["experts"]):.2f}x.{unused_text(tr["routing"])}
The clearest signature that routing was *learned* is the router's confidence: a random-init router spreads
each token almost uniformly over the experts (normalised per-token entropy
{rr["mean_router_entropy_normalised"]["mean"]:.2f}) while the trained one concentrates it
({rs["mean_router_entropy_normalised"]["mean"]:.2f}, down to {rs["mean_router_entropy_normalised"]["min"]:.2f} in the sharpest layer).
Utilisation CV alone does *not* separate trained from random-init routing here (a random router on real
token embeddings is already lumpy, CV {rr["cv"]["mean"]:.2f}), nor does domain-expert mutual information (a random
router is a fixed function of the token, and domains use different tokens). Tests therefore check
non-uniform utilisation in every layer plus router entropy well below that of a random-init model
(`tests/test_builtin.py`, `tests/test_builtin_mixtral.py`).

Per layer (trained):

| layer | min frac | max frac | CV | norm. entropy | router entropy | domain MI | most used expert per domain |
|---|---|---|---|---|---|---|---|
{rows}

Per-expert fractions for every layer are in `eval.json` (`trained.routing`).

## Cost

A forward pass over the whole held-out split with the default (eager) experts implementation took
{ev["heldout_eval_seconds_eager"]:.1f} s here (one document window at a time, including routing statistics).

## Reproducing

`{ev["command"].strip()}` rewrites this directory. Results are seeded but bitwise
reproducibility is only expected with the same Python (training text), torch build and thread count.
"""
    (out / "README.md").write_text(text + comparison_text(out, ev))


def summarise(layers: list[dict]) -> dict:
    keys = ("cv", "min_fraction", "max_fraction", "normalised_entropy", "mean_router_entropy_normalised",
            "domain_expert_mi_normalised")  # fmt: skip
    return {k: {"mean": float(np.mean([L[k] for L in layers])), "min": float(np.min([L[k] for L in layers])),
                "max": float(np.max([L[k] for L in layers]))} for k in keys}  # fmt: skip


def tokenizer_text(a: dict) -> str:
    if a.get("tokenizer_from"):
        return (f"Reused unchanged from `{Path(a['tokenizer_from']).name}` (byte-identical `tokenizer.json`): a "
                f"byte-level BPE (vocab {a['vocab_size']}) trained with `tokenizers` on the training split, so both "
                "embedded models see exactly the same tokens and their losses are comparable.")
    return (f"Byte-level BPE trained with `tokenizers` on the training split (vocab {a['vocab_size']}, min frequency "
            "2), saved via `transformers.PreTrainedTokenizerFast.save_pretrained`.")


def comparison_text(out: Path, ev: dict) -> str:
    """For a checkpoint that reuses another's tokenizer: its held-out numbers beside that checkpoint's."""
    a = ev["args"]
    if not a.get("tokenizer_from"):
        return ""
    other_dir = out.parent / Path(a["tokenizer_from"]).name
    if not (other_dir / "eval.json").is_file():
        return ""
    import json

    other = json.loads((other_dir / "eval.json").read_text())
    o, t = other["args"], ev["args"]
    rows = [
        ("experts per layer, top-k", f"{t['experts']}, top-{t['top_k']}", f"{o['experts']}, top-{o['top_k']}"),
        ("expert intermediate size", t["intermediate_size"], o["intermediate_size"]),
        ("active expert units per token (top-k x intermediate)", t["top_k"] * t["intermediate_size"],
         o["top_k"] * o["intermediate_size"]),
        ("expert units per layer (experts x intermediate)", t["experts"] * t["intermediate_size"],
         o["experts"] * o["intermediate_size"]),
        ("parameters", f"{ev['parameters']:,}", f"{other['parameters']:,}"),
        ("held-out cross-entropy (nats / token)", f"{ev['trained']['heldout_ce_nats']:.3f}",
         f"{other['trained']['heldout_ce_nats']:.3f}"),
        ("reduction vs unigram entropy", f"{100 * ev['trained']['ce_reduction_vs_unigram']:.1f}%",
         f"{100 * other['trained']['ce_reduction_vs_unigram']:.1f}%"),
        ("training minutes (CPU threads)", f"{ev['train_seconds'] / 60:.1f} ({ev['environment']['cpu_threads']})",
         f"{other['train_seconds'] / 60:.1f} ({other['environment']['cpu_threads']})"),
    ]
    table = "\n".join(f"| {k} | {x} | {y} |" for k, x, y in rows)
    return f"""
## Compared with `{other_dir.name}`

Same corpus, tokenizer, depth, width, attention, optimiser, schedule, steps, seed and load-balancing coefficient;
the expert split differs so that the active and the total expert parameters per layer are equal. The held-out
split and its unigram entropy ({ev['trained']['heldout_unigram_entropy_nats']:.3f} nats) are the same for both.

| | this checkpoint | {other_dir.name} |
|---|---|---|
{table}
"""


def unused_text(layers: list[dict]) -> str:
    """A sentence naming layers where some expert received no held-out token (empty when there is none)."""
    unused = [str(L["layer"]) for L in layers if L["min_fraction"] == 0.0]
    if not unused:
        return ""
    return (f" In layer{'s' if len(unused) > 1 else ''} {', '.join(unused)} an expert received no held-out token "
            "at all (it is never active there, so no audit cell ranks or ablates it).")
