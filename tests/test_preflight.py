"""Checks before work, in-process: model sources, checkpoint fingerprints and what they detect, the positions bound
(against a brute-force count), SIGTERM as an interrupt, and the CLI's rewriting of keyword references into flags."""

from __future__ import annotations

import json
import os
import signal
import struct

import numpy as np
import pytest

from moeaudit.config import RunConfig
from moeaudit.corpus import valid_positions
from moeaudit.errors import ConfigError, ModelSourceError
from moeaudit.models._checkpoint import (
    fingerprint,
    identity_changes,
    locate_model,
    looks_like_path,
    model_identity,
    resolve_model_name,
)
from moeaudit.run._preflight import check_positions


def test_model_names_are_paths_hub_ids_or_builtin(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path in ("/abs/ckpt", "./ckpt", "../ckpt", "~/ckpt", "ckpt/", "a/b/c", "bad name"):
        assert looks_like_path(path), path
    for hub_id in ("allenai/OLMoE-1B-7B-0924", "gpt2", "Qwen/Qwen1.5-MoE-A2.7B"):
        assert not looks_like_path(hub_id) and resolve_model_name(hub_id) == hub_id
    assert resolve_model_name("./ckpt") == str(tmp_path / "ckpt")
    assert resolve_model_name("builtin:tiny-moe") == "builtin:tiny-moe"
    builtin = locate_model("builtin:tiny-moe")
    assert builtin.kind == "builtin" and (builtin.directory / "config.json").is_file()
    with pytest.raises(ModelSourceError, match="no such directory"):
        locate_model("./missing")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="is a file, not a checkpoint directory"):
        locate_model("file.bin")


def _safetensors(path, payload: bytes, header: dict | None = None) -> None:
    head = json.dumps(header or {"w": {"dtype": "U8", "shape": [len(payload)], "data_offsets": [0, len(payload)]}})
    path.write_bytes(struct.pack("<Q", len(head)) + head.encode() + payload)


def test_fingerprint_samples_large_weight_files_and_detects_changes(tmp_path):
    """Small files are hashed whole; a weight file over 8 MiB by its size, its safetensors header and 65 pages
    of 4 KiB spread over the data. A change in a sampled page, the header or the size is detected; a byte between
    samples is not (the documented limit)."""
    size = 9 << 20
    payload = bytearray(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "olmoe"}')
    (ckpt / "README.md").write_text("a model card: not part of the model")
    _safetensors(ckpt / "model.safetensors", bytes(payload))
    base = fingerprint(ckpt)
    assert set(base) == {"config.json", "model.safetensors"}
    assert base["model.safetensors"]["sha256"].startswith("sampled:")
    assert not base["config.json"]["sha256"].startswith("sampled:")
    (ckpt / "README.md").write_text("edited card")
    assert fingerprint(ckpt) == base

    header_len = len(json.dumps({"w": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}})) + 8
    span = size - 4096
    sampled_page = span * 32 // 64  # the middle sample's offset in the data
    gap = sampled_page + 4096 + 100  # a byte no sample reads
    for offset, detected in ((sampled_page + 7, True), (size - 1, True), (gap, False)):
        changed = bytearray(payload)
        changed[offset] ^= 0xFF
        _safetensors(ckpt / "model.safetensors", bytes(changed))
        changes = identity_changes({"kind": "local", "name": "x", "files": base},
                                   {"kind": "local", "name": "x", "files": fingerprint(ckpt)})
        assert changes == (["model.safetensors changed (same size, other contents)"] if detected else []), offset
    _safetensors(ckpt / "model.safetensors", bytes(payload),
                 header={"v": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}})  # renamed tensor
    assert fingerprint(ckpt)["model.safetensors"] != base["model.safetensors"]
    _safetensors(ckpt / "model.safetensors", bytes(payload[:-4096]))
    (ckpt / "extra.py").write_text("print('remote code')")
    changes = identity_changes({"kind": "local", "name": "x", "files": base},
                               {"kind": "local", "name": "x", "files": fingerprint(ckpt)})
    assert changes == ["extra.py added", f"model.safetensors {header_len + size:,} -> "
                                          f"{header_len + size - 4096:,} bytes"]
    assert identity_changes({"kind": "local", "name": "/a"}, {"kind": "local", "name": "/b"}) == \
        ["model '/a' -> '/b'"]
    assert identity_changes({"kind": "hub", "name": "o/m", "revision": "a" * 40, "files": None},
                            {"kind": "hub", "name": "o/m", "revision": "b" * 40, "files": None}) == \
        ["hub revision aaaaaaaaaaaa -> bbbbbbbbbbbb"]


def test_builtin_identity_is_stable():
    a, b = (model_identity(locate_model("builtin:tiny-moe")) for _ in range(2))
    assert a == b and a["kind"] == "builtin" and "model.safetensors" in a["files"]


def test_hub_id_from_the_cache_offline(tmp_path, monkeypatch):
    """A hub id cached by an earlier download loads offline from its snapshot, with its commit as revision."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    source = locate_model("org/tiny")
    assert (source.kind, source.directory, source.revision, source.local_files_only) == \
        ("hub", snapshot, commit, True)
    assert model_identity(source)["files"] == {"config.json": {"size": 2, "sha256": fingerprint(snapshot)[
        "config.json"]["sha256"]}}
    with pytest.raises(ModelSourceError, match="not in the hub cache"):
        locate_model("org/other")


def test_positions_bound_counts_valid_positions_like_brute_force():
    lengths = [40, 7, 1, 25]
    for min_context in (1, 3, 10):
        cfg = RunConfig(n=12, n_progressive=1, min_context=min_context, n_docs=4, n_docs_progressive=4)
        brute = sum(len(valid_positions(n, min_context)) for n in lengths)
        assert brute == sum(max(n - max(min_context, 1), 0) for n in lengths)
        got = check_positions(cfg, {"single": lengths, "progressive": lengths}, allow_fewer=False)
        assert got["single"].available == got["progressive"].available == brute
        with pytest.raises(ConfigError, match=f"have only {brute} valid positions.*allow_fewer=True"):
            check_positions(cfg.replace(n=brute + 1), {"single": lengths}, allow_fewer=False)
        fewer = check_positions(cfg.replace(n=brute + 1), {"single": lengths}, allow_fewer=True)["single"]
        assert (fewer.requested, fewer.available, fewer.n) == (brute + 1, brute, brute)
    with pytest.raises(ConfigError, match="have only 2 valid positions; lower n=, use more or longer documents"
                                          r" \(n_docs=, max_length=\)\.$"):
        check_positions(RunConfig(n=3), {"single": [3]}, allow_fewer=True)  # fewer than a paired test needs
    with pytest.raises(ConfigError, match="all lie in one document"):
        check_positions(RunConfig(n=3), {"single": [60]}, allow_fewer=False)


def test_sigterm_becomes_an_interrupt_only_inside_a_run():
    from moeaudit.run._interrupt import Terminated, sigterm_as_interrupt

    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with pytest.raises(KeyboardInterrupt) as err, sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
    assert isinstance(err.value, Terminated) and err.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_cli_names_flags_not_keywords():
    from moeaudit.cli._common import cli_message, flag_names

    flags = flag_names("text_field", "seed", "allow_fewer", "n", "report", n_samples="--n")
    assert cli_message("pass text_field= to name it.", flags) == "pass --text-field to name it."
    assert cli_message("seed=-1 is too small; n=5 (n_samples=2)", flags) == \
        "--seed=-1 is too small; --n=5 (--n=2)"
    assert cli_message("pass allow_fewer=True or report=False", flags) == "pass --allow-fewer or --no-report"
    assert cli_message("device='x', seed='seed=1'", flags) == "device='x', --seed='seed=1'"
    assert cli_message("file '/d/n=3/seed=1.txt' and x_seed=2 and min_n=4", flags) == \
        "file '/d/n=3/seed=1.txt' and x_seed=2 and min_n=4"


def test_a_hub_run_binds_its_commit_and_refuses_another(tmp_path, monkeypatch):
    """A hub id loaded from the cache (offline): the manifest stores the commit and the snapshot's fingerprint; a
    resume after the cached ``main`` moved to another commit is refused naming both."""
    from huggingface_hub import constants

    from moeaudit.errors import RunDirectoryError
    from moeaudit.models import load_tokenizer
    from moeaudit.run.pipeline import run_audit
    from moeaudit.testing import tiny_model

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    tokenizer = load_tokenizer("builtin:tiny-moe")
    repo = tmp_path / "hub" / "models--org--tiny"

    def publish(commit: str, seed: int) -> None:
        tiny_model("olmoe", seed=seed, vocab_size=len(tokenizer)).save_pretrained(repo / "snapshots" / commit)
        tokenizer.save_pretrained(repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)

    publish("a" * 40, seed=0)
    cfg = RunConfig(model="org/tiny", layers=(1,), n=8, n_docs=2, max_length=32, experiments=("audit",), n_boot=40,
                    device="cpu")
    run_audit(cfg, tmp_path / "run", report=False)
    identity = json.loads((tmp_path / "run" / "manifest.json").read_text())["model_identity"]
    assert (identity["kind"], identity["name"], identity["revision"]) == ("hub", "org/tiny", "a" * 40)
    assert identity["files"] == fingerprint(repo / "snapshots" / ("a" * 40))
    publish("b" * 40, seed=1)
    with pytest.raises(RunDirectoryError, match="started with another model \\(hub revision aaaaaaaaaaaa -> "
                                                "bbbbbbbbbbbb\\)"):
        run_audit(cfg, tmp_path / "run", report=False)


def test_a_forked_child_still_dies_of_sigterm():
    """A pool worker forked inside a run (lm-eval's bootstrap) keeps SIGTERM's default action, so
    ``Pool.terminate`` ends it instead of raising Terminated in it (which hung the pool); a SIGTERM sent before the
    child has even run (the race that hung the full suite) ends it too."""
    from moeaudit.run._interrupt import sigterm_as_interrupt

    with sigterm_as_interrupt():
        for wait_until_running in (True, False):
            ready, go = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: say it runs, then wait to be terminated
                import time

                os.write(go, b"1")
                time.sleep(30)
                os._exit(0)
            if wait_until_running:
                os.read(ready, 1)
            os.kill(pid, signal.SIGTERM)
            _, status = os.waitpid(pid, 0)
            os.close(ready)
            os.close(go)
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM, wait_until_running
        assert isinstance(signal.getsignal(signal.SIGTERM), type(test_a_forked_child_still_dies_of_sigterm))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_fork_pool_ends_inside_a_run():
    import multiprocessing

    from moeaudit.run._interrupt import sigterm_as_interrupt

    with sigterm_as_interrupt(), multiprocessing.get_context("fork").Pool(4) as pool:
        assert pool.map(abs, range(-3, 3)) == [3, 2, 1, 0, 1, 2]
