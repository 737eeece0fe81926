#!/bin/bash
# crosscheck.sh [RES]: export the recipe run_sdtrain.sh trains with 'sdtrain export kohya' and print each option whose
# value differs from run_kohya.sh's, as kohya's own parser reads them. Run after setup_env.sh.
set -euo pipefail
BENCH=$(cd "$(dirname "$0")" && pwd)
WORK=${KOHYA_BENCH_DIR:-$HOME/kohya-bench}
RES=${1:-128}
CHECK=$WORK/crosscheck/$RES
mkdir -p "$CHECK"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# The exact recipe run_sdtrain.sh trains: its command with --print-config.
eval "$(DRY_RUN=1 "$BENCH/run_sdtrain.sh" "$RES" 3 folder) --print-config" > "$CHECK/recipe.yaml"
"${SDTRAIN:-sdtrain}" export kohya "$CHECK/recipe.yaml" -o "$CHECK/export" --overwrite > /dev/null
DRY_RUN=1 "$BENCH/run_kohya.sh" "$RES" 3 folder > "$CHECK/kohya_command.txt"
echo "options whose value differs ('sdtrain export kohya' vs run_kohya.sh; output_dir always does):"
"$WORK/venv/bin/python" "$BENCH/crosscheck_values.py" "$WORK/sd-scripts" "$CHECK/export/train.sh" "$CHECK/kohya_command.txt"
echo "--- the export's dataset.toml, which holds its data options:"
cat "$CHECK/export/dataset.toml"
