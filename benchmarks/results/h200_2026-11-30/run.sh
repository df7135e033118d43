#!/bin/bash
# Train the offloaded force-matching rungs on the lent GPU; bring back checkpoints and logs (<= 8 files).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
exec > >(tee -a "$OUT/log.txt") 2>&1
date -u; nvidia-smi -L; python3 -c "import torch, numpy, tqdm; print(torch.__version__, numpy.__version__)"
nvidia-cuda-mps-control -d && echo "MPS daemon started"
python3 benchmarks/offload_training.py train --jobs .gpu/offload --out /tmp/runs --device cuda --deadline ${DEADLINE:-450} --threads 1
date -u
cp /tmp/runs/summary.json $OUT/ 2>/dev/null
for s in 0 1 2; do tar czf $OUT/runs_seed$s.tgz -C /tmp/runs --exclude='*.partial' $(cd /tmp/runs && ls -d seed${s}_* 2>/dev/null); done
tail -n 3 /tmp/runs/*.log | cut -c1-200
ls -la $OUT
