#!/bin/bash
# Runs benchmarks/compare.py on a 2-GPU device machine, from the repository root:
#
#   benchmarks/run_compare.sh flux eager1,inductor1,paracompile_ulysses2 [more compare.py arguments]
#
# - installs the wheels in .whl/ (diffusers 0.42.1, para-attn 0.3.38, importlib_metadata, zipp) into /tmp/site ($COMPARE_SITE),
#   once per machine (again when .whl/ changes), and puts /tmp/site and the repository on PYTHONPATH;
# - keeps NVLink multicast off (the lent machines require it);
# - writes results to $COMPARE_DIR (default /tmp/compare), which survives between calls while the machine
#   stays warm, so successive calls (one group of setups each) build one table, and Inductor's cache
#   (/tmp/torchinductor_$USER) is reused the same way;
# - stops starting setups after $COMPARE_DEADLINE seconds (default 520) and kills one still running then,
#   so that a call under a 10-minute limit still returns its results;
# - copies the results (JSON, markdown, eager1's reference output, per-setup logs) to $OUT when it is set.
set -u
cd "$(dirname "$0")/.."
usage="usage: benchmarks/run_compare.sh flux|wan SETUPS [compare.py arguments]"
workload=${1:?$usage}
setups=${2:?$usage}
shift 2
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
site=${COMPARE_SITE:-/tmp/site}
stamp=$(stat -c '%n %s' .whl/*.whl | md5sum | cut -c1-12)
if [ ! -f "$site/.wheels-$stamp" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    || exit 1
  touch "$site/.wheels-$stamp"
fi
export PYTHONPATH=$site:$PWD${PYTHONPATH:+:$PYTHONPATH}
dir=${COMPARE_DIR:-/tmp/compare}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, diffusers, para_attn; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'gpus', torch.cuda.device_count())"
export COMPARE_COMMAND="benchmarks/run_compare.sh $workload $setups $*"
python3 benchmarks/compare.py --workload "$workload" --setups "$setups" --out "$dir" \
  --deadline "${COMPARE_DEADLINE:-520}" "$@"
status=$?
if [ -n "${OUT:-}" ]; then
  cp -r "$dir"/. "$OUT"/
fi
exit $status
