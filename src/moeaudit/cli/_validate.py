"""``moeaudit validate``: calibration and power of a run's tests, from its own records."""

from __future__ import annotations

from pathlib import Path

import typer

from moeaudit.cli._app import app
from moeaudit.cli._common import expected_errors, fail, make_console


@app.command()
def validate(run_dir: Path = typer.Argument(..., help="a run directory written by `moeaudit run` or `demo`"),
             report: bool = typer.Option(True, help="rewrite the run's report with the validation section"),
             n_families: int = typer.Option(200, help="family draws of the null (each cell gets this many)"),
             n_power_draws: int = typer.Option(40, help="planted metrics per layer and strength")) -> None:
    """Null calibration (rejection rate of each test when the null holds by construction), the family-wise rate
    under the correction, power against planted metrics and the minimum detectable d; writes validation.json.
    Reuses the run's records only: no model, no new ablation."""
    import time

    from rich.table import Table

    from moeaudit.run._validate import validate as run_validation

    console = make_console()
    start = time.perf_counter()
    try:
        result = run_validation(run_dir, n_families=n_families, n_power_draws=n_power_draws)
    except expected_errors() as exc:
        raise fail(exc) from None
    table = Table(title=f"null calibration at α = {result['alpha']} (random pairs of active experts)")
    for column in ("test", "rejection rate", "95% CI", "draws"):
        table.add_column(column)
    for test, r in result["null_rate"].items():
        table.add_row(test, f"{r['rate']:.4f}", f"[{r['ci_low']:.4f}, {r['ci_high']:.4f}]", str(r["n_draws"]))
    console.print(table)
    f = result["fwer"]
    console.print(f"family-wise rate of the old token-level rule (no longer decides) over {f['family_size']} {result['family']} cells at "
                  f"α = {f['alpha_corrected']:.3g} each: {f['rate']:.3f} [{f['ci_low']:.3f}, {f['ci_high']:.3f}] "
                  f"({f['n_draws']} families)")
    mde = result["mde_d"]
    console.print(f"minimum detectable d (80% power, the old token-level rule at the corrected level, the run's n): "
                  f"{'not reached by 0.8' if mde != mde else f'{mde:.3f}'}")
    console.print(f"validation.json written to {run_dir} in {time.perf_counter() - start:.1f} s")
    if report:
        from moeaudit.report import write_report

        try:
            paths = write_report([run_dir], run_dir)
        except expected_errors() as exc:
            raise fail(exc) from None
        console.print(f"report: {paths['html']}")
