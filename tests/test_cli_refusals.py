"""Bad input and faults on the command line, as a user meets them: every case runs ``python -m moeaudit`` as a
subprocess and checks the exit status, that stderr is ONE line naming the problem and the fix (with CLI flags, not
keyword arguments), and that nothing is left on disk (or, for an existing run directory, that nothing changed).

Most refusals come before torch is imported (well under a second each); the few that need the model's tokenizer or
weights use the embedded model or a tiny saved checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import moeaudit
from moeaudit.config import RunConfig
from moeaudit.models._checkpoint import locate_model, model_identity
from moeaudit.rundir import FORMAT_VERSION

SRC = str(Path(moeaudit.__file__).resolve().parents[1])
SMALL = {"layers": "7", "n": "12", "n_docs": "2", "n_docs_progressive": "2", "max_length": "32",
         "experiments": "audit", "n_boot": "40", "device": "cpu"}


def _flags(values: dict[str, str]) -> list[str]:
    return [a for k, v in values.items() for a in (f"--{k.replace('_', '-')}", v)]


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]), **(env or {})}
    return subprocess.run([sys.executable, "-m", "moeaudit", *args], cwd=cwd, capture_output=True, text=True,
                          env=environ, timeout=timeout)


def snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under ``root`` with a hash of its bytes: equal snapshots = nothing changed."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def refused(result: subprocess.CompletedProcess, *fragments: str, code: int = 2) -> str:
    """Assert a one-line refusal holding every fragment; return the line."""
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error: ") and "Traceback" not in result.stderr, line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


def test_bad_input_is_refused_in_one_line_before_any_work(tmp_path):
    """Configuration values, the output path, model paths and corpus files: refused before torch is imported."""
    (tmp_path / "afile").write_text("not a directory")
    (tmp_path / "latin1.txt").write_bytes("Un café au lait.\n\nDeux crème brûlée.\n".encode("latin-1"))
    (tmp_path / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (tmp_path / "docs.jsonl").write_text('{"body": "some text"}\n')
    (tmp_path / "remote.toml").write_text('model = "builtin:tiny-moe"\ntrust_remote_code = true\n')
    markup = tmp_path / "[red]odd[/x] corpus.txt"  # rich markup in a path: printed as written, never parsed
    cases = [
        (["--seed", "-1"], ["--seed=-1 is too small", "use at least 0"]),
        (["--layers", "3,3"], ["--layers=3,3 names layer 3 more than once", "list each layer once"]),
        (["--device", "banana"], ["--device='banana' is not a device", "valid: auto, cpu, cuda, cuda:N, mps"]),
        (["--encoding", "utf-9"], ["--encoding='utf-9' is not a text encoding", "e.g. utf-8, latin-1"]),
        (["remote.toml"], ["'remote.toml': trust_remote_code cannot be set in a configuration file",
                           "the command-line flag --trust-remote-code"]),
        (["--out", "afile"], ["--out='afile' is an existing file, not a directory", "pass a directory"]),
        (["--model", "./no-such-checkpoint"], [f"no such directory ('{tmp_path / 'no-such-checkpoint'}')",
                                               "pass an existing checkpoint directory"]),
        (["--corpus", "latin1.txt"], [f"corpus file '{tmp_path / 'latin1.txt'}' is not valid utf-8 (byte 0xe9 on "
                                      "line 1)", "pass --encoding naming the file's encoding"]),
        (["--corpus", "binary.txt"], ["holds NUL bytes, so it is binary, not text"]),
        (["--corpus", "docs.jsonl"], ["line 1 has no 'text' field; pass --text-field to name the field"]),
        (["--corpus", str(markup.relative_to(tmp_path))], [f"corpus file '{markup}' does not exist",
                                                           "Pass an existing .txt"]),
    ]
    if importlib.util.find_spec("ray") is not None:
        cases.append((["--device", "auto", "--device-map", "auto", "--executor", "ray"],
                      ["--executor ray loads the whole model on one device per actor, but --device-map='auto'",
                       "run with --executor local, and split the work over machines with --shard I/N"]))
    before = snapshot(tmp_path)
    for args, fragments in cases:
        out = ["--out", "run"] if "--out" not in args else []
        refused(cli("run", *_flags(SMALL), *args, *out, cwd=tmp_path), *fragments)
        assert snapshot(tmp_path) == before, args
    # the same file with its encoding named is read (and fails later only for want of positions, as it should)
    line = refused(cli("run", *_flags(SMALL), "--corpus", "latin1.txt", "--encoding", "latin-1", "--min-length",
                       "2", "--n", "500", "--out", "run", cwd=tmp_path), "valid positions", "--allow-fewer")
    assert "utf-8" not in line and snapshot(tmp_path) == before


def test_hub_ids_fail_fast_offline(tmp_path):
    """A hub id that is neither cached nor reachable: one line at once (no retries), saying what to do."""
    env = {"HF_HUB_CACHE": str(tmp_path / "hub-cache")}
    offline = cli("run", *_flags(SMALL), "--model", "some-org/absent-moe", "--out", "run", cwd=tmp_path,
                  env={**env, "HF_HUB_OFFLINE": "1"})
    refused(offline, "'some-org/absent-moe' is not a local directory (no such directory", "not in the hub cache",
            "while HF_HUB_OFFLINE is set", "`hf download some-org/absent-moe`")
    unreachable = cli("run", *_flags(SMALL), "--model", "some-org/absent-moe", "--out", "run", cwd=tmp_path,
                      env={**env, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"})
    refused(unreachable, "the hub (http://127.0.0.1:9) is unreachable", "and it is not in the hub cache",
            "pass an existing checkpoint directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_unusable_device_is_refused_before_loading(tmp_path):
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        refused(cli("run", *_flags(SMALL), "--device", f"cuda:{count}", "--out", "run", cwd=tmp_path),
                f"--device='cuda:{count}' but this machine has {count} CUDA device(s)")
    else:
        refused(cli("run", *_flags(SMALL), "--device", "cuda", "--out", "run", cwd=tmp_path),
                "--device='cuda' but no CUDA GPU is usable here", "use --device=cpu")
    assert not list(tmp_path.iterdir())


def _fake_run(path: Path, cwd: Path) -> None:
    """A finished run directory of ``SMALL`` as the CLI would resume it (manifest, config.toml, one cell)."""
    config = RunConfig.from_mapping(SMALL).with_resolved_paths()
    manifest = {"format_version": FORMAT_VERSION, "tool": "moeaudit", "config": config.to_dict(),
                "status": "complete", "created": "2025-01-01T00:00:00+00:00", "sessions": [],
                "model_identity": model_identity(locate_model(config.model))}
    (path / "records").mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps(manifest))
    (path / "config.toml").write_text(config.to_toml())
    pd.DataFrame({"layer": [7] * 50, "delta": [0.5] * 50}).to_parquet(path / "records" / "L007-single.parquet")


def test_damaged_run_directories_are_refused_in_one_line_and_left_alone(tmp_path):
    _fake_run(tmp_path / "base", tmp_path)

    def manifest_edit(edit):
        def apply(run: Path) -> None:
            m = json.loads((run / "manifest.json").read_text())
            (run / "manifest.json").write_text(json.dumps(edit(m)))
        return apply

    def truncate(run: Path) -> None:
        cell = run / "records" / "L007-single.parquet"
        cell.write_bytes(cell.read_bytes()[:100])

    cases = [
        (manifest_edit(lambda m: []), ["manifest.json' is damaged (it holds a JSON list, not an object)",
                                       "restore it from a backup copy, or move the run directory aside"]),
        (manifest_edit(lambda m: {**m, "sessions": "none"}), ["is damaged (its 'sessions' is str, not a list)"]),
        (manifest_edit(lambda m: {**m, "config": {**m["config"], "note": "x"}}),
         ["stores configuration key(s) 'note' that moeaudit does not have",
          "delete them from its \"config\" to resume this run, or run into another directory (--out)"]),
        (manifest_edit(lambda m: {**m, "config": {**m["config"], "seed": 3}}),
         ["holds a run with a different configuration (seed: stored 3, requested 0)",
          "Choose another run directory (--out)"]),
        (truncate, ["L007-single.parquet' is damaged (not a readable Parquet file",
                    "delete it to recompute that cell, then run the same command again"]),
    ]
    for damage, fragments in cases:
        run = tmp_path / "run"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(tmp_path / "base", run)
        damage(run)
        before = snapshot(run)
        line = refused(cli("run", *_flags(SMALL), "--out", str(run), cwd=tmp_path), *fragments)
        assert snapshot(run) == before, line
        if "seed" in line:  # config.toml holds seed 0, not the stored 3: advising it would be circular
            assert "config.toml" not in line
    refused(cli("report", str(tmp_path / "base"), "--out", str(tmp_path / "base" / "config.toml"), cwd=tmp_path),
            "--out='", "config.toml' is an existing file, not a directory")


def _checkpoint(path: Path, seed: int) -> Path:
    """A tiny OLMoE checkpoint with the embedded model's tokenizer (kilobytes; saved in milliseconds)."""
    from moeaudit.models import load_tokenizer
    from moeaudit.testing import tiny_model

    tokenizer = load_tokenizer("builtin:tiny-moe")
    tiny_model("olmoe", seed=seed, vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_resume_with_another_model_is_refused(tmp_path, monkeypatch):
    """The issue's case: a run resumed after the checkpoint at its path changed, or from another folder where
    the same relative path names another checkpoint, is refused before any work; the stored config.toml resumes
    the run from anywhere."""
    from moeaudit.run.pipeline import run_audit

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    original = _checkpoint(tmp_path / "a" / "ckpt", seed=0)
    flags = {**SMALL, "model": "ckpt", "layers": "1", "n": "8"}
    monkeypatch.chdir(tmp_path / "a")
    run = tmp_path / "run"
    first = run_audit(RunConfig.from_mapping(flags), run, report=False)
    assert first.computed_cells == ["L1-single"]
    stored = json.loads((run / "manifest.json").read_text())
    assert stored["config"]["model"] == str(original) and stored["model_identity"]["kind"] == "local"
    assert 'model = "' + str(original) + '"' in (run / "config.toml").read_text()

    shutil.copytree(original, tmp_path / "saved")
    _checkpoint(original, seed=1)  # other weights, same sizes
    before = snapshot(run)
    refused(cli("run", *_flags(flags), "--no-report", "--out", str(run), cwd=tmp_path / "a"),
            f"'{run}' was started with another model (model.safetensors changed (same size, other contents))",
            "restore the checkpoint the run was started with")
    config = json.loads((original / "config.json").read_text())
    (original / "config.json").write_text(json.dumps({**config, "note": "edited"}, indent=2))
    refused(cli("run", *_flags(flags), "--no-report", "--out", str(run), cwd=tmp_path / "a"),
            "config.json", " -> ", " bytes; model.safetensors changed", "Run into another directory (--out)")
    shutil.rmtree(original)
    shutil.copytree(tmp_path / "saved", original)

    shutil.copytree(original, tmp_path / "b" / "ckpt")  # the same relative path, in another folder
    refused(cli("run", *_flags(flags), "--no-report", "--out", str(run), cwd=tmp_path / "b"),
            f"model: stored '{original}', requested '{tmp_path / 'b' / 'ckpt'}'",
            f"resume it with its stored configuration: moeaudit run '{run / 'config.toml'}' --out '{run}'")
    assert snapshot(run) == before

    # as an earlier version wrote it: trust_remote_code stored, no encoding key, no model identity
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["config"] = {**{k: v for k, v in manifest["config"].items() if k != "encoding"},
                          "trust_remote_code": False}
    del manifest["model_identity"]
    (run / "manifest.json").write_text(json.dumps(manifest))
    (run / "config.toml").write_text((run / "config.toml").read_text() + "trust_remote_code = false\n")
    monkeypatch.chdir(tmp_path / "b")  # the stored config.toml names the original checkpoint from anywhere
    again = run_audit(RunConfig.from_toml(run / "config.toml"), run, report=False)
    assert again.computed_cells == [] and again.resumed_cells == ["L1-single"]
    pd.testing.assert_frame_equal(again.records, first.records)
    resumed = json.loads((run / "manifest.json").read_text())
    assert resumed["model_identity"] == stored["model_identity"] and resumed["config"] == stored["config"]


class _RunsCode:
    """A pickle that runs a shell command when loaded unrestricted (what a malicious pytorch_model.bin does)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_refusals_that_need_the_model_leave_nothing_behind(tmp_path):
    """Layers are checked against the loaded model before observing, the positions bound against the tokenised
    corpus before any ablation, and a pickled weight file that would run code is refused by torch's safe loader."""
    from moeaudit.models import load_tokenizer
    from moeaudit.testing import tiny_model

    tokenizer = load_tokenizer("builtin:tiny-moe")
    deepseek = tmp_path / "deepseek"
    tiny_model("deepseek_v2", seed=0, vocab_size=len(tokenizer)).save_pretrained(deepseek)
    tokenizer.save_pretrained(deepseek)
    evil = tmp_path / "evil"
    evil.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(deepseek / name, evil / name)
    marker = tmp_path / "code-ran"
    torch.save({"x": _RunsCode(f"touch {marker}")}, evil / "pytorch_model.bin")
    before = snapshot(tmp_path)
    refused(cli("run", *_flags(SMALL), "--model", str(deepseek), "--layers", "0,1,99", "--out", "run",
                cwd=tmp_path),
            "--layers=0,1,99: 0, 99 not MoE layer(s)", "(0 dense, 4 decoder layers in all)",
            "pick from its MoE layers 1,2,3, or leave --layers unset")
    refused(cli("run", *_flags(SMALL), "--n", "5000", "--out", "run", cwd=tmp_path),
            "--n=5000 positions per cell, but the corpus's 2 sequences (--n-docs=2, --max-length=32",
            "have only 62 valid positions", "pass --allow-fewer to run with 62")
    refused(cli("run", *_flags(SMALL), "--model", str(evil), "--out", "run", cwd=tmp_path),
            "torch's safe loader refused a pickled weight file (it asks to run posix.system",
            "use a .safetensors checkpoint")
    assert not marker.exists()
    assert snapshot(tmp_path) == before


def test_allow_fewer_runs_with_the_positions_there_are_and_says_so(tmp_path, monkeypatch):
    """The other answer to a corpus with fewer positions than n (in-process: the refusal is tested above)."""
    from typer.testing import CliRunner

    from moeaudit.cli import app
    from moeaudit.report import _fewer_positions

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["run", *_flags(SMALL), "--n", "100", "--allow-fewer", "--no-report",
                                      "--out", "run"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "the corpus has 62 valid positions for --n=100; running with 62 (--allow-fewer)" in out
    assert "single cells ran with n = 62 positions, fewer than --n 100" in out
    assert "62/62" in out and "100/100" not in out, "the bar counts what ran"
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["positions"] == {"single": {"requested": 100, "available": 62, "n": 62}}
    audit = pd.read_csv(tmp_path / "run" / "tables" / "audit.csv")
    assert (audit["n"] == 62).all()
    note = _fewer_positions(type("Run", (), {"manifest": manifest})())
    assert note.startswith("**Fewer positions than asked for.**") and "n = 62 positions per cell instead of the " \
        "100 asked for" in note


def test_sigterm_is_handled_like_ctrl_c(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "moeaudit", "run", *_flags(SMALL), "--out", str(out)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])})
    deadline = time.monotonic() + 120
    while not (out / "manifest.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.strip().splitlines() == [f"terminated (SIGTERM); finished cells are kept in {out}. Run the same "
                                           "command again to resume."]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and "Terminated" in manifest["sessions"][-1]["error"]
    assert not (out / ".lock").exists()


@pytest.mark.parametrize("command", [["inspect", "{path}"], ["verify", "--model", "{path}"]])
def test_inspect_and_verify_refuse_in_one_line(tmp_path, command):
    path = tmp_path / "[bold]no such[/x]"
    args = [a.format(path=path) for a in command]
    refused(cli(*args, cwd=tmp_path), f"model '{path}': no such directory")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9\n")
    refused(cli(*[a.format(path="builtin:tiny-moe") for a in command], "--corpus", "bad.txt", cwd=tmp_path),
            "is not valid utf-8", "pass --encoding")


MAP_SMALL = {"layers": "1", "n": "6", "n_docs": "2", "max_length": "32", "min_length": "8", "device": "cpu"}


def test_map_and_prune_eval_refuse_like_run(tmp_path):
    """map and prune-eval share run's checks before any work: the device, the output path, the model's path, both
    corpus files' text (naming --encoding), remote code asked for by a configuration file; nothing left behind."""
    (tmp_path / "afile").write_text("not a directory")
    (tmp_path / "latin1.txt").write_bytes("Un café au lait.\n\nDeux crème brûlée.\n".encode("latin-1"))
    (tmp_path / "remote.toml").write_text('model = "builtin:tiny-moe"\ntrust_remote_code = true\n')
    latin = f"corpus file '{tmp_path / 'latin1.txt'}' is not valid utf-8 (byte 0xe9 on line 1)"
    cases = [
        (["--device", "banana"], ["--device='banana' is not a device"]),
        (["--encoding", "utf-9"], ["--encoding='utf-9' is not a text encoding"]),
        (["--out", "afile"], ["--out='afile' is an existing file, not a directory"]),
        (["--model", "./nope"], [f"no such directory ('{tmp_path / 'nope'}')"]),
        (["--corpus", "latin1.txt"], [latin, "pass --encoding naming the file's encoding"]),
        (["remote.toml"], ["trust_remote_code cannot be set in a configuration file", "--trust-remote-code"]),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], ["--device='cuda' but no CUDA GPU is usable here"]))
    before = snapshot(tmp_path)
    for command in ("map", "prune-eval"):
        for args, fragments in cases:
            out = ["--out", "run"] if "--out" not in args else []
            refused(cli(command, *_flags(MAP_SMALL), *args, *out, cwd=tmp_path), *fragments)
            assert snapshot(tmp_path) == before, (command, args)
    refused(cli("prune-eval", *_flags(MAP_SMALL), "--eval-corpus", "latin1.txt", "--folds", "1", "--out", "run",
                cwd=tmp_path),
            latin, "--encoding")
    assert snapshot(tmp_path) == before
    # refusals that need the model's geometry or the tokenised corpus: still before any ablation, still flag names
    needs_model = [
        ("map", ["--layers", "99"], ["--layers=99: 99 not MoE layer(s) of 'builtin:tiny-moe'", "leave --layers unset"]),
        ("prune-eval", ["--fractions", "0.99"], ["--fractions=0.99 removes 16 of 16 experts",
                                                 "Use a fraction of at most 0.75"]),
        ("prune-eval", ["--criteria", "bogus,reap"], ["--criteria=bogus,reap: 'bogus' is not a criterion"]),
        ("prune-eval", ["--n-docs-eval", "1000"], ["asks for 1002 (--n-docs=2 + --n-docs-eval=1000)",
                                                   "Lower --n-docs or --n-docs-eval or --min-length"]),
    ]
    for command, args, fragments in needs_model:
        refused(cli(command, *_flags(MAP_SMALL), *args, "--out", "run", cwd=tmp_path), *fragments)
        assert snapshot(tmp_path) == before, (command, args)


def test_map_resume_with_another_model_is_refused(tmp_path, monkeypatch):
    """A map run directory is bound to its model like an audit's: relative paths stored absolute, the weights
    fingerprinted, a resume after the checkpoint changed refused before any work, the same model resumed."""
    from moeaudit.pruning import MapConfig
    from moeaudit.run._prune import importance_map

    original = _checkpoint(tmp_path / "ckpt", seed=0)
    monkeypatch.chdir(tmp_path)
    config = MapConfig.from_mapping({**MAP_SMALL, "model": "ckpt"})
    run = tmp_path / "map"
    first = importance_map(config, run, report=False)
    stored = json.loads((run / "manifest.json").read_text())
    assert stored["config"]["model"] == str(original) and stored["model_identity"]["kind"] == "local"
    assert "model.safetensors" in stored["model_identity"]["files"]
    assert 'model = "' + str(original) + '"' in (run / "config.toml").read_text()
    _checkpoint(original, seed=1)  # other weights, same sizes
    before = snapshot(run)
    refused(cli("map", *_flags({**MAP_SMALL, "model": "ckpt"}), "--no-report", "--out", str(run), cwd=tmp_path),
            f"'{run}' was started with another model (model.safetensors changed (same size, other contents))",
            "Run into another directory (--out)")
    assert snapshot(run) == before
    _checkpoint(original, seed=0)  # the original weights again: resumes without recomputing
    again = importance_map(config, run, report=False)
    pd.testing.assert_frame_equal(again.importance, first.importance)
    # a directory holds one kind of run: an audit or a prune-eval into a map directory is refused as such
    before = snapshot(run)
    for command in ("run", "prune-eval"):
        audit_only = ["--experiments", "audit"] if command == "run" else []  # stability needs 4 documents
        refused(cli(command, *_flags({**MAP_SMALL, "model": "ckpt"}), *audit_only, "--out", str(run), cwd=tmp_path),
                f"'{run}' holds a `moeaudit map` run, not a `moeaudit {command}` one",
                "Choose another run directory (--out), or resume it with `moeaudit map`")
    assert snapshot(run) == before
