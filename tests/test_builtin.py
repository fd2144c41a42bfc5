"""Built-in corpus and the embedded ``builtin:tiny-moe`` checkpoint (quality bar recomputed here, not read from eval.json)."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from moeaudit.builtin import BUILTIN_MODELS, builtin_documents, builtin_model_path
from moeaudit.builtin import corpus as C

CKPT = BUILTIN_MODELS["tiny-moe"]
MAX_LEN = 512


# --------------------------------------------------------------------------------------------------------------
# corpus
# --------------------------------------------------------------------------------------------------------------
def test_corpus_is_deterministic():
    a_train, a_held = C.build_documents("train"), C.build_documents("heldout")
    assert a_train == C.build_documents("train")
    assert a_held == C.build_documents("heldout")
    assert builtin_documents("heldout") == a_held
    assert all(isinstance(d, str) and d.strip() for d in a_train + a_held)


def test_heldout_is_fixed_and_version_independent():
    held = C.build_labelled_documents("heldout")
    assert len(held) == C.HELDOUT_DOCS_PER_DOMAIN * len(C.GENERATED_DOMAINS)
    # fully generated: no dependence on the running Python's bundled docs
    assert {d for d, _ in held} == set(C.GENERATED_DOMAINS)
    # pinned content: a change here changes every published held-out number
    first = held[0][1]
    assert first.startswith("Alice lives in Tunis and works as a baker.")
    arithmetic = [t for d, t in held if d == "arithmetic"]
    for doc in arithmetic:
        for line in doc.strip().splitlines():
            lhs, rhs = line.split(" = ")
            assert eval(lhs) == int(rhs)  # noqa: S307 - generated "a op b" strings only


def test_splits_are_disjoint_and_cover_domains():
    train = C.build_labelled_documents("train")
    held = C.build_labelled_documents("heldout")
    held_docs = C.build_labelled_documents("heldout_docs")
    train_texts = {t for _, t in train}
    assert train_texts.isdisjoint(t for _, t in held)
    assert train_texts.isdisjoint(t for _, t in held_docs)
    train_domains = Counter(d for d, _ in train)
    for dom in C.GENERATED_DOMAINS:
        assert train_domains[dom] == C.TRAIN_DOCS_PER_DOMAIN
    pytest.importorskip("pydoc_data.topics")
    assert train_domains["docs"] > 100
    assert set(train_domains) == set(C.DOMAINS)


def test_unknown_split_and_model_name():
    with pytest.raises(ValueError, match="heldout"):
        C.build_documents("test")
    with pytest.raises(ValueError, match="tiny-moe"):
        builtin_model_path("huge-moe")
    assert builtin_model_path("builtin:tiny-moe") == builtin_model_path("tiny-moe") == CKPT


# --------------------------------------------------------------------------------------------------------------
# checkpoint files (cheap)
# --------------------------------------------------------------------------------------------------------------
def test_checkpoint_files_and_size():
    names = {p.name for p in CKPT.iterdir()}
    for required in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md",
                     "training_log.csv", "eval.json"):  # fmt: skip
        assert required in names, required
    total = sum(p.stat().st_size for p in CKPT.rglob("*") if p.is_file())
    assert total <= 20 * 1024 * 1024, total
    cfg = json.loads((CKPT / "config.json").read_text())
    assert cfg["model_type"] == "olmoe"
    assert cfg["architectures"] == ["OlmoeForCausalLM"]
    assert cfg["num_hidden_layers"] >= 8
    assert cfg["num_experts"] >= 16
    assert 4 <= cfg["num_experts_per_tok"] <= 8
    assert cfg["max_position_embeddings"] >= MAX_LEN
    assert not cfg.get("output_router_logits", False)
    log = (CKPT / "training_log.csv").read_text().splitlines()
    assert log[0].startswith("step,loss,lm_loss,aux_loss")
    assert len(log) > 20


# --------------------------------------------------------------------------------------------------------------
# loading, quality bar and learned routing (slow: loads and runs the model)
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loaded():
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    try:
        torch = pytest.importorskip("torch")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(min(2, torch.get_num_threads()))
        model = AutoModelForCausalLM.from_pretrained(CKPT).eval()
        tok = AutoTokenizer.from_pretrained(CKPT)
    finally:
        mp.undo()
    held = C.build_labelled_documents("heldout")
    ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for _, t in held]
    return model, tok, ids, [d for d, _ in held]


def _measure(model, docs_ids, labels):
    """Mean next-token CE (nats), target-token counts and per-layer routing counts over the held-out documents."""
    import torch

    cfg = model.config
    E, k = cfg.num_experts, cfg.num_experts_per_tok
    nll, n = 0.0, 0
    targets: Counter[int] = Counter()
    counts = torch.zeros(cfg.num_hidden_layers, E, dtype=torch.float64)
    by_dom: dict[str, torch.Tensor] = {}
    router_entropy = torch.zeros(cfg.num_hidden_layers, dtype=torch.float64)
    n_routed = 0
    with torch.no_grad():
        for ids, dom in zip(docs_ids, labels, strict=True):
            for i in range(0, len(ids), MAX_LEN):
                w = ids[i : i + MAX_LEN]
                if len(w) < 2:
                    continue
                x = torch.tensor([w])
                out = model(input_ids=x, output_router_logits=True)
                tgt = x[0, 1:]
                logp = torch.log_softmax(out.logits[0, :-1].float(), -1)
                nll -= logp.gather(1, tgt[:, None]).sum().item()
                n += tgt.numel()
                targets.update(tgt.tolist())
                dc = by_dom.setdefault(dom, torch.zeros_like(counts))
                for li, rl in enumerate(out.router_logits):
                    c = torch.bincount(rl.float().topk(k, -1).indices.reshape(-1), minlength=E).double()
                    counts[li] += c
                    dc[li] += c
                    p = torch.softmax(rl.float(), -1)
                    router_entropy[li] += -(p * p.clamp_min(1e-12).log()).sum().double()
                n_routed += x.shape[1]
    return nll / n, targets, counts, by_dom, router_entropy / n_routed / math.log(E)


def _cv(counts):
    frac = counts / counts.sum(-1, keepdim=True)
    return frac.std(-1, unbiased=False) / frac.mean(-1)


@pytest.mark.slow
def test_loads_offline_as_olmoe(loaded):
    from transformers import OlmoeForCausalLM

    model, tok, _, _ = loaded
    assert isinstance(model, OlmoeForCausalLM)
    cfg = model.config
    assert cfg.num_hidden_layers >= 8 and cfg.num_experts >= 16 and 4 <= cfg.num_experts_per_tok <= 8
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert tok.eos_token_id == cfg.eos_token_id and tok.pad_token_id == cfg.pad_token_id
    assert len(tok) == cfg.vocab_size
    text = "def count_items(items):\n"
    assert tok.decode(tok(text)["input_ids"]) == text


@pytest.fixture(scope="module")
def measured(loaded):
    model, _, ids, labels = loaded
    return _measure(model, ids, labels)


@pytest.mark.slow
def test_quality_bar_heldout_ce_40pct_below_unigram_entropy(measured):
    ce, targets, _, _, _ = measured
    n = sum(targets.values())
    assert n > 5000
    h_unigram = -sum(c / n * math.log(c / n) for c in targets.values())  # plug-in entropy of held-out targets
    assert ce <= 0.6 * h_unigram, (ce, h_unigram)


@pytest.mark.slow
def test_routing_is_learned_not_uniform(loaded, measured):
    import torch
    from transformers import OlmoeForCausalLM

    model, _, ids, labels = loaded
    counts = measured[2]
    cv = _cv(counts)
    # utilisation is clearly non-uniform in every layer (uniform would be CV 0) ...
    assert (cv > 0.2).all(), cv
    # ... and the router learned to commit: its per-token distribution over experts is far sharper than a
    # random-init router's, which spreads each token almost uniformly (normalised entropy ~0.99).
    # (Utilisation CV and domain/expert mutual information do NOT separate the two: a random router on real
    # token embeddings is already lumpy and token-dependent; see the model card.)
    torch.manual_seed(0)
    rand = OlmoeForCausalLM(model.config).eval()
    sub = slice(0, None, 4)
    r_ent = _measure(rand, ids[sub], labels[sub])[4]
    t_ent = _measure(model, ids[sub], labels[sub])[4]
    assert r_ent.min() > 0.95, r_ent
    assert t_ent.mean() < r_ent.mean() - 0.1, (t_ent, r_ent)
    assert (t_ent < r_ent).all(), (t_ent, r_ent)
