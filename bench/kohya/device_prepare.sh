#!/bin/bash
# device_prepare.sh: gather here what device_run.sh needs on a lent GPU machine (python3 with CUDA torch, torchvision
# and transformers 5, no network; bench/kohya/README.md, "On a GPU machine without network"): in .device-bench/ of the
# repository (git-ignored through .git/info/exclude), the wheels sdtrain lacks there, kohya's pinned libraries as
# wheels for that python (3.12), and sd-scripts' code at the pinned commit from $KOHYA_BENCH_DIR (setup_env.sh).
# Copy ".device-bench" along with the repository (about 28 MB).
set -euo pipefail
BENCH=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$BENCH/../.." && pwd)
WORK=${KOHYA_BENCH_DIR:-$HOME/kohya-bench}
DEST=$REPO/.device-bench
SD_SCRIPTS_COMMIT=$(sed -n 's/^SD_SCRIPTS_COMMIT=//p' "$BENCH/setup_env.sh")
[[ -d "$WORK/sd-scripts/.git" ]] || { echo "needs sd-scripts in $WORK: run setup_env.sh first" >&2; exit 1; }
grep -qx '/.device-bench/' "$REPO/.git/info/exclude" 2>/dev/null || echo '/.device-bench/' >> "$REPO/.git/info/exclude"
mkdir -p "$DEST/sdtrain-wheels" "$DEST/kohya-wheels"
download() {  # download DIR REQUIREMENT...: wheels for the device's CPython 3.12 on x86-64 Linux, without their dependencies
  local dir=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir" "$@"
}
# sdtrain: what the device's image lacks (its torch, transformers, accelerate, safetensors and tensorboard are used).
download "$DEST/sdtrain-wheels" diffusers==0.42.1 omegaconf==2.4.0 peft==0.21.2 prodigyopt==1.1.2
# kohya: the versions setup_env.sh installs (freeze.txt) that the device's image has in other versions or not at all.
download "$DEST/kohya-wheels" accelerate==1.6.0 diffusers==0.32.1 transformers==4.54.1 huggingface-hub==0.34.3 \
  tokenizers==0.21.4 imagesize==1.4.1 toml==0.10.2 voluptuous==0.15.2
[[ "$(git -C "$WORK/sd-scripts" rev-parse HEAD)" == "$SD_SCRIPTS_COMMIT" ]] || { echo "$WORK/sd-scripts is not at $SD_SCRIPTS_COMMIT: run setup_env.sh" >&2; exit 1; }
rm -rf "$DEST/sd-scripts"; mkdir -p "$DEST/sd-scripts"
(cd "$WORK/sd-scripts" && cp -r library networks train_network.py train_db.py train_textual_inversion.py sdxl_train_network.py "$DEST/sd-scripts/")
find "$DEST/sd-scripts" -name __pycache__ -prune -exec rm -rf {} +
du -sh "$DEST"
