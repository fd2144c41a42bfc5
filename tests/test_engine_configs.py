"""The engines in config variants the standard tiny models do not exercise, each checked by full forwards.

Three computations must agree on every ablation: the fast engine, the naive engine, and a plain ``model(ids)`` forward
written here with its own router hook (zero mode). Covered: sliding windows on every family that has them (T longer
than the window), every rotary type transformers offers (length-dependent ones past their original context), and
models dispatched by accelerate with offloaded layers. Each variant also shows that the check could fail: the
engine with the variant's handling switched off disagrees.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import random_ids

from moeaudit import Ablation, SequenceAblator, ablate, describe
from moeaudit.intervene import _incremental
from moeaudit.models import FAMILIES, adapter_for, router
from moeaudit.models._families import windows_none
from moeaudit.testing import tiny_model

ATOL = 1e-4
SEQ = 40  # longer than every window (8) and every original context (16) below


def plain_loss(model, ids: torch.Tensor, ab: Ablation) -> float:
    """Zero-mode ablated loss from one plain forward whose router drops the removed experts' weights (an
    independent reference: no engine code)."""
    rows = [ab.position] if ab.scope == "token" else list(range(ab.position + 1))

    def hook(module, args, output):
        logits, weights, indices = output[:3]
        weights = weights.clone()
        for r in rows:
            for slot in range(indices.shape[1]):
                if int(indices[r, slot]) in ab.experts:
                    weights[r, slot] = 0
        return (logits, weights, indices, *output[3:])

    handle = router(model, ab.layer).register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids[None]).logits[0]
    finally:
        handle.remove()
    t = ab.position
    return float(F.cross_entropy(logits[t].float()[None], ids[t + 1][None]))


def routed_ablations(model, ids, n: int, seed: int, early: int | None = None) -> list[Ablation]:
    """``n`` ablations of routed experts, alternating scopes; the first half at positions < ``early`` if given."""
    desc = describe(model)
    state = SequenceAblator(model, ids).state
    rng = random.Random(seed)
    out = []
    for k in range(n):
        layer = rng.choice(desc.moe_layers)
        t = rng.randrange(early) if early and k < n // 2 else rng.randrange(len(ids) - 1)
        # an expert routed early, so sequence-scope blocks are long
        slot = state.moe[layer].indices[min(t, 2) if k % 2 else t]
        out.append(Ablation(layer, t, (int(slot[rng.randrange(len(slot))]),), scope="sequence" if k % 2 else "token"))
    return out


def assert_three_way(model, ids, ablations, *, tag: str) -> list:
    """fast == naive (every field) == plain forward (ablated loss); the ablations move the loss."""
    fast = ablate(model, ids, ablations)
    naive = ablate(model, ids, ablations, engine="naive")
    for f, n in zip(fast, naive):
        for name in ("clean_loss", "ablated_loss", "delta_loss", "gap_norm", "final_gap_norm", "removed_weight"):
            assert getattr(f, name) == pytest.approx(getattr(n, name), abs=ATOL), (tag, name, f.ablation)
        assert f.ablated_loss == pytest.approx(plain_loss(model, ids, f.ablation), abs=ATOL), (tag, f.ablation)
    assert max(abs(r.delta_loss) for r in naive) > 100 * ATOL, tag
    return naive


def max_error(results, reference) -> float:
    return max(abs(a.ablated_loss - b.ablated_loss) for a, b in zip(results, reference))


WINDOWED = {
    "mixtral": {"sliding_window": 8},
    "qwen3_moe": {"use_sliding_window": True, "sliding_window": 8},
    "qwen2_moe": {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 3},
    "gpt_oss": {"sliding_window": 8},
}


@pytest.mark.parametrize("family", sorted(WINDOWED))
def test_sliding_windows_agree_with_full_forwards(family, monkeypatch):
    model = tiny_model(family, **WINDOWED[family])
    ids = random_ids(SEQ, seed=11)
    ablations = routed_ablations(model, ids, 8, seed=3)
    naive = assert_three_way(model, ids, ablations, tag=family)
    # The check can fail: the same engine ignoring the windows is off.
    monkeypatch.setitem(FAMILIES, family, dataclasses.replace(adapter_for(model), windows=windows_none))
    assert max_error(ablate(model, ids, ablations), naive) > 1e-3


def test_windows_follow_each_family_config():
    """Per layer, what the attention modules themselves hold (Qwen2-MoE slides on odd-numbered layers below
    max_window_layers; GPT-OSS alternates; Qwen3-MoE and Mixtral slide everywhere when set; others never)."""
    expected = {"qwen2_moe": [8, None, 8, None], "gpt_oss": [8, None, 8, None], "qwen3_moe": [8] * 4,
                "mixtral": [8] * 4}
    for family, overrides in WINDOWED.items():
        model = tiny_model(family, **overrides)
        windows = adapter_for(model).windows(model.config, 4)
        assert windows == expected[family], family
        for layer, window in zip(model.model.layers, windows):
            own = getattr(layer.self_attn, "sliding_window", "unset")
            assert own in (window, "unset"), (family, own, window)
    for family in ("olmoe", "deepseek_v2", "deepseek_v3"):
        model = tiny_model(family)
        assert adapter_for(model).windows(model.config, 4) == [None] * 4
    plain = tiny_model("qwen3_moe", sliding_window=8)  # use_sliding_window=False: the config drops the window
    assert adapter_for(plain).windows(plain.config, 4) == [None] * 4
    broken = tiny_model("qwen2_moe", layer_types=["sliding_attention"] * 4)  # window 0: the model would see nothing
    with pytest.raises(ValueError, match="sliding_window is 0"):
        adapter_for(broken).windows(broken.config, 4)


def _rope_cases(rotary_dim) -> dict:
    half = rotary_dim // 2
    return {
        "default": ("olmoe", {"rope_type": "default"}, {}),
        "linear": ("mixtral", {"rope_type": "linear", "factor": 2.0}, {}),
        "dynamic": ("deepseek_v2", {"rope_type": "dynamic", "factor": 2.0}, {"max_position_embeddings": 16}),
        "yarn": ("deepseek_v3", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
                 {"max_position_embeddings": 64}),
        "longrope": ("qwen3_moe", {"rope_type": "longrope", "short_factor": [1.0] * half,
                                   "long_factor": [1.0 + 0.5 * i for i in range(half)],
                                   "original_max_position_embeddings": 16}, {"max_position_embeddings": 64}),
        "llama3": ("qwen2_moe", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 16}, {}),
        "proportional": ("gpt_oss", {"rope_type": "proportional", "partial_rotary_factor": 0.5}, {}),
    }


def test_every_rotary_type_is_covered():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    assert set(ROPE_INIT_FUNCTIONS) | {"default"} == set(_rope_cases(16)), "a new rotary type: add it to the walk"


@pytest.mark.parametrize("rope_type", sorted(_rope_cases(16)))
def test_every_rotary_type_agrees_with_full_forwards(rope_type):
    family = _rope_cases(16)[rope_type][0]
    rotary_dim = 8 if family.startswith("deepseek") else 16  # qk_rope_head_dim / head_dim of the tiny models
    _, params, extra = _rope_cases(rotary_dim)[rope_type]
    model = tiny_model(family, rope_parameters={"rope_theta": 10000.0, **params}, **extra)
    assert model.model.rotary_emb.rope_type == rope_type
    ids = random_ids(SEQ, seed=5)
    # half the queries below the original context (16), where a length-dependent type would switch back
    assert_three_way(model, ids, routed_ablations(model, ids, 8, seed=7, early=14), tag=rope_type)


def _queries_recompute_rotary(self, pos):
    """The former behaviour: rotary embeddings computed for the query positions only."""
    rotary = self.model.model.rotary_emb
    return rotary(self.state.layer_out[0][None, : len(pos)], pos[None])


@pytest.mark.parametrize(("family", "params"), [
    ("olmoe", {"rope_type": "dynamic", "factor": 2.0}),
    ("deepseek_v2", {"rope_type": "dynamic", "factor": 4.0}),
])
def test_dynamic_ntk_past_max_positions(family, params, monkeypatch):
    """Dynamic NTK on a 40-token sequence with max_position_embeddings = 16: the clean pass scales the frequencies;
    queries below 16 must use the same ones, whatever else is in their chunk."""
    model = tiny_model(family, max_position_embeddings=16, rope_parameters={"rope_theta": 10000.0, **params})
    ids = random_ids(SEQ, seed=8)
    early = [ab for ab in routed_ablations(model, ids, 12, seed=9, early=15) if ab.position < 15]
    naive = assert_three_way(model, ids, early, tag=family)
    alone = [ablate(model, ids, [ab], max_query_tokens=1)[0] for ab in early[:4]]
    assert max_error(alone, naive[:4]) < ATOL  # the result does not depend on the chunk
    monkeypatch.setattr(_incremental.Context, "position_embeddings", _queries_recompute_rotary)
    assert max_error(ablate(model, ids, early), naive) > 1e-3  # the check can fail


def test_device_map_with_offloaded_layers(tmp_path):
    """accelerate dispatches the model with two decoder layers and the LM head offloaded to disk (weights on meta,
    loaded by accelerate's hooks at each forward): both engines equal the undispatched model's plain forwards."""
    accelerate = pytest.importorskip("accelerate", reason="accelerate is not installed (pip install accelerate)")
    from moeaudit.models import execution_device

    family = "deepseek_v2"
    reference = tiny_model(family)
    ids = random_ids(SEQ, seed=4)
    ablations = routed_ablations(reference, ids, 8, seed=5)
    expected = [plain_loss(reference, ids, ab) for ab in ablations]
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.layers.2": "cpu", "model.layers.3": "disk", "model.norm": "cpu",
                  "lm_head": "disk"}
    model = accelerate.dispatch_model(tiny_model(family), device_map, main_device="cpu", offload_dir=str(tmp_path))
    assert model.model.layers[1].mlp.experts.gate_up_proj.device.type == "meta"  # hooks really are in charge
    assert execution_device(model.model.layers[1]) == torch.device("cpu")
    for engine in ("fast", "naive"):
        results = ablate(model, ids, ablations, engine=engine)
        for r, want in zip(results, expected):
            assert r.ablated_loss == pytest.approx(want, abs=ATOL), (engine, r.ablation)
    assert max(abs(r.delta_loss) for r in results) > 100 * ATOL


def test_observe_with_offloaded_layers_equals_the_undispatched_model(tmp_path):
    """Every observe metric, weight-only ones included (their weights sit on ``meta`` outside a forward), and the
    per-document statistics of a model whose layers accelerate offloaded to disk equal the plain model's."""
    accelerate = pytest.importorskip("accelerate", reason="accelerate is not installed (pip install accelerate)")
    from moeaudit import observe

    family = "deepseek_v2"
    seqs = [random_ids(SEQ, seed=s) for s in range(3)]
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.layers.2": "cpu", "model.layers.3": "disk", "model.norm": "cpu",
                  "lm_head": "disk"}
    model = accelerate.dispatch_model(tiny_model(family), device_map, main_device="cpu", offload_dir=str(tmp_path))
    assert model.model.layers[3].mlp.experts.down_proj.device.type == "meta"
    want, got = observe(tiny_model(family), seqs), observe(model, seqs)
    pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=0, atol=1e-9)
    assert model.model.layers[3].mlp.experts.down_proj.device.type == "meta"  # offloaded again afterwards
    halves = observe(model, seqs, per_document=True).table([0, 2])
    pd.testing.assert_frame_equal(halves, observe(tiny_model(family), [seqs[0], seqs[2]]), check_exact=False,
                                  rtol=0, atol=1e-9)


def test_run_with_layers_offloaded_to_disk_equals_the_plain_run(tmp_path, monkeypatch):
    """A device map that sends MoE layers to disk needs an offload folder (transformers re-saves the fused experts
    there): moeaudit makes a temporary one, and deletes it with the model. The audit's records equal the plain
    run's."""
    pytest.importorskip("accelerate", reason="accelerate is not installed (pip install accelerate)")
    import gc
    import json
    import tempfile

    from moeaudit import RunConfig, run_audit

    made, mkdtemp = [], tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: made.append(mkdtemp(*a, **k)) or made[-1])
    layers = {f"model.layers.{i}": "disk" if i in (1, 7) else "cpu" for i in range(8)}
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", **layers, "model.norm": "cpu",
                  "lm_head": "cpu"}
    (tmp_path / "map.json").write_text(json.dumps(device_map))
    base = RunConfig.preset("demo").replace(layers=[1, 7], n=12, n_docs=2, experiments=["audit"], device="auto")
    spread = run_audit(base.replace(device_map=str(tmp_path / "map.json")), tmp_path / "spread", report=False)
    plain = run_audit(base, tmp_path / "plain", report=False)
    manifest = json.loads((tmp_path / "spread" / "manifest.json").read_text())
    assert manifest["sessions"][-1]["device_map"]["model.layers.7"] == "disk"
    assert len(spread.records) == len(plain.records) > 0
    assert np.allclose(spread.records["delta"], plain.records["delta"], atol=1e-5)
    # the placement is not part of what a run computes: resumed on one device, every cell is read back
    again = run_audit(base, tmp_path / "spread", report=False)
    assert again.computed_cells == [] and len(again.resumed_cells) == 2
    gc.collect()
    offload = [p for p in made if "moeaudit-offload-" in p]
    assert len(offload) == 1 and not Path(offload[0]).exists()  # the offload folder went with the model


def test_load_model_with_device_map(tmp_path):
    pytest.importorskip("accelerate", reason="accelerate is not installed (pip install accelerate)")
    from moeaudit import load_model

    model = tiny_model("olmoe")
    model.save_pretrained(tmp_path / "ckpt")
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))) \
        .save_pretrained(tmp_path / "ckpt")
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.layers.2": "cpu", "model.layers.3": "cpu", "model.norm": "cpu",
                  "lm_head": "disk"}
    loaded, _ = load_model(tmp_path / "ckpt", dtype="float32", device_map=device_map,
                           offload_folder=tmp_path / "offload")
    assert loaded.hf_device_map == device_map
    assert loaded.lm_head.weight.device.type == "meta"
    ids = random_ids(24, seed=1)
    ablations = routed_ablations(model, ids, 4, seed=1)
    for a, b in zip(ablate(loaded, ids, ablations), ablate(model, ids, ablations, engine="naive")):
        assert a.ablated_loss == pytest.approx(b.ablated_loss, abs=ATOL)
    with pytest.raises(ValueError, match="device_map='everywhere' is not valid; choose one of auto"):
        load_model(tmp_path / "ckpt", device_map="everywhere")
