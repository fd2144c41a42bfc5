"""``moeaudit run``, ``demo`` and ``report``: audits into run directories, and reports from them."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from moeaudit.cli._app import MODEL_HELP, app
from moeaudit.cli._common import (
    RichProgress,
    build_config,
    dry_run_exit,
    escape,
    expected_errors,
    fail,
    flag_names,
    header,
    interrupted,
    make_console,
    rich_table,
    status,
)
from moeaudit.config import PAPER_METRICS, PROGRESSIVE_ARMS, RUN_EXPERIMENTS, RunConfig
from moeaudit.experiments import decision_counts, margin_rule

_DEFAULTS = RunConfig()
#: The flags of ``run``, by the keyword they set (messages from the library are rewritten to name them).
RUN_FLAGS = flag_names(*RunConfig.__dataclass_fields__, "allow_fewer", "trust_remote_code", "out", "report",
                       "shard", "executor", "ray_actors", "clean_cache", "dry_run")


def _option(key: str, help: str, shown: str | None = None):
    """A ``run`` flag that overrides the configuration (``None`` when not given) and shows the built-in default
    (a preset or a TOML file may set another)."""
    default = getattr(_DEFAULTS, key)
    return typer.Option(None, help=help, show_default=shown if shown is not None else str(default))


@app.command()
def run(
    config: str = typer.Argument(None, help="a .toml config file or a preset (paper-olmoe, paper-qwen, "
                                            "paper-deepseek, demo); flags override it"),
    model: str = _option("model", MODEL_HELP), name: str = _option("name", "label in the report", "from the model"),
    corpus: str = _option("corpus", "wikitext-2, builtin, builtin:train, or a .txt/.jsonl/.parquet file"),
    layers: str = _option("layers", "comma-separated MoE layers, or 'all'", "all"),
    metrics: str = _option("metrics", "comma-separated observational metrics", ",".join(PAPER_METRICS)),
    experiments: str = _option("experiments", "comma-separated experiments (the default lists them); optional: "
                                              "attribution",
                               ",".join(RUN_EXPERIMENTS)),
    n: int = _option("n", "positions per cell"),
    n_progressive: int = _option("n_progressive", "positions per layer of the progressive ablation"),
    progressive_arms: str = _option("progressive_arms", "comma-separated removal orders of the progressive "
                                                        "ablation: highest, lowest, random",
                                    ",".join(PROGRESSIVE_ARMS)),
    progressive_sesoi: float = _option("progressive_sesoi", "equivalence bound (nats) when comparing progressive "
                                                            "arms"),
    n_docs: int = _option("n_docs", "documents for the single-expert experiments"),
    n_docs_progressive: int = _option("n_docs_progressive", "documents for the progressive ablation"),
    max_length: int = _option("max_length", "tokens per document"),
    min_length: int = _option("min_length", "shorter documents are skipped"),
    text_field: str = _option("text_field", "field holding the text in .jsonl / .parquet corpora"),
    encoding: str = _option("encoding", "text encoding of .txt / .jsonl corpora (e.g. latin-1, cp1252)"),
    domain_field: str = _option("domain_field", "field of .jsonl / .parquet rows naming each document's domain: "
                                                "results also per domain (the builtin corpus has its own)", "unset"),
    stratify_domains: bool = _option("stratify_domains", "sample positions stratified by domain (where documents "
                                                         "have domains)"),
    min_context: int = _option("min_context", "positions need at least this many tokens of context"),
    scope: str = _option("scope", "token or sequence"),
    mode: str = _option("mode", "zero, renormalize, reroute or mean (expert output replaced by its mean over the run's documents)"),
    dtype: str = _option("dtype", "auto, float32, bfloat16, float16"),
    device: str = _option("device", "auto, cpu, cuda, cuda:N, mps"),
    device_map: str = _option("device_map", "spread the model over several devices with accelerate: auto, "
                                            "balanced, balanced_low_0, sequential, or a .json module->device map",
                              "unset"),
    seed: int = _option("seed", "seed of the position sampling, tie-breaks, bootstrap and sign flips (>= 0)"),
    n_boot: int = _option("n_boot", "bootstrap resamples of the confidence intervals"),
    sesoi_d: float = _option("sesoi_d", "smallest effect of interest (d_z) of the equivalence tests"),
    out: Path = typer.Option(None, help="run directory; re-running resumes it", show_default="runs/<name>"),
    allow_fewer: bool = typer.Option(False, "--allow-fewer", help="when the corpus has fewer valid positions than "
                                     "--n / --n-progressive, run with those it has instead of refusing"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="run modelling code shipped with "
                                           "the checkpoint (only this flag enables it, never a config file)"),
    report: bool = typer.Option(True, help="write report.md / report.html / figures at the end"),
    shard: str = typer.Option(None, help="compute only shard I of N (I from 0, e.g. 0/4 or "
                                         "$SLURM_ARRAY_TASK_ID/4) into its own directory; combine the shards with "
                                         "`moeaudit merge`"),
    executor: str = typer.Option("local", help="local (this process) or ray (Ray actors on the cluster at "
                                               "RAY_ADDRESS, else a local one; pip install 'moeaudit\\[ray]')"),
    ray_actors: int = typer.Option(None, help="Ray actors (default: one per GPU, else one per node)"),
    clean_cache: str = typer.Option("auto", help="memory for clean passes shared by every cell: auto (half the "
                                                 "free memory of the device), 0 (none), or a size: 8GiB, 500MB"),
    dry_run: bool = typer.Option(False, "--dry-run", help="compute nothing: print the plan (cells, ablations, "
                                 "documents) and estimates of time, peak memory and disk; write OUT/dry-run.json"),
) -> None:
    """Run (or resume) an audit into a run directory: records, summary, report."""
    from moeaudit.run.execution import Execution, parse_bytes

    flags = {"model": model, "name": name, "corpus": corpus, "layers": layers, "metrics": metrics,
             "experiments": experiments, "n": n, "n_progressive": n_progressive,
             "progressive_arms": progressive_arms, "progressive_sesoi": progressive_sesoi, "n_docs": n_docs,
             "n_docs_progressive": n_docs_progressive, "max_length": max_length, "min_length": min_length,
             "text_field": text_field, "encoding": encoding, "domain_field": domain_field,
             "stratify_domains": stratify_domains, "min_context": min_context, "scope": scope,
             "mode": mode, "dtype": dtype, "device": device, "device_map": device_map, "seed": seed,
             "n_boot": n_boot, "sesoi_d": sesoi_d}
    cfg = build_config(RunConfig, config, flags, RUN_FLAGS).with_resolved_paths()
    try:
        execution = Execution(executor=executor, shard=shard, ray_actors=ray_actors,
                              clean_cache_bytes=parse_bytes(clean_cache))
    except expected_errors() as exc:
        raise fail(exc, RUN_FLAGS) from None
    default = cfg.label if execution.shard is None else \
        f"{cfg.label}-shard-{execution.shard.index}-of-{execution.shard.count}"
    if dry_run:
        from moeaudit.run._workloads import run_workload

        console = make_console()
        target = out or Path("runs") / default
        header(console, f"[bold]moeaudit run --dry-run[/bold] {escape(cfg.label)} -> {escape(target)}")
        raise dry_run_exit(console, "run", cfg, target, run_workload, RUN_FLAGS,
                           trust_remote_code=trust_remote_code, report=report)
    _execute(cfg, out or Path("runs") / default, report, execution, allow_fewer=allow_fewer,
             trust_remote_code=trust_remote_code)


@app.command()
def demo(out: Path = typer.Option(Path("moeaudit-demo"), help="output directory"),
         model: str = typer.Option(None, help="audit one embedded model (builtin:tiny-moe or builtin:tiny-mixtral) "
                                              "into OUT as a run directory", show_default="both, side by side")) -> None:
    """The whole audit (all five experiments, then the report) of both embedded models and corpus, side by side."""
    from moeaudit.config import demo_configs

    try:
        configs = demo_configs(model)
    except expected_errors() as exc:
        raise fail(exc, flag_names("model", "out")) from None
    if len(configs) == 1:
        _execute(configs[0], out, True)
        return
    if (out / "manifest.json").is_file():
        raise fail(FileExistsError(f"out={str(out)!r} holds one run (an earlier demo, or --model); the two-model "
                                   "demo writes a run directory per model under OUT. Pass another --out, or "
                                   "--model to resume that run."), flag_names("out"))
    start = time.perf_counter()
    for cfg in configs:
        _execute(cfg, out / cfg.label, False)
    from moeaudit.report import write_report

    console = make_console()
    with status(console, f"writing the report of both models to {out}"):
        paths = write_report([out / cfg.label for cfg in configs], out)
    console.print(f"demo of {len(configs)} models in {time.perf_counter() - start:.1f} s; report: "
                  f"{escape(paths['html'])}", highlight=False)


@app.command("report")
def report_cmd(runs: list[Path] = typer.Argument(..., help="one or more run directories"),
               out: Path = typer.Option(None, help="output directory (default: the run directory for one run, "
                                                   "./moeaudit-report for several)")) -> None:
    """Regenerate the report from stored records; several runs are set side by side."""
    target = out or (runs[0] if len(runs) == 1 else Path("moeaudit-report"))
    console = make_console()
    try:
        for run in runs:
            if run.exists() and not run.is_dir():
                raise FileExistsError(f"{str(run)!r} is a file, not a run directory; pass the directory a run wrote "
                                      "(the one holding manifest.json).")
        if target.exists() and not target.is_dir():
            raise FileExistsError(f"out={str(target)!r} is an existing file, not a directory; pass a directory for "
                                  "the report.")
        from moeaudit.report import write_report

        with status(console, f"writing the report of {len(runs)} run(s) to {target}"):
            paths = write_report(runs, target)
    except expected_errors() as exc:
        raise fail(exc, flag_names("out")) from None
    console.print(f"report: {escape(paths['html'])} and {escape(paths['markdown'])}, figures in "
                  f"{escape(paths['figures'])}", highlight=False)


def _execute(cfg, out: Path, report: bool, execution=None, *, allow_fewer: bool = False,
             trust_remote_code: bool = False) -> None:
    from moeaudit.run.pipeline import run_audit

    console = make_console()
    start = time.perf_counter()
    shard = f" (shard {execution.shard})" if execution is not None and execution.shard is not None else ""
    header(console, f"[bold]moeaudit run[/bold] {escape(cfg.label)}{shard} -> {escape(out)}")
    try:
        with RichProgress(console, RUN_FLAGS) as progress:
            result = run_audit(cfg, out, progress=progress, report=report, execution=execution,
                               allow_fewer=allow_fewer, trust_remote_code=trust_remote_code)
    except expected_errors() as exc:
        raise fail(exc, RUN_FLAGS) from None
    except KeyboardInterrupt as exc:
        raise interrupted(exc, out) from None
    tables = result.tables
    # The console shows what decides, under short headers so an 80-column terminal keeps metric names whole; the
    # measured level and p_perm are in tables/*.csv and the report.
    cols = {"layer": "layer", "metric": "metric", "n": "n", "cohens_d": "d", "p_mean_greater_holm": "p (Holm)",
            "decision": "decision"}
    for name, title in (("audit", "audit (Definition 2.1)"), ("control", "routing-weight control")):
        if len(tables[name]):
            shown = tables[name][[c for c in cols if c in tables[name]]].rename(columns=cols)
            console.print(rich_table(title, shown))
            console.print(decision_counts(tables[name], name), highlight=False)
    for kind, p in result.positions.items():
        if p["n"] < p["requested"]:
            key = "--n" if kind == "single" else "--n-progressive"
            console.print(f"{kind} cells ran with n = {p['n']} positions, fewer than {key} {p['requested']}: the "
                          f"corpus has no more (--allow-fewer)", highlight=False)
    arms = tables.get("progressive_arms")  # counted by the table's decision, as the report counts them
    if arms is not None and len(arms):
        counts = arms["decision"].value_counts()
        console.print(f"progressive removal orders, {len(arms)} paired comparisons: "
                      + ", ".join(f"{int(n)} {decision}" for decision, n in counts.items())
                      + f" (margin {margin_rule(arms)}; details in the report)", highlight=False)
    console.print(f"{len(result.records):,} ablation records ({len(result.computed_cells)} cells computed, "
                  f"{len(result.resumed_cells)} resumed) in {time.perf_counter() - start:.1f} s -> {escape(out)}",
                  highlight=False)
    if result.report:
        console.print(f"report: {escape(result.report['html'])}", highlight=False)
