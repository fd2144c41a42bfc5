"""``moeaudit attribute``: first-order estimates of every active expert's ΔL from one backward pass, measured against
exact ablation per layer (a thin layer over :func:`moeaudit.run.attribution.attribution_run`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

from moeaudit.cli._app import MODEL_HELP, app
from moeaudit.cli._common import build_config, escape, flag_names, rich_table
from moeaudit.cli._prune import _DRY_RUN_HELP, _ENCODING_HELP, _dry_run, _option, _run
from moeaudit.run.attribution._config import AttributeConfig

_DEFAULTS = AttributeConfig()
_PRESET_HELP = "a .toml config file or a preset (demo, paper-olmoe, paper-qwen, paper-deepseek); flags override it"


@app.command("attribute")
def attribute_cmd(
    config: str = typer.Argument(None, help=_PRESET_HELP),
    model: str = _option(_DEFAULTS, "model", MODEL_HELP),
    name: str = _option(_DEFAULTS, "name", "label in the report", "from the model"),
    corpus: str = _option(_DEFAULTS, "corpus", "wikitext-2, builtin, builtin:train, or a .txt/.jsonl/.parquet file"),
    text_field: str = _option(_DEFAULTS, "text_field", "field holding the text in .jsonl / .parquet corpora"),
    encoding: str = _option(_DEFAULTS, "encoding", _ENCODING_HELP),
    n_docs: int = _option(_DEFAULTS, "n_docs", "documents attributed at every position"),
    max_length: int = _option(_DEFAULTS, "max_length", "tokens per document"),
    min_length: int = _option(_DEFAULTS, "min_length", "shorter documents are skipped"),
    layers: str = _option(_DEFAULTS, "layers", "comma-separated MoE layers, or 'all'", "all"),
    modes: str = _option(_DEFAULTS, "modes", "comma-separated ablation modes to estimate: zero, renormalize, "
                                             "reroute"),
    n_exact: int = _option(_DEFAULTS, "n_exact", "positions per layer where every active expert is also ablated "
                                                 "exactly (the validation)"),
    min_context: int = _option(_DEFAULTS, "min_context", "exact positions need at least this many tokens of context"),
    dtype: str = _option(_DEFAULTS, "dtype", "auto, float32, bfloat16, float16"),
    device: str = _option(_DEFAULTS, "device", "auto, cpu, cuda, cuda:N, mps"),
    device_map: str = _option(_DEFAULTS, "device_map", "spread the model over several devices with accelerate: "
                                                       "auto, balanced, balanced_low_0, sequential, or a .json map"),
    seed: int = _option(_DEFAULTS, "seed", "seed of the exact positions and the resampling (>= 0)"),
    trust_remote_code: bool = typer.Option(False, help="run modelling code shipped with the checkpoint (never "
                                                       "read from a configuration file)"),
    out: Path = _option(_DEFAULTS, "out", "run directory; re-running resumes it", "runs/<name>-attribute"),
    report: bool = typer.Option(True, help="write report.md / report.html / figures at the end"),
    dry_run: bool = typer.Option(False, "--dry-run", help=_DRY_RUN_HELP),
) -> None:
    """Attribution patching for experts: g·δy estimates of every (position, layer, active expert) ΔL into
    attribution.parquet, an estimated importance map, and their agreement with exact ablations per layer and mode
    (tables/attribution.csv); resumable."""
    from moeaudit.run.attribution import attribution_run

    values = locals()
    flags = flag_names(*AttributeConfig.__dataclass_fields__, "trust_remote_code", "out", "report", "dry_run")
    cfg = build_config(AttributeConfig, config,
                       {f.name: values[f.name] for f in dataclasses.fields(AttributeConfig)}, flags)
    target = out or Path("runs") / f"{cfg.label}-attribute"
    if dry_run:
        from moeaudit.run._workloads import attribute_workload

        raise _dry_run("attribute", cfg, target, attribute_workload, flags, trust_remote_code, report)
    console, result, seconds = _run(lambda p: attribution_run(cfg, target, progress=p, report=report,
                                                              trust_remote_code=trust_remote_code),
                                    target, "attribute", flags)
    columns = ["layer", "mode", "n_positions", "pearson", "spearman", "spearman_low", "slope", "sign_agree",
               "d_attr", "d_control", "verdict"]
    console.print(rich_table("attribution against exact ablation", result.agreement, columns))
    console.print(f"{len(result.attribution)} estimates in {seconds:.1f} s -> "
                  f"{escape(target / 'attribution.parquet')}", highlight=False)
    if result.report:
        console.print(f"report: {escape(result.report['html'])}", highlight=False)
