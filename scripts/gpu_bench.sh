#!/usr/bin/env bash
# The docs' real-geometry GPU benchmark (issue 12): the three paper presets at full depth, bfloat16 then float32,
# one `moeaudit bench` each, JSON results and stderr under $OUT, a summary table last.
#   OUT=bench-out bash scripts/gpu_bench.sh                 # on a CUDA machine
#   DEVICE=cpu EXTRA="--num-hidden-layers 2" bash scripts/gpu_bench.sh   # a dry run of the script itself
# A .whl/ folder (e.g. the transformers version this checkout targets) is installed into /tmp/site first.
set -uo pipefail
OUT=${OUT:-bench-out}
DEVICE=${DEVICE:-cuda}
EXTRA=${EXTRA:-}
PER_RUN=${PER_RUN:-150}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee "$OUT/versions.txt"
for dtype in bfloat16 float32; do
  for preset in olmoe-1b-7b qwen1.5-moe-a2.7b deepseek-v2-lite; do
    name="$preset-$dtype"
    start=$(date +%s)
    # shellcheck disable=SC2086
    timeout "$PER_RUN" "$PY" -m moeaudit bench --preset "$preset" --dtype "$dtype" --device "$DEVICE" \
      --n-ablations 400 --naive-sample 8 --repeats 3 --json $EXTRA >"$OUT/$name.json" 2>"$OUT/$name.err"
    echo "$name: exit $? in $(( $(date +%s) - start )) s"
  done
done
"$PY" - "$OUT" <<'PY'
import json, pathlib, sys
rows = []
for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    try:
        r = json.loads(p.read_text())
    except Exception:
        print(f"{p.stem}: no result (see {p.stem}.err)"); continue
    c = r["config"]
    rows.append(f"{c['preset']:<18} {c['dtype']:<8} layers {r['n_layers']:>2} params {r['n_parameters']/1e9:5.2f}B "
                f"naive {r['naive_rate']:8.2f}/s fast {r['fast_rate']:9.1f}/s x{r['speedup']:7.1f} "
                f"marg/floor {r['marginal_over_floor']:5.2f} amort/floor {r['amortized_over_floor']:5.2f} "
                f"clean {r['clean_pass_s']*1e3:7.1f} ms peak {(r['peak_memory_bytes'] or 0)/2**20:8.1f} MiB "
                f"tensors {(r['ablation_tensor_peak_bytes'] or 0)/2**20:8.1f} MiB bound {r['chunk_estimate_bytes']/2**20:8.1f} MiB "
                f"q/chunk {r['query_tokens_per_chunk']} diff {r['max_abs_diff']:.2e} on {r['device_name']}")
print("\n".join(rows))
PY
