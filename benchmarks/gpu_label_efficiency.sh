#!/usr/bin/env bash
# The label-efficiency bench's gpu profile (realistic budgets: full-resolution phantom, 2000
# pre-training steps per site) and the training throughput on the GPU, as one command. The
# throughput measurement gets up to 2 minutes, then the bench LIMIT seconds; the bench is
# resumable: whatever finished in time is reported (missing units are listed), and a second
# call with the same OUT continues. At the throughput measured on one H200 the profile's full
# grid takes about 15 hours with one worker (benchmarks/results/gpu/README.md), so a 10-minute
# lease covers a few units of a reduced grid; a GPU user runs it with LIMIT in the hours.
#
#   benchmarks/gpu_label_efficiency.sh OUT [LIMIT_S] [extra fedcontrast bench options...]
#
# OUT gets environment.txt, throughput_gpu.json, run/ (the resumable run folder) and the report.
# One worker process by default (--workers N after LIMIT_S overrides it): on one H200, 15
# workers sharing the GPU and its 16 CPU cores finished no unit in 400 s (benchmarks/results/gpu/).
# Needs fedcontrast installed with a CUDA build of torch (README, "GPU"); PYTHON names the
# interpreter (default python3), THROUGHPUT_ARGS the throughput options (default
# "--profile gpu --patients 24"). Tested on the CPU at a tiny size with:
#   THROUGHPUT_ARGS="--tiny --rounds 1" benchmarks/gpu_label_efficiency.sh /tmp/gpu-tiny 300 --size small \
#   --sites 2 --patients-per-site 5 --budgets 1 --seeds 0 --methods random_init fcl \
#   --pretrain-steps 2 --pretrain-rounds 1 --finetune-steps 2 --finetune-checkpoints 1
set -uo pipefail
out=${1:?usage: $0 OUT [LIMIT_S] [bench options]}
limit=${2:-540}
shift $(( $# >= 2 ? 2 : 1 ))
py=${PYTHON:-python3}
here=$(dirname "$0")
mkdir -p "$out"
"$py" - > "$out/environment.txt" <<'PY'
import platform, torch
print(platform.platform(), "python", platform.python_version(), "torch", torch.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
# shellcheck disable=SC2086  # THROUGHPUT_ARGS is a list of options
timeout 120 "$py" "$here/throughput.py" ${THROUGHPUT_ARGS:---profile gpu --patients 24} --out "$out/throughput_gpu.json" > "$out/throughput.log" 2>&1
echo "throughput exit status $?"
timeout "$limit" "$py" -m fedcontrast.cli bench --profile gpu --workers 1 --out "$out/run" --report "$out/run" "$@"
echo "bench exit status $? (124: stopped at the time limit; the run folder resumes)"
"$py" "$here/bench_report.py" "$out/run" --out "$out"
