#!/usr/bin/env bash
# The CUDA check: run on a lent GPU machine (the device tool) from the repository root, with
# the folders .whl and .gpu carried (both ignored by git; made here first):
#   .whl  retconvert's wheel (`pip wheel --no-deps -w .whl .`), the pinned transformers and fla
#         (`pip download --no-deps --only-binary=:all: --python-version 3.12 ...`)
#   .gpu  skeletons of the teacher and both students (bench/random_weights.py --skeleton)
# 1. tests/test_cuda.py: every CUDA path against the CPU (fla's kernels and ours);
# 2. the eval suite's speed and memory sections on the teacher and both students, rebuilt
#    with random weights from those skeletons, in bf16 on the GPU.
# Everything it writes goes to $OUT (the device tool brings it back); docs/RESULTS.md ("CUDA").
set -uo pipefail
OUT=${OUT:-/tmp/cuda-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# the carried wheel must be this working tree's code, or the check tests something else
for f in models/*.py eval/*.py distill/*.py convert/*.py retconvert/*.py; do
    sub=${f%%/*}; [ "$sub" = retconvert ] && dest=/tmp/site/$f || dest=/tmp/site/retconvert/$f
    cmp -s "$f" "$dest" || { echo "cuda_check: $f differs from the carried wheel; rebuild .whl (pip wheel --no-deps -w .whl .)"; exit 1; }
done
PY="python3 -P"  # -P: the repository's own retconvert/ folder must not shadow the installed package
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import torch, transformers, fla; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, 'fla', fla.__version__)"; } 2>&1 | tee "$OUT/gpu.txt"

timeout -s INT "${TEST_TIMEOUT:-300}" $PY -m pytest -q tests/test_cuda.py --timeout 120 -p no:cacheprovider --tb=short -rfE \
    --junitxml="$OUT/test_cuda.xml" "${@}" > "$OUT/test_cuda.log" 2>&1
echo "tests: exit $?"; tail -n 25 "$OUT/test_cuda.log"

[ -n "${SKIP_SPEED:-}" ] && exit 0
for m in teacher student student-w64; do
    $PY bench/random_weights.py ".gpu/$m" --out "/tmp/models/$m" --dtype bfloat16 --max-position-embeddings 32768 \
        2>&1 | tail -n 1
done
timeout "${SPEED_TIMEOUT:-300}" $PY -m retconvert.cli eval --model /tmp/models/teacher --model /tmp/models/student \
    --model /tmp/models/student-w64 --suite speed,memory --device cuda --dtype bfloat16 \
    --contexts "${CONTEXTS:-512,2048,8192,32768}" --max-context 32768 --batch-sizes 1,16,64 \
    --out /tmp/eval > "$OUT/eval.log" 2>&1
echo "eval: exit $?"; tail -n 30 "$OUT/eval.log"
cp /tmp/eval/results.json "$OUT/eval_results.json" 2>/dev/null
cp /tmp/eval/*.md "$OUT/" 2>/dev/null
true
