#!/usr/bin/env python
"""Train the embedded ``builtin:tiny-moe`` OLMoE checkpoint on CPU (seeded, single process).

Usage (from the repository root)::

    PYTHONPATH=src python scripts/train_tiny_moe.py                 # full run, writes src/moeaudit/builtin/tiny-moe/
    PYTHONPATH=src python scripts/train_tiny_moe.py --steps 20 --out /tmp/tiny-moe-timing   # quick timing run

Steps: build the built-in corpus (``moeaudit.builtin.corpus``), train a byte-level BPE tokenizer on the
training split with ``tokenizers``, train an ``OlmoeForCausalLM`` with AdamW + cosine schedule on packed
sequences with the model's own load-balancing loss (``output_router_logits=True`` so transformers adds
``router_aux_loss_coef * aux_loss`` to ``loss``), evaluate on the held-out split, and write config.json,
model.safetensors, tokenizer files, training_log.csv, eval.json and README.md (model card).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import random
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no busy-waiting threads when the 2 cores are shared
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from moeaudit.builtin import corpus  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_moe_card import summarise, write_model_card  # noqa: E402

BUILTIN_DIR = REPO / "src" / "moeaudit" / "builtin"
# Per family: the embedded model it produces and its MoE shape. Both have the same total and active expert
# parameters per layer: 16 x 64 = 8 x 128 = 1024 expert-intermediate units, 4 x 64 = 2 x 128 = 256 active per token.
FAMILY_DEFAULTS = {
    "olmoe": {"name": "tiny-moe", "experts": 16, "top_k": 4, "intermediate_size": 64, "tokenizer_from": None},
    "mixtral": {"name": "tiny-mixtral", "experts": 8, "top_k": 2, "intermediate_size": 128, "tokenizer_from": "tiny-moe"},
}
EOS = "<|endoftext|>"
PAD = "<|pad|>"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--family",
        choices=sorted(FAMILY_DEFAULTS),
        default="olmoe",
        help="olmoe: builtin:tiny-moe (16 experts, top-4); mixtral: builtin:tiny-mixtral (8 experts, top-2)",
    )
    p.add_argument("--out", type=Path, default=None, help="default: src/moeaudit/builtin/<family's model name>/")
    p.add_argument(
        "--tokenizer-from",
        type=Path,
        default=None,
        help="reuse the tokenizer files of this checkpoint directory instead of training one "
        "(mixtral default: the tiny-moe directory, so both embedded models share one tokenizer)",
    )
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--intermediate-size", type=int, default=None, help="per expert; default by family (64 / 128)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=None, help="default by family (16 / 8)")
    p.add_argument("--top-k", type=int, default=None, help="default by family (4 / 2)")
    p.add_argument("--aux-coef", type=float, default=0.01)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--experts-impl", default="eager", help="experts implementation used during training only")
    p.add_argument(
        "--card-only", action="store_true", help="only (re)write README.md from eval.json + training_log.csv"
    )
    args = p.parse_args()
    fam = FAMILY_DEFAULTS[args.family]
    for key in ("experts", "top_k", "intermediate_size"):
        if getattr(args, key) is None:
            setattr(args, key, fam[key])
    if args.out is None:
        args.out = BUILTIN_DIR / fam["name"]
    if args.tokenizer_from is None and fam["tokenizer_from"] is not None:
        args.tokenizer_from = BUILTIN_DIR / fam["tokenizer_from"]
    return args


def _repo_relative(path: Path) -> str:
    """A path inside the repository as ``src/...`` (the recorded command stays machine independent)."""
    resolved = path.resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(path)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------------------------
def train_tokenizer(train_docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_docs, trainer=trainer, length=len(train_docs))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        bos_token=EOS,
        unk_token=None,
        pad_token=PAD,
        model_max_length=512,
        padding_side="right",
    )
    return fast


def encode_docs(tok, docs: list[str]) -> list[list[int]]:
    """Each document -> token ids followed by ``<|endoftext|>`` (no BOS)."""
    eos = tok.eos_token_id
    enc = tok(docs, add_special_tokens=False)["input_ids"]
    return [list(ids) + [eos] for ids in enc]


# ----------------------------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------------------------
def doc_windows(ids: list[int], max_len: int) -> list[list[int]]:
    """Split a document into non-overlapping windows of at most ``max_len`` tokens (each window scored alone)."""
    return [ids[i : i + max_len] for i in range(0, len(ids), max_len) if len(ids[i : i + max_len]) >= 2]


@torch.no_grad()
def evaluate(model, docs_ids: list[list[int]], labels: list[str], num_experts: int, top_k: int, max_len: int = 512):
    """Held-out CE (mean nats per predicted token), plug-in unigram entropy of the same target tokens and routing stats."""
    model.eval()
    nll_sum, n_tok = 0.0, 0
    tgt_counts: Counter[int] = Counter()
    n_layers = model.config.num_hidden_layers
    counts = torch.zeros(n_layers, num_experts, dtype=torch.float64)
    dom_counts: dict[str, torch.Tensor] = {}
    ent_sum = torch.zeros(n_layers, dtype=torch.float64)
    n_route = 0
    for ids, dom in zip(docs_ids, labels, strict=True):
        for w in doc_windows(ids, max_len):
            x = torch.tensor([w])
            out = model(input_ids=x, output_router_logits=True)
            logp = torch.log_softmax(out.logits[0, :-1].float(), dim=-1)
            tgt = x[0, 1:]
            nll_sum += -logp.gather(1, tgt[:, None]).sum().item()
            n_tok += tgt.numel()
            tgt_counts.update(tgt.tolist())
            dc = dom_counts.setdefault(dom, torch.zeros(n_layers, num_experts, dtype=torch.float64))
            for li, rl in enumerate(out.router_logits):
                probs = torch.softmax(rl.float(), dim=-1)
                sel = probs.topk(top_k, dim=-1).indices.reshape(-1)
                c = torch.bincount(sel, minlength=num_experts).double()
                counts[li] += c
                dc[li] += c
                ent_sum[li] += -(probs * probs.clamp_min(1e-12).log()).sum(-1).double().sum()
            n_route += x.shape[1]
    ce = nll_sum / n_tok
    freqs = np.array(list(tgt_counts.values()), dtype=np.float64)
    p = freqs / freqs.sum()
    h_uni = float(-(p * np.log(p)).sum())
    return {
        "heldout_tokens_scored": n_tok,
        "heldout_ce_nats": ce,
        "heldout_unigram_entropy_nats": h_uni,
        "ce_reduction_vs_unigram": 1.0 - ce / h_uni,
        "routing": routing_stats(counts, dom_counts, ent_sum / n_route, num_experts),
    }


def routing_stats(counts: torch.Tensor, dom_counts: dict[str, torch.Tensor], mean_router_entropy, num_experts: int):
    layers = []
    for li in range(counts.shape[0]):
        frac = counts[li] / counts[li].sum()
        ent = float(-(frac * frac.clamp_min(1e-12).log()).sum())
        # mutual information between document domain and chosen expert (nats), normalised by H(expert)
        joint = torch.stack([dom_counts[d][li] for d in sorted(dom_counts)])
        joint = joint / joint.sum()
        pd = joint.sum(1, keepdim=True)
        pe = joint.sum(0, keepdim=True)
        mi = float((joint * (joint.clamp_min(1e-12) / (pd * pe).clamp_min(1e-12)).log()).sum())
        top_by_domain = {d: int(dom_counts[d][li].argmax()) for d in sorted(dom_counts)}
        layers.append(
            {
                "layer": li,
                "fraction_per_expert": [round(float(f), 5) for f in frac],
                "min_fraction": float(frac.min()),
                "max_fraction": float(frac.max()),
                "cv": float(frac.std(unbiased=False) / frac.mean()),
                "normalised_entropy": ent / math.log(num_experts),
                "mean_router_entropy_normalised": float(mean_router_entropy[li]) / math.log(num_experts),
                "domain_expert_mi_nats": mi,
                "domain_expert_mi_normalised": mi / ent,
                "most_used_expert_by_domain": top_by_domain,
            }
        )
    return layers


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------
def main() -> None:
    args = parse_args()
    if args.card_only:
        write_model_card(args.out, json.loads((args.out / "eval.json").read_text()))
        return
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    t_start = time.time()
    from transformers import MixtralConfig, MixtralForCausalLM, OlmoeConfig, OlmoeForCausalLM, PreTrainedTokenizerFast

    train_lab = corpus.build_labelled_documents("train")
    held_lab = corpus.build_labelled_documents("heldout")
    train_docs = [t for _, t in train_lab]
    held_docs = [t for _, t in held_lab]
    if args.tokenizer_from is not None:
        tok = PreTrainedTokenizerFast.from_pretrained(args.tokenizer_from)
        if len(tok) != args.vocab_size:
            raise SystemExit(f"--vocab-size {args.vocab_size} but the tokenizer at {args.tokenizer_from} has {len(tok)}")
    else:
        tok = train_tokenizer(train_docs, args.vocab_size)
    train_ids = encode_docs(tok, train_docs)
    held_ids = encode_docs(tok, held_docs)
    held_labels = [d for d, _ in held_lab]
    print(f"tokenizer: vocab {len(tok)}; corpus+tokenizer built in {time.time() - t_start:.1f}s", flush=True)

    corpus_stats = {}
    for split, lab, ids in (("train", train_lab, train_ids), ("heldout", held_lab, held_ids)):
        per_dom = {}
        for (d, t), i in zip(lab, ids, strict=True):
            s = per_dom.setdefault(d, {"documents": 0, "characters": 0, "tokens": 0})
            s["documents"] += 1
            s["characters"] += len(t)
            s["tokens"] += len(i)
        corpus_stats[split] = {
            "documents": len(lab),
            "characters": sum(len(t) for _, t in lab),
            "tokens": sum(len(i) for i in ids),
            "per_domain": per_dom,
        }
    print(
        json.dumps({k: {kk: v[kk] for kk in ("documents", "characters", "tokens")} for k, v in corpus_stats.items()})
    )

    # packed training stream (documents shuffled once with the seed, separated by <|endoftext|>)
    order = list(range(len(train_ids)))
    random.Random(args.seed).shuffle(order)
    stream = torch.tensor([t for i in order for t in train_ids[i]], dtype=torch.long)
    n_blocks = stream.numel() // args.seq_len
    blocks = stream[: n_blocks * args.seq_len].view(n_blocks, args.seq_len)
    print(f"{stream.numel()} training tokens -> {n_blocks} blocks of {args.seq_len}", flush=True)

    common = dict(
        vocab_size=len(tok),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=512,
        num_experts_per_tok=args.top_k,
        router_aux_loss_coef=args.aux_coef,
        output_router_logits=True,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        rope_theta=10000.0,
    )
    if args.family == "mixtral":
        # Mixtral routing: softmax over all experts, top-k, weights renormalised over the k (no flag to turn it
        # off); full causal attention (sliding_window=None); no router jitter.
        config = MixtralConfig(num_local_experts=args.experts, sliding_window=None, router_jitter_noise=0.0, **common)
        model_cls = MixtralForCausalLM
    else:
        config = OlmoeConfig(num_experts=args.experts, norm_topk_prob=False, **common)
        model_cls = OlmoeForCausalLM
    seed_everything(args.seed)
    model = model_cls(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)
    model.set_experts_implementation(args.experts_impl)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        prog = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))

    args.out.mkdir(parents=True, exist_ok=True)
    log_rows = []
    gen = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(n_blocks, generator=gen)
    cursor = 0
    eval_subset = held_ids[::4]
    eval_labels = held_labels[::4]
    t_train = time.time()
    model.train()
    for step in range(args.steps):
        if cursor + args.batch_size > n_blocks:
            perm = torch.randperm(n_blocks, generator=gen)
            cursor = 0
        batch = blocks[perm[cursor : cursor + args.batch_size]]
        cursor += args.batch_size
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        out = model(input_ids=batch, labels=batch, output_router_logits=True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        row = None
        if step % args.log_every == 0 or step == args.steps - 1:
            aux = float(out.aux_loss.detach())
            row = {
                "step": step,
                "loss": round(float(out.loss), 5),
                "lm_loss": round(float(out.loss) - args.aux_coef * aux, 5),
                "aux_loss": round(aux, 5),
                "lr": f"{lr_at(step):.3e}",
                "grad_norm": round(float(gnorm), 4),
                "tokens_seen": (step + 1) * args.batch_size * args.seq_len,
                "elapsed_s": round(time.time() - t_train, 1),
                "heldout_ce": "",
            }
        if (step > 0 and step % args.eval_every == 0) or step == args.steps - 1:
            ev = evaluate(model, eval_subset, eval_labels, args.experts, args.top_k)
            model.train()
            row = row or {
                "step": step, "loss": round(float(out.loss), 5), "lm_loss": "", "aux_loss": round(float(out.aux_loss), 5),
                "lr": f"{lr_at(step):.3e}", "grad_norm": round(float(gnorm), 4),
                "tokens_seen": (step + 1) * args.batch_size * args.seq_len, "elapsed_s": round(time.time() - t_train, 1),
            }  # fmt: skip
            row["heldout_ce"] = round(ev["heldout_ce_nats"], 5)
        if row is not None:
            log_rows.append(row)
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    train_seconds = time.time() - t_train
    print(f"training took {train_seconds:.0f}s", flush=True)

    # ---- save, then evaluate the checkpoint exactly as a user loads it ----
    model.config.output_router_logits = False
    model.config.use_cache = True
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(args.out).eval()
    t_eval = time.time()
    final = evaluate(loaded, held_ids, held_labels, args.experts, args.top_k)
    eval_seconds = time.time() - t_eval
    seed_everything(args.seed + 1)
    rand_model = model_cls(config).eval()
    rand = evaluate(rand_model, held_ids, held_labels, args.experts, args.top_k)
    with open(args.out / "training_log.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(log_rows[0].keys()))
        w.writeheader()
        w.writerows(log_rows)
    summary = {
        "command": "PYTHONPATH=src python scripts/train_tiny_moe.py " + " ".join(sys.argv[1:]),
        "args": {k: (_repo_relative(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "tokenizers": __import__("tokenizers").__version__,
            "cpu_threads": args.threads,
            "machine": platform.machine(),
        },
        "parameters": n_params,
        "train_seconds": round(train_seconds, 1),
        "heldout_eval_seconds_eager": round(eval_seconds, 1),
        "corpus": corpus_stats,
        "trained": final,
        "random_init_same_config": {
            "heldout_ce_nats": rand["heldout_ce_nats"],
            "routing_summary": summarise(rand["routing"]),
        },
        "trained_routing_summary": summarise(final["routing"]),
    }
    (args.out / "eval.json").write_text(json.dumps(summary, indent=1) + "\n")
    write_model_card(args.out, summary)
    print(json.dumps({k: v for k, v in final.items() if k != "routing"}, indent=1))
    print("trained:", json.dumps(summary["trained_routing_summary"]))
    print("random :", json.dumps(summary["random_init_same_config"]["routing_summary"]))
    print(f"total wall time {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
