#!/usr/bin/env bash
# Device check: CUDA tests, the speed benchmark's teacher/kd parts and the default-profile run
# (Mosaic against FedAvg) on the GPU, with GPU utilisation sampled throughout.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p data/FashionMNIST/raw
for f in .gpudata/*.gz; do gunzip -c "$f" > "data/FashionMNIST/raw/$(basename "$f" .gz)"; done
mark() { echo "$(date +%s.%N) $1" | tee -a "$OUT/marks.txt"; }
python3 -c "import torch, flwr, pydantic, flwr_datasets, server_app.strategies, benchmarks.speed; print(torch.__version__, flwr.__version__, torch.cuda.get_device_name())" || exit 1
nproc; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -lms 200 > "$OUT/util.csv" 2>&1 &
mark tests-start
timeout 100 python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -4
mark tests-end
mark teacher-kd-start
timeout 120 python3 -m benchmarks.speed --part teacher kd --device cuda --kd-clients 10 30 100 2>&1 | tee "$OUT/teacher_kd.txt"
mark teacher-kd-end
mark run-start
timeout 300 python3 -m benchmarks.speed --part run --set device=cuda 2>&1 | tee "$OUT/run.txt"
mark run-end
kill %1 2>/dev/null
true
