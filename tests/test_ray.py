"""The Ray executor on a local CPU cluster: two actors equal the single-process run; a cell whose actor crashes is
retried (the actor restarted) and a cell that keeps failing stops the run by name without leaving anything
half-written (one actor each, to keep process start-ups few; one local cluster shared by the module's tests)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pandas as pd
import pytest

from moeaudit.config import RunConfig
from moeaudit.errors import ExecutorError
from moeaudit.run.execution import Execution
from moeaudit.run.pipeline import run_audit
from moeaudit.rundir import RunDirectory

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'moeaudit[ray]'; the test extra and CI "
                                        "install it)")
pytestmark = pytest.mark.slow

CONFIG = RunConfig(model="builtin:tiny-moe", name="tiny", corpus="builtin", n_docs=6, n_docs_progressive=8,
                   max_length=96, layers=(1, 5), n=12, n_progressive=8, n_boot=100, device="cpu", dtype="float32",
                   experiments=("audit", "control", "rank_validity", "progressive", "redistribution"))


@pytest.fixture(scope="module")
def cluster():
    # Hooks defined here travel to the actors by value (the workers cannot import this test module). The workers
    # inherit OMP_NUM_THREADS=1 (conftest), so actors compute with one thread like the reference run: on CPU the
    # last bits of a loss depend on the thread count, and the records are bit-identical only at equal counts.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20,
             log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    out = tmp_path_factory.mktemp("ray") / "local"
    return out, run_audit(CONFIG, out, report=False)


class CrashOnce:
    """Kill the actor's process the first time it starts ``cell`` (a marker file remembers across restarts)."""

    def __init__(self, cell: str, marker: Path) -> None:
        self.cell, self.marker = cell, marker

    def __call__(self, name: str) -> None:
        if name == self.cell and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os._exit(1)


class AlwaysFail:
    def __init__(self, cell: str) -> None:
        self.cell = cell

    def __call__(self, name: str) -> None:
        if name == self.cell:
            raise RuntimeError(f"injected failure in {name}")


def test_two_ray_actors_equal_the_single_process_run(cluster, local, tmp_path):
    out, reference = local
    result = run_audit(CONFIG, tmp_path / "ray", report=False, execution=Execution(executor="ray", ray_actors=2))
    pd.testing.assert_frame_equal(result.records, reference.records)
    assert (tmp_path / "ray" / "summary.csv").read_bytes() == (out / "summary.csv").read_bytes()
    execution = json.loads((tmp_path / "ray" / "manifest.json").read_text())["sessions"][-1]["execution"]
    assert execution["executor"] == "ray" and len(execution["actors"]) == 2 and execution["retries"] == {}
    assert {a["pid"] for a in execution["actors"]} != {os.getpid()} and all(
        a["verification_passed"] and a["device"] == "cpu" and a["threads"] == 1 for a in execution["actors"])
    assert sorted(result.computed_cells) == ["L1-progressive", "L1-single", "L5-progressive", "L5-single"]


def test_a_crashed_cell_is_retried_and_a_failing_one_stops_the_run_by_name(cluster, local, tmp_path):
    out, reference = local
    marker = tmp_path / "crashed"
    result = run_audit(CONFIG, tmp_path / "crash", report=False, execution=Execution(
        executor="ray", ray_actors=1, before_cell=CrashOnce("L5-single", marker)))
    assert marker.exists(), "the injected crash did not happen"
    pd.testing.assert_frame_equal(result.records, reference.records)
    assert (tmp_path / "crash" / "summary.csv").read_bytes() == (out / "summary.csv").read_bytes()
    execution = json.loads((tmp_path / "crash" / "manifest.json").read_text())["sessions"][-1]["execution"]
    assert execution["retries"] == {"L5-single": 1}

    with pytest.raises(ExecutorError, match=r"cell L1-progressive failed 2 times on Ray actors \(max_retries=1\); "
                                            r"nothing of it was written\. Last error: .*injected failure"):
        run_audit(CONFIG, tmp_path / "fail", report=False, execution=Execution(
            executor="ray", ray_actors=1, max_retries=1, before_cell=AlwaysFail("L1-progressive")))
    run_dir = RunDirectory(tmp_path / "fail")
    assert ("progressive", 1) not in run_dir.finished_cells() and not list(run_dir.path.rglob(".tmp-*"))
    manifest = json.loads((tmp_path / "fail" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "L1-progressive" in manifest["sessions"][-1]["error"]
