"""Wall-clock and number of clean passes of a whole run: the demo, or a paper-geometry proxy.

    python scripts/measure_clean_passes.py demo  [--out DIR] [--clean-cache BYTES]
    python scripts/measure_clean_passes.py proxy [--out DIR] [--clean-cache BYTES]

``proxy`` is OLMoE-1B-7B's layout (16 layers, 64 experts, top-8) at reduced width (d_model 256, random weights, the
embedded tokenizer), the paper's layers 0/4/7/11/15, T = 512, 8 documents, n = 100, n_progressive = 50, all five
experiments. A clean pass is one call of ``moeaudit.intervene.clean_state`` (the forward that keeps a sequence's
routing, layer outputs and keys/values); they are counted per pipeline stage by wrapping that function, so the
script measures any revision of moeaudit the same way (``--clean-cache`` needs one that has the option).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path


class _Stages:
    """A progress sink that remembers the current stage (to attribute clean passes and CPU time to it)."""

    def __init__(self) -> None:
        self.current = "start"
        self.cpu: dict[str, float] = {}
        self._since = time.process_time()

    def stage(self, name, total):
        now = time.process_time()
        self.cpu[self.current] = round(self.cpu.get(self.current, 0.0) + now - self._since, 1)
        self.current, self._since = name.split(" (")[0], now

    def advance(self, n):
        pass

    def message(self, text):
        pass


def _proxy_config(workdir: Path):
    import json as _json

    from moeaudit import RunConfig, load_model
    from moeaudit.builtin import builtin_documents
    from moeaudit.testing import tiny_model

    _, tokenizer = load_model("builtin:tiny-moe")
    model = tiny_model("olmoe", seed=0, num_hidden_layers=16, num_experts=64, num_experts_per_tok=8,
                       hidden_size=256, intermediate_size=128, num_attention_heads=8, num_key_value_heads=8,
                       vocab_size=len(tokenizer), initializer_range=0.02, max_position_embeddings=4096)
    model.save_pretrained(workdir / "model")
    tokenizer.save_pretrained(workdir / "model")
    docs, current = [], []
    for text in builtin_documents("heldout"):
        current.append(text.replace("\n", " "))
        if sum(len(t) for t in current) > 4000:  # comfortably over 512 tokens
            docs.append(" ".join(current))
            current = []
    (workdir / "corpus.jsonl").write_text("".join(_json.dumps({"text": d}) + "\n" for d in docs))
    return RunConfig(model=str(workdir / "model"), name="olmoe-proxy", corpus=str(workdir / "corpus.jsonl"),
                     n_docs=8, n_docs_progressive=8, max_length=512, min_length=512, layers=(0, 4, 7, 11, 15),
                     n=100, n_progressive=50, n_boot=200, experiments=("audit", "control", "rank_validity",
                                                                        "progressive", "redistribution"),
                     dtype="float32", device="cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["demo", "proxy"])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--clean-cache", type=int, default=None, help="clean-state cache budget in bytes")
    args = parser.parse_args()

    import moeaudit.intervene as intervene
    import moeaudit.intervene._state as state_module
    from moeaudit import preset
    from moeaudit.run.pipeline import run_audit

    sink = _Stages()
    counts: Counter[str] = Counter()
    real = state_module.clean_state

    def counting(*a, **k):
        counts[sink.current] += 1
        return real(*a, **k)

    intervene.clean_state = state_module.clean_state = counting
    workdir = Path(tempfile.mkdtemp(prefix="moeaudit-measure-"))
    try:
        config = preset("demo") if args.what == "demo" else _proxy_config(workdir)
        out = args.out or workdir / "run"
        shutil.rmtree(out, ignore_errors=True)
        kwargs = {}
        if args.clean_cache is not None:
            from moeaudit.run.execution import Execution

            kwargs["execution"] = Execution(clean_cache_bytes=args.clean_cache)
        start, cpu = time.perf_counter(), time.process_time()
        run_audit(config, out, progress=sink, **kwargs)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        sink.stage("end", None)
        manifest = json.loads((out / "manifest.json").read_text())
        stages = manifest["sessions"][-1]["stages"]
        cells = sum(v for k, v in stages.items() if k.startswith("cell "))
        print(json.dumps({"what": args.what, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                          "cells_s": round(cells, 1),
                          "cpu_by_stage_s": sink.cpu,
                          "clean_passes": dict(counts), "clean_passes_total": sum(counts.values()),
                          "stages": {k: v for k, v in stages.items() if not k.startswith("cell ")},
                          "clean_cache": manifest["sessions"][-1].get("execution", {}).get("clean_states")}, indent=1))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
