#!/bin/bash
# device_run.sh [RES] [N] [PAIRS] [SOURCE]: on a lent GPU machine, from the repository root, with ".device-bench"
# carried (device_prepare.sh): install both sides beside the machine's own python3 (its CUDA torch), write the models,
# then run kohya and sdtrain in turn PAIRS times on the same bf16 LoRA job (RES px, N steps; defaults 512, 100, 2,
# folder; SOURCE sdxl: random:sdxl, e.g. "1024 30 1 sdxl"). One line per run, as run_kohya.sh prints it, with the GPU's peak memory; the runs' logs go to
# $OUT/kohya_bench_runs.tgz when OUT is set (the device tool brings it back). PYTHON (default python3) runs sdtrain; KOHYA_PYTHON (default
# PYTHON) runs kohya, so the script can be tried on a CPU machine with two venvs.
# Everything goes in DEVICE_BENCH_DIR (default /tmp/sdtrain-kohya-device).
set -euo pipefail
BENCH=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$BENCH/../.." && pwd)
RES=${1:-512} N=${2:-100} PAIRS=${3:-2} SOURCE=${4:-folder}
PYTHON=${PYTHON:-python3}; KOHYA_PYTHON=${KOHYA_PYTHON:-$PYTHON}
CARRIED=$REPO/.device-bench
# A folder of this script's own (DEVICE_BENCH_DIR): it writes wrappers, libraries and models there, so it refuses a
# folder it did not make (a kohya bench folder of setup_env.sh holds a real venv and sd-scripts clone).
WORK=${DEVICE_BENCH_DIR:-/tmp/sdtrain-kohya-device}
[[ -d "$CARRIED/sd-scripts" ]] || { echo "needs $CARRIED: run bench/kohya/device_prepare.sh here and carry .device-bench" >&2; exit 2; }
if [[ -e "$WORK" && ! -e "$WORK/.made-by-device_run" ]]; then
  echo "$WORK exists and was not made by device_run.sh; set DEVICE_BENCH_DIR to a new folder" >&2; exit 2
fi
mkdir -p "$WORK"; touch "$WORK/.made-by-device_run"
install() {  # install SITE WHEEL...: into a folder of their own, ahead of the machine's packages on PYTHONPATH
  local site=$1; shift
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$@"
}
install "$WORK/sdtrain-site" "$CARRIED"/sdtrain-wheels/*.whl
install "$WORK/kohya-site" "$CARRIED"/kohya-wheels/*.whl
rm -rf "$WORK/sd-scripts"; cp -r "$CARRIED/sd-scripts" "$WORK/sd-scripts"
# run_kohya.sh starts $WORK/venv/bin/python and run_sdtrain.sh $SDTRAIN: each side sees its own libraries first.
mkdir -p "$WORK/venv/bin"
printf '#!/bin/sh\nPYTHONPATH=%s:%s exec %s "$@"\n' "$WORK/kohya-site" "$WORK/sd-scripts" "$KOHYA_PYTHON" > "$WORK/venv/bin/python"
printf '#!/bin/sh\nPYTHONPATH=%s:%s exec %s -m trainer.cli "$@"\n' "$WORK/sdtrain-site" "$REPO" "$PYTHON" > "$WORK/sdtrain"
chmod +x "$WORK/venv/bin/python" "$WORK/sdtrain"
if [[ "$SOURCE" == sdxl ]]; then
  [[ -e "$WORK/models/sdxl-random.safetensors" ]] ||
    HF_HUB_OFFLINE=1 PYTHONPATH="$WORK/sdtrain-site:$REPO" "$PYTHON" "$BENCH/make_model.py" "$WORK" sdxl
else
  [[ -e "$WORK/models/sd15-random.safetensors" && -e "$WORK/models/tiny" ]] ||
    HF_HUB_OFFLINE=1 PYTHONPATH="$WORK/sdtrain-site:$REPO" "$PYTHON" "$BENCH/make_model.py" "$WORK"
fi
export KOHYA_BENCH_DIR=$WORK SDTRAIN=$WORK/sdtrain MIXED_PRECISION=bf16
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
for _ in $(seq "$PAIRS"); do
  "$BENCH/run_kohya.sh" "$RES" "$N" "$SOURCE"
  "$BENCH/run_sdtrain.sh" "$RES" "$N" "$SOURCE"
done
# The device tool brings back few files: one archive of every run's command, log and times (not the trained files).
if [[ -n "${OUT:-}" ]]; then
  tar -czf "$OUT/kohya_bench_runs.tgz" -C "$WORK/out" --exclude='*.safetensors' --exclude=run .
fi
