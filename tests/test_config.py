"""RunConfig: defaults, the paper's presets, TOML round trips, precedence, and clear errors for bad input."""

from __future__ import annotations

import pytest

from moeaudit.config import PAPER_METRICS, PRESETS, RUN_EXPERIMENTS, RunConfig, preset
from moeaudit.errors import ConfigError


def test_defaults_are_the_papers_geometry():
    c = RunConfig()
    assert (c.n, c.n_progressive, c.max_length, c.n_docs, c.n_docs_progressive) == (200, 500, 512, 100, 200)
    assert c.metrics == PAPER_METRICS and c.experiments == RUN_EXPERIMENTS
    assert (c.scope, c.mode, c.seed) == ("token", "zero", 0)


@pytest.mark.parametrize(("name", "model", "layers", "dtype"), [
    ("paper-olmoe", "allenai/OLMoE-1B-7B-0924", (0, 4, 7, 11, 15), "float32"),
    ("paper-qwen", "Qwen/Qwen1.5-MoE-A2.7B", (0, 6, 12, 18, 23), "bfloat16"),
    ("paper-deepseek", "deepseek-ai/DeepSeek-V2-Lite", (1, 7, 13, 20, 26), "float16"),
])
def test_paper_presets(name, model, layers, dtype):
    c = preset(name)
    assert (c.model, c.layers, c.dtype, c.corpus) == (model, layers, dtype, "wikitext-2")
    assert (c.n, c.n_progressive, c.max_length, c.n_docs, c.n_docs_progressive) == (200, 500, 512, 100, 200)


def test_unknown_preset_names_the_valid_ones():
    with pytest.raises(ConfigError, match="paper-olmoe") as err:
        preset("paper-olmo")
    assert "Did you mean 'paper-olmoe'" in str(err.value)


def test_unknown_key_names_the_valid_keys():
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping({"n_position": 5})
    msg = str(err.value)
    assert "unknown key 'n_position'" in msg and "n_progressive" in msg and "Valid keys" in msg and "layers" in msg


@pytest.mark.parametrize(("values", "fragment"), [
    ({"scope": "global"}, "valid: token, sequence"),
    ({"mode": "zeros"}, "Did you mean 'zero'"),
    ({"dtype": "int8"}, "valid: auto, float32"),
    ({"experiments": ["audit", "progresive"]}, "Did you mean 'progressive'"),
    ({"n": 2}, "n=2 is too small"),
    ({"n": "many"}, "n='many' must be an integer"),
    ({"layers": ["a"]}, "layers=a must be integers"),
    ({"layers": [-1]}, "non-negative"),
    ({"layers": [3, 5, 3]}, "layers=3,5,3 names layer 3 more than once; list each layer once"),
    ({"min_length": 600}, "exceeds max_length"),
    ({"device_map": "everywhere"}, "device_map='everywhere' is not valid; valid: auto, balanced"),
    ({"device_map": "auto", "device": "cuda"}, "device='cuda' and device_map='auto' both place the model"),
    ({"sesoi_d": 0}, "sesoi_d=0.0 is not a smallest effect of interest"),
    ({"sesoi_d": "small"}, "sesoi_d='small' must be a number"),
    ({"sesoi_d": True}, "sesoi_d=True must be a number"),
    ({"sesoi_d": float("nan")}, "is not a smallest effect of interest"),
    ({"progressive_arms": ["highest", "lowst"]}, "Did you mean 'lowest'"),
    ({"progressive_arms": "random,random"}, "names an arm twice"),
    ({"progressive_arms": []}, "progressive_arms is empty"),
    ({"progressive_sesoi": 0}, "must be a positive number of nats"),
    ({"progressive_sesoi": "small"}, "progressive_sesoi='small' must be a number"),
    ({"progressive_sesoi": True}, "progressive_sesoi=True must be a number"),
    ({"seed": -1}, "seed=-1 is too small; use at least 0"),
    ({"device": "banana"}, "device='banana' is not a device; valid: auto, cpu, cuda, cuda:N, mps"),
    ({"encoding": "utf-9"}, "encoding='utf-9' is not a text encoding"),
    ({"trust_remote_code": True}, "only the caller may enable it"),
    ({"experiments": []}, "experiments= names no experiment"),
])
def test_bad_values_are_named(values, fragment):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping(values)
    assert fragment in str(err.value)


def test_progressive_arms_and_sesoi():
    c = RunConfig()
    assert c.progressive_arms == ("highest", "lowest", "random") and c.progressive_sesoi == 0.05
    flagged = RunConfig.from_mapping({"progressive_arms": "random, highest", "progressive_sesoi": "0.1"})
    assert flagged.progressive_arms == ("random", "highest") and flagged.progressive_sesoi == 0.1
    only = RunConfig.from_mapping({"experiments": ["audit"], "progressive_arms": []})  # no progressive: fine
    assert only.progressive_arms == ()


def test_coercions_from_flags():
    c = RunConfig.from_mapping({"layers": "0, 4,7", "metrics": "activation_norm", "dtype": "bf16", "n": "12"})
    assert c.layers == (0, 4, 7) and c.metrics == ("activation_norm",) and c.dtype == "bfloat16" and c.n == 12
    assert RunConfig.from_mapping({"layers": "all"}).layers is None
    assert RunConfig.from_mapping({"sesoi_d": "0.3"}).sesoi_d == 0.3 and RunConfig.from_mapping({"sesoi_d": 1}).sesoi_d == 1.0


def test_sesoi_default_is_the_statistics_default():
    from moeaudit.stats import SESOI_D

    assert RunConfig().sesoi_d == SESOI_D


def test_toml_round_trip_and_precedence(tmp_path):
    for name, cfg in PRESETS.items():
        path = tmp_path / f"{name}.toml"
        path.write_text(cfg.to_toml())
        assert RunConfig.from_toml(path) == cfg
    path = tmp_path / "run.toml"
    path.write_text('preset = "paper-qwen"\ndevice = "cuda:1"\nlayers = [0, 23]\n')
    c = RunConfig.from_toml(path)
    assert (c.model, c.device, c.layers, c.dtype) == ("Qwen/Qwen1.5-MoE-A2.7B", "cuda:1", (0, 23), "bfloat16")
    flagged = c.replace(n=50)  # flags come last
    assert flagged.n == 50 and flagged.layers == (0, 23)


def test_toml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        RunConfig.from_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("n = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        RunConfig.from_toml(bad)
    nested = tmp_path / "nested.toml"
    nested.write_text("[model]\nname = 'x'\n")
    with pytest.raises(ConfigError, match="top level"):
        RunConfig.from_toml(nested)
    typo = tmp_path / "typo.toml"
    typo.write_text("modell = 'x'\n")
    with pytest.raises(ConfigError, match="Did you mean 'model'") as err:
        RunConfig.from_toml(typo)
    assert str(typo) in str(err.value)


def test_config_is_frozen_and_labelled():
    c = RunConfig(model="/models/OLMoE-1B-7B-0924/")
    with pytest.raises(AttributeError):
        c.n = 3  # type: ignore[misc]
    assert c.label == "OLMoE-1B-7B-0924"
    assert RunConfig().label == "tiny-moe"
    assert RunConfig(name="mine").label == "mine"


def test_device_map_key():
    cfg = RunConfig.from_mapping({"device_map": "auto"})
    assert cfg.device_map == "auto" and cfg.device == "auto"
    assert RunConfig.from_mapping({"device_map": "maps/two-gpus.json"}).device_map == "maps/two-gpus.json"
    assert RunConfig.from_mapping({"device_map": ""}).device_map is None
    assert "device_map" not in RunConfig().to_toml()  # unset stays out of the file (and old runs still resume)


def test_trust_remote_code_only_from_the_caller(tmp_path):
    asks = tmp_path / "asks.toml"
    asks.write_text('model = "org/custom"\ntrust_remote_code = true\n')
    with pytest.raises(ConfigError, match="cannot be set in a configuration file.*--trust-remote-code") as err:
        RunConfig.from_toml(asks)
    assert err.value.source == repr(str(asks))
    legacy = tmp_path / "legacy.toml"  # what to_toml() of earlier versions wrote: asks for nothing, still resumes
    legacy.write_text('model = "builtin:tiny-moe"\ntrust_remote_code = false\n')
    assert RunConfig.from_toml(legacy) == RunConfig()
    assert "trust_remote_code" not in RunConfig().to_dict()


def test_resolved_paths_and_stored_config_upgrade(tmp_path, monkeypatch):
    from moeaudit.config import CORPUS_SOURCES
    from moeaudit.corpus import NAMED_SOURCES
    from moeaudit.errors import RunDirectoryError
    from moeaudit.rundir import RunDirectory

    assert CORPUS_SOURCES == NAMED_SOURCES
    monkeypatch.chdir(tmp_path)
    c = RunConfig(model="ckpt/", corpus="docs.txt").with_resolved_paths()
    assert (c.model, c.corpus) == (str(tmp_path / "ckpt"), str(tmp_path / "docs.txt"))
    hub = RunConfig(model="allenai/OLMoE-1B-7B-0924", corpus="wikitext-2").with_resolved_paths()
    assert (hub.model, hub.corpus) == ("allenai/OLMoE-1B-7B-0924", "wikitext-2")
    (tmp_path / "allenai" / "OLMoE-1B-7B-0924").mkdir(parents=True)  # a local directory wins, as in transformers
    assert hub.with_resolved_paths().model == str(tmp_path / "allenai" / "OLMoE-1B-7B-0924")
    assert RunConfig().with_resolved_paths() == RunConfig()
    assert RunConfig(device_map="maps/two.json").with_resolved_paths().device_map == str(tmp_path / "maps/two.json")
    run = RunDirectory(tmp_path)
    old = {k: v for k, v in RunConfig().to_dict().items() if k != "encoding"} | {"trust_remote_code": False}
    run.check_config({"config": old}, RunConfig().to_dict(), defaults=RunConfig().to_dict())  # resumes
    kept = {"model": "m", "trust_remote_code": True}  # a class that still has the key compares it
    run.check_config({"config": kept}, kept)
    with pytest.raises(RunDirectoryError, match="trust_remote_code: stored True, requested False"):
        run.check_config({"config": kept}, {"model": "m", "trust_remote_code": False})
