#!/usr/bin/env bash
# Execute notebooks in place on a GPU machine, then the GPU-only unit tests, and pack what a reader
# needs into one archive: the executed notebooks, results/*.json they wrote, and the logs.
#
#   bash scripts/gpu_notebooks.sh OUT_DIR [WHEEL_DIR] notebooks/01_*.ipynb notebooks/04_*.ipynb ...
#
# WHEEL_DIR (optional, "" to skip): wheels to install first on a machine without a package index
# (see ../shared/gpu-wheels/README.md). A notebook that fails leaves its executed cells in
# outputs/<name>.partial.ipynb, which the archive carries too.
set -uo pipefail
out=$1; wheels=${2:-}; shift 2
mkdir -p "$out"
if [ -n "$wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$wheels"/*.whl
  export PATH=/tmp/site/bin:$PATH
  export PYTHONPATH=/tmp/site
  python3 -m ipykernel install --user --name python3 >/dev/null
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} RECIPES_PROGRESS=0 PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; git rev-parse HEAD 2>/dev/null;
  python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"; } > "$out/machine.txt" 2>&1
for notebook in "$@"; do
  start=$(date +%s)
  python3 scripts/run_notebooks.py --inplace --timeout 1500 "$notebook" 2>&1 | tail -n 40 >> "$out/run.log"
  echo "$notebook: $(( $(date +%s) - start )) s" >> "$out/run.log"
done
python3 -m pytest -q -rs -p no:cacheprovider tests/test_offload.py tests/test_rmsnorm_triton.py tests/test_measure.py \
  tests/test_speed.py tests/test_qlora_bases.py tests/test_nf4.py tests/test_nf4_torchao.py tests/test_lora_mlp.py \
  > "$out/gpu_tests.log" 2>&1
tar czf "$out/gpu_run.tgz" "$@" results/*.json outputs/*.json outputs/*.partial.ipynb "$out"/*.txt "$out"/*.log 2>/dev/null
echo done > "$out/DONE"
