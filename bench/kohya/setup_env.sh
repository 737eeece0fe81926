#!/bin/bash
# setup_env.sh: build the kohya side in $KOHYA_BENCH_DIR (default ~/kohya-bench): sd-scripts at the pinned commit,
# its venv, and the model both tools train. Needs git, python3, GNU time and sdtrain installed ($SDTRAIN, $SDTRAIN_PYTHON).
set -euo pipefail
BENCH=$(cd "$(dirname "$0")" && pwd)
WORK=${KOHYA_BENCH_DIR:-$HOME/kohya-bench}
SD_SCRIPTS_REPO=${KOHYA_SD_SCRIPTS_REPO:-https://github.com/kohya-ss/sd-scripts}
SD_SCRIPTS_COMMIT=48d368fa557731ad0488c07304dfeba8c07910eb
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
[[ -x /usr/bin/time ]] || { echo "needs GNU time at /usr/bin/time (e.g. apt-get install time)" >&2; exit 1; }
command -v "${SDTRAIN:-sdtrain}" >/dev/null || { echo "needs sdtrain: install it, or set SDTRAIN to its command" >&2; exit 1; }
mkdir -p "$WORK"; cd "$WORK"
[[ -d sd-scripts ]] || git clone -q "$SD_SCRIPTS_REPO" sd-scripts
git -C sd-scripts checkout -q "$SD_SCRIPTS_COMMIT"

# sd-scripts' requirements less '-e .' (sd-scripts itself, installed next) and bitsandbytes (CUDA only, unused here);
# pip picks the torchvision built for the pinned torch.
python3 -m venv venv
grep -v -E '^\s*#|^\s*$|^-e|bitsandbytes' sd-scripts/requirements.txt > requirements.txt
venv/bin/pip install -q "torch==$TORCH_VERSION" torchvision -r requirements.txt
venv/bin/pip install -q --no-deps -e sd-scripts
# kohya imports torchvision (transforms only). Beside a CPU torch, a CUDA torchvision wheel (the only one PyPI has
# for torch 2.13) fails on import ("operator torchvision::nms does not exist"); the patch skips its op registrations.
TORCHVISION_INIT=$(echo venv/lib/python3*/site-packages/torchvision/__init__.py)
grep -q PATCHED "$TORCHVISION_INIT" || patch -s "$TORCHVISION_INIT" "$BENCH/torchvision-cpu.patch"
venv/bin/pip freeze > freeze.txt   # the versions measured, for the report

[[ -e models/sd15-random.safetensors && -e models/sd15-random-fp16 && -e models/tiny ]] || HF_HUB_OFFLINE=1 "${SDTRAIN_PYTHON:-python3}" "$BENCH/make_model.py" "$WORK"
