#!/usr/bin/env bash
# The GPU check of the tokenizing recipe (issue 10), in one run of under 8 minutes on a machine
# with an NVIDIA GPU and its CUDA build of torch installed:
#   1. installs the project into a venv that sees the machine's CUDA torch (no CPU constraint);
#   2. `lumo bench tokenize` on the full-size preset with `device: cuda` (the `auto` batch recipe:
#      32 images / 16 clips per model call);
#   3. the byte-identity and retokenize tests on the GPU recipe (LUMO_TEST_DEVICE=cuda);
#   4. one bf16 training step on the GPU, on shards tokenized on the GPU;
# then prints the figures. Usage: bash scripts/gpu_check.sh   (ROWS=256 OUT=<folder> to change)
set -euo pipefail
cd "$(dirname "$0")/.."

ROWS=${ROWS:-256}
OUT=${OUT:-$(mktemp -d -t lumo-gpu-check.XXXXXX)}
VENV=${VENV:-build/venv-gpu}  # build/ is git-ignored
mkdir -p "$OUT"
started=$(date +%s)
step() { echo "== $1 ($(( $(date +%s) - started )) s)"; }

step "GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, sys; ok = torch.cuda.is_available(); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", ok); sys.exit(0 if ok else 1)' \
  || { echo "gpu_check: python3 has no CUDA torch; install the CUDA build of torch for this machine first" >&2; exit 2; }

step "install (the machine's CUDA torch, no CPU constraint)"
# --system-site-packages: the venv sees the installed CUDA torch, and pip keeps it since it meets
# the requirement (what `make setup CONSTRAINTS=` does after installing a CUDA torch in the venv).
test -x "$VENV/bin/python" || { mkdir -p "$(dirname "$VENV")" && python3 -m venv --system-site-packages "$VENV"; }
timeout 240 "$VENV/bin/pip" install --quiet -e '.[dev]'
"$VENV/bin/python" -c 'import torch; assert torch.cuda.is_available(), "the venv lost the CUDA torch"; print("venv torch", torch.__version__)'

step "bench tokenize, full-size preset, device cuda, $ROWS rows"
sed 's/^  device: cpu$/  device: cuda/' lumo_core/data/configs/bench_full.yaml > "$OUT/bench_full_cuda.yaml"
grep -q '^  device: cuda$' "$OUT/bench_full_cuda.yaml"
LUMO_OUTPUT_DIR="$OUT/bench" timeout 240 "$VENV/bin/lumo" bench tokenize --samples "$ROWS" --preset "$OUT/bench_full_cuda.yaml" --memory-rows 16 \
  > "$OUT/bench.out" 2> "$OUT/bench.err" || { tail -20 "$OUT/bench.err"; exit 1; }
tail -1 "$OUT/bench.out" > "$OUT/bench.json"

step "byte identity and retokenize on the GPU recipe"
tests_rc=0
LUMO_TEST_DEVICE=cuda timeout 180 "$VENV/bin/python" -m pytest tests/tokenize/test_batch_recipe.py -q -p no:cacheprovider > "$OUT/tests.log" 2>&1 || tests_rc=$?
tail -5 "$OUT/tests.log"

step "one bf16 training step on the GPU"
sed 's/^  device: cpu$/  device: cuda/' lumo_core/data/uti_default.yaml > "$OUT/uti_cuda.yaml"
export LUMO_OUTPUT_DIR="$OUT/train" LUMO_UTI_CONFIG="$OUT/uti_cuda.yaml"
timeout 60 "$VENV/bin/lumo" token-space > /dev/null
timeout 90 "$VENV/bin/lumo" tokenize > /dev/null
timeout 120 "$VENV/bin/lumo" train --set train.max_steps=1 --set train.device=cuda --set train.precision=bf16 --set train.save_every=0 \
  | tail -1 > "$OUT/train.json"
unset LUMO_OUTPUT_DIR LUMO_UTI_CONFIG

step "figures"
"$VENV/bin/python" - "$OUT/bench.json" "$OUT/train.json" <<'EOF'
import json, sys
bench = json.loads(open(sys.argv[1]).read())
train = json.loads(open(sys.argv[2]).read())
print(f"bench tokenize ({bench['preset']}, {bench['samples']} rows, {bench['device']}, recipe {bench['batch_recipe']})")
for key in ("samples_per_s", "images_per_s", "audio_seconds_per_s", "efficiency", "speedup_vs_per_sample",
            "pipeline_seconds", "models_alone_seconds", "per_sample_loop_seconds", "rows_encoded"):
    print(f"  {key}: {bench[key]}")
print(f"  padding_share: {bench['padding_share']}  (model-call rows {bench['model_call_rows']})")
print(f"  stage_seconds: {json.dumps(bench['stage_seconds'])}")
print(f"  target speed-up on a GPU >= 5: {'met' if bench['speedup_vs_per_sample'] >= 5 else 'NOT met'}")
print(f"train (1 step, bf16): {json.dumps(train)}")
EOF
echo "gpu_check: done in $(( $(date +%s) - started )) s; files in $OUT; GPU-recipe tests $([ "$tests_rc" = 0 ] && echo passed || echo "FAILED (exit $tests_rc, $OUT/tests.log)")"
exit "$tests_rc"
