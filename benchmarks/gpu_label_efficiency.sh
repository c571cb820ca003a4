#!/usr/bin/env bash
# The label-efficiency bench's gpu profile (realistic budgets: full-resolution phantom, 2000
# pre-training steps per site), prepared as ONE command for a lent GPU machine (the device
# tool allows 10 minutes a command). The bench is resumable: whatever finished inside LIMIT
# seconds is reported (missing units are listed), and a second call continues the run.
#
#   benchmarks/gpu_label_efficiency.sh OUT [LIMIT_S] [extra fedcontrast bench options...]
#
# Needs fedcontrast installed with a CUDA build of torch (README, "GPU"). Tested on the CPU at
# a tiny size with: benchmarks/gpu_label_efficiency.sh /tmp/gpu-tiny 300 --size small \
#   --sites 2 --patients-per-site 5 --budgets 1 --seeds 0 --methods random_init fcl \
#   --pretrain-steps 2 --pretrain-rounds 1 --finetune-steps 2 --finetune-checkpoints 1
set -uo pipefail
out=${1:?usage: $0 OUT [LIMIT_S] [bench options]}
limit=${2:-540}
shift $(( $# >= 2 ? 2 : 1 ))
mkdir -p "$out"
python - > "$out/environment.txt" <<'PY'
import platform, torch
print(platform.platform(), "python", platform.python_version(), "torch", torch.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
timeout "$limit" fedcontrast bench --profile gpu --out "$out/run" --report "$out/run" "$@"
echo "bench exit status $? (124: stopped at the time limit; the run folder resumes)"
python "$(dirname "$0")/bench_report.py" "$out/run" --out "$out"
