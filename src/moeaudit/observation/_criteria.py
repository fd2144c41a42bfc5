r"""The built-in expert criteria: each one's formula, its published source, and where moeaudit departs from it.

Every entry becomes a column of :func:`moeaudit.observe` (in this order) through the metric registry of
:mod:`moeaudit.observation._observe`. Notation, for one MoE layer over the corpus's N real tokens t: :math:`A_e` the tokens
whose top-k holds expert e, :math:`n_e = |A_e|`, :math:`g_e(t)` the weight the model multiplies expert e's output by
(its own top-k choice, renormalisation and routed scaling, so DeepSeek-V3's bias-corrected group choice is
followed), :math:`a_e(t) = \lVert E_e(x_t)\rVert_2` the norm of the expert's unweighted output, :math:`p_e(t)` the
router probability, :math:`h_t` the residual stream entering the MoE sub-layer, :math:`r_t = \sum_{j \in
\mathrm{TopK}(t)} g_j(t) E_j(x_t)` the routed experts' output and :math:`m_t` the whole MoE output (shared experts
included).

Published implementations checked (tests/test_criteria_sources.py re-implements each formula and agrees to 1e-7 on
tiny float64 models of every family):

- REAP, Lasby et al. 2025 (arXiv 2510.13999), CerebrasResearch/reap ``src/reap/pruning_metrics.py``
  (``update_pruning_state``): ``expert_frequency``, ``ean_sum``, ``ean_mean``, ``weighted_expert_frequency_sum``,
  ``reap``. Its observer takes the gate value as ``softmax(router_logits)`` over all experts, renormalised over the
  top-k only when ``config.norm_topk_prob``, and the choice as top-k of the raw logits. That is the weight the model
  applies for OLMoE, Qwen2-MoE, Qwen3-MoE and DeepSeek-V2 with greedy top-k and ``routed_scaling_factor`` 1; it is
  not for Mixtral (the model renormalises, REAP's code does not), GPT-OSS (softmax over the chosen logits only),
  DeepSeek-V2 with group-limited choice or a scaling factor, and DeepSeek-V3 (sigmoid scores, bias-corrected group
  choice, scaling). moeaudit uses the applied weight and the model's own choice everywhere, the paper's definition
  ("router gate-values") and what llm-compressor does. An expert no token chose gets NaN for a mean (``reap``,
  ``activation_norm``) here and 0 in REAP's code; moeaudit's rankings place NaN lowest, where that 0 lands too.
- llm-compressor, vllm-project/llm-compressor ``modifiers/pruning/reap`` (``REAPSaliencyTracker``): REAP from the
  ``top_k_index`` / ``top_k_weights`` the experts module receives, i.e. the applied weights: equal to ``reap``.
- MC-SMoE, Li et al. 2024, UNITES-Lab/MC-SMoE ``mcsmoe/merging/grouping.py`` (``compute_all_usages``): usage
  frequency = routed count normalised to sum to 1 over a layer's experts, :math:`n_e / (N k)`: the ranking of
  ``utilization_rate`` (which is :math:`n_e / N`, summing to k); MC-SMoE also counts padded positions, moeaudit
  only real tokens.
- EASY-EP, Dong et al. 2025 (arXiv 2504.06792), RUCAIBox/EASYEP ``pruning/expert_selection.py`` with the
  statistics of ``pruning/model_new.py`` (``MoE.forward``: weights, indices, norms of the unweighted expert outputs;
  ``Block.forward``: ``simibr = cos(x_before_moe, x + r_moe)``, the routed output only).
"""

from __future__ import annotations

from moeaudit.observation import _weights

#: (name, doc, registration keywords) of every built-in criterion, in column order. The doc names the formula,
#: the source and any departure from it; it is what :data:`moeaudit.observation._observe.METRICS` shows.
BUILTIN_CRITERIA: tuple[tuple[str, str, dict], ...] = (
    ("utilization_rate",
     "n_e / N: share of real tokens whose top-k holds e. Source: the audited paper; = REAP's expert_frequency / "
     "total_tokens. MC-SMoE's usage frequency is n_e / (N k): same ranking",
     dict(per_token=lambda b: b.routed, over="all")),
    ("mean_routing_weight_when_active",
     "mean over A_e of g_e(t), the weight the model applies. Source: the audited paper",
     dict(per_token=lambda b: b.weight)),
    ("activation_norm",
     "mean over A_e of ||E_e(x_t)||_2 (unweighted output). Source: the audited paper; = REAP's ean_mean",
     dict(per_token=lambda b: b.output_norm)),
    ("activation_std",
     "sample std (ddof=1) over A_e of ||E_e(x_t)||_2. Source: the audited paper",
     dict(per_token=lambda b: b.output_norm, reduce="std")),
    ("soft_utilization",
     "mean over all real tokens of the router probability p_e(t). Source: P_e of the Switch Transformer "
     "load-balancing loss (Fedus et al. 2022); GPT-OSS and DeepSeek-V3 have no full softmax, see "
     "router_probabilities",
     dict(per_token=lambda b: b.router_probs, over="all")),
    ("reap",
     "REAP: mean over A_e of g_e(t) ||E_e(x_t)||. Source: Lasby et al. 2025 = llm-compressor's REAP; "
     "CerebrasResearch/reap's code takes g from softmax(logits), which departs from the applied weight on "
     "Mixtral, GPT-OSS and DeepSeek-V3",
     dict(per_token=lambda b: b.weight * b.output_norm)),
    ("frequency_weighted",
     "sum over A_e of g_e(t). Source: REAP's weighted_expert_frequency_sum (same g caveat as reap)",
     dict(per_token=lambda b: b.weight, reduce="sum")),
    ("ean",
     "EAN: sum over A_e of ||E_e(x_t)||. Source: REAP's ean_sum (expert activation norm, Jaiswal et al. 2025)",
     dict(per_token=lambda b: b.output_norm, reduce="sum")),
    ("msan",
     "mean over A_e of ||E_e(x_t)||^2. Source: moeaudit (second moment of the activation norm; no published "
     "implementation)",
     dict(per_token=lambda b: b.output_norm.pow(2))),
    ("easy_ep",
     "EASY-EP: sum over A_e of g_e(t) ||E_e(x_t)|| max(1 - cos(h_t, h_t + r_t), 0), r_t the routed experts' "
     "output (shared experts excluded). Source: Dong et al. 2025, RUCAIBox/EASYEP expert_selection.py; "
     "departure: 1 - cos in float64",
     dict(per_token=lambda b: b.weight * b.output_norm * b.routed_change[b.token].clamp_min(0.0), reduce="sum")),
    ("easy_ep_mean",
     "moeaudit's EASY-EP variant: mean (not sum) over A_e of g_e(t) ||E_e(x_t)|| (1 - cos(h_t, h_t + m_t)), m_t "
     "the whole MoE output (shared experts included); not EASY-EP's published score (use easy_ep)",
     dict(per_token=lambda b: b.weight * b.output_norm * b.moe_change[b.token])),
    ("router_norm",
     "||W_router[e]||_2. Source: moeaudit (weight-only baseline)",
     dict(weight_only=_weights.router_norm)),
    ("weight_norm",
     "Frobenius norm of all of expert e's parameters. Source: moeaudit (weight-only baseline)",
     dict(weight_only=_weights.weight_norm)),
    ("stable_rank",
     "||W_down||_F^2 / ||W_down||_2^2 of expert e. Source: stable rank (Rudelson & Vershynin 2007) of the down "
     "projection",
     dict(weight_only=_weights.stable_rank)),
)
