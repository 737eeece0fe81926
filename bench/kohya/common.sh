# Sourced by run_kohya.sh and run_sdtrain.sh after they set SIDE: arguments, paths, environment, measure.
set -euo pipefail
BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH/../.." && pwd)   # the sdtrain repository: its dataset and recipe
WORK=${KOHYA_BENCH_DIR:-$HOME/kohya-bench}
USAGE="usage: $0 RES N [folder|single|single-fp16|folder-fp16|tiny|sdxl]"
RES=${1:?$USAGE}
N=${2:?$USAGE}
SOURCE=${3:-folder}
case "$SOURCE" in
  folder) MODEL=$WORK/models/sd15-random ;;
  single) MODEL=$WORK/models/sd15-random.safetensors ;;
  single-fp16) MODEL=$WORK/models/sd15-random-fp16.safetensors ;;   # the same weights rounded to fp16
  folder-fp16) MODEL=$WORK/models/sd15-random-fp16 ;;   # the same, as a diffusers folder of fp16 files
  tiny) MODEL=$WORK/models/tiny ;;   # sdtrain's built-in tiny model as a diffusers folder
  sdxl) MODEL=$WORK/models/sdxl-random.safetensors ;;   # random:sdxl, fp16 (make_model.py WORK sdxl); LoRA only
  *) echo "$USAGE" >&2; exit 2 ;;
esac
# GRAD_CKPT=1: both sides with gradient checkpointing (the side is printed with -gradckpt).
GRAD_CKPT=${GRAD_CKPT:-0}
if [[ "$GRAD_CKPT" == 1 ]]; then SIDE=$SIDE-gradckpt; fi
# MIXED_PRECISION=bf16: both sides in bf16 mixed precision, frozen weights in bf16 (printed with -bf16).
MIXED_PRECISION=${MIXED_PRECISION:-no}
case "$MIXED_PRECISION" in
  no) ;;
  bf16) SIDE=$SIDE-bf16 ;;
  *) echo "MIXED_PRECISION is no or bf16" >&2; exit 2 ;;
esac
# METHOD=dreambooth|ti: that method instead of LoRA on both sides (printed with -dreambooth, -ti).
METHOD=${METHOD:-lora}
case "$METHOD" in
  lora) ;;
  dreambooth|ti) SIDE=$SIDE-$METHOD ;;
  *) echo "METHOD is lora, dreambooth or ti" >&2; exit 2 ;;
esac
if [[ "$SOURCE" == sdxl && "$METHOD" != lora ]]; then echo "the sdxl model is compared with METHOD=lora only" >&2; exit 2; fi
# BATCH=N: batch size N on both sides (printed with -bsN); 1 unless set.
BATCH=${BATCH:-1}
if [[ "$BATCH" != 1 ]]; then SIDE=$SIDE-bs$BATCH; fi
DATA=$REPO/datasets/sls_frog   # one subfolder "10_sls frog": 11 images x 10 repeats, 10 .txt captions
OUT=$WORK/out/${SIDE}_${RES}_${SOURCE}_N${N}_$(date +%Y%m%d-%H%M%S)
# Same environment on both sides. An OMP_NUM_THREADS already set is kept.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false

measure() {  # measure DIR CMD...: run CMD in DIR, timed, into $OUT and print the result line; DRY_RUN=1 prints the command only
  local dir=$1; shift
  local command_line; command_line="cd $(printf '%q' "$dir") && $(printf '%q ' "$@")"
  if [[ "${DRY_RUN:-0}" == 1 ]]; then echo "$command_line"; return; fi
  [[ -e "$MODEL" ]] || { echo "missing $MODEL: run setup_env.sh first" >&2; exit 2; }
  mkdir -p "$OUT"
  echo "$command_line" > "$OUT/command.txt"
  local load_before; load_before=$(cut -d' ' -f1 /proc/loadavg)
  awk -v l="$load_before" 'BEGIN{exit !(l > 0.5)}' && echo "warning: load average $load_before before the run: the machine is not idle, times will be off" >&2
  cd "$dir"
  local timer=(/usr/bin/time -v); [[ -x /usr/bin/time ]] || timer=(python3 "$BENCH/timev.py")
  # On a GPU, the GPU's memory in use (all processes: run one side at a time) every 0.2 s.
  local sampler=
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$OUT/gpu_memory_MiB.txt" 2>/dev/null &
    sampler=$!
  fi
  python3 "$BENCH/tslog.py" "$OUT/run.log" -- "${timer[@]}" -o "$OUT/time.txt" "$@" || echo "command failed, see $OUT/run.log" >&2
  local gpu=
  if [[ -n "$sampler" ]]; then
    kill "$sampler"; wait "$sampler" 2>/dev/null || true
    gpu=" gpu_peak_MiB=$(sort -n "$OUT/gpu_memory_MiB.txt" | tail -1)"
  fi
  echo "$SIDE $RES $SOURCE $N $(python3 "$BENCH/parse_run.py" "${SIDE%%-*}" "$OUT/run.log" "$OUT/time.txt" "$N")$gpu"
  echo "log: $OUT/run.log (per-step times: $OUT/steps.txt; load average before/after: $load_before/$(cut -d' ' -f1 /proc/loadavg))" >&2
}
