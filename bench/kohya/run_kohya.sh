#!/bin/bash
# run_kohya.sh RES N [folder|single] -> 'kohya RES SOURCE N wall_s s_per_step peak_rss_GiB first_step_s'
# KOHYA_SDPA=0: kohya's own attention instead of --sdpa (printed as kohya-nosdpa). GRAD_CKPT=1: gradient checkpointing.
# MIXED_PRECISION=bf16: bf16 mixed precision.
# DRY_RUN=1: print the command only.
SIDE=kohya; ATTENTION=(--sdpa)
if [[ "${KOHYA_SDPA:-1}" == 0 ]]; then SIDE=kohya-nosdpa; ATTENTION=(); fi
source "$(dirname "$0")/common.sh"
CHECKPOINTING=(); if [[ "$GRAD_CKPT" == 1 ]]; then CHECKPOINTING=(--gradient_checkpointing); fi
CMD=("$WORK/venv/bin/python" train_network.py
  --pretrained_model_name_or_path "$MODEL"
  --tokenizer_cache_dir "$WORK/tokenizer_cache"
  --train_data_dir "$DATA" --caption_extension .txt
  --resolution "$RES" --train_batch_size 1
  --enable_bucket --min_bucket_reso 64 --max_bucket_reso $((2*RES)) --bucket_reso_steps 64
  --network_module networks.lora --network_dim 4 --network_alpha 1
  --learning_rate 1e-4 --optimizer_type AdamW --optimizer_args weight_decay=0.01 betas=0.9,0.999 eps=1e-08
  --lr_scheduler constant --lr_warmup_steps 0 --max_grad_norm 1.0 --min_snr_gamma 5
  --mixed_precision "$MIXED_PRECISION" --cache_latents "${ATTENTION[@]}" "${CHECKPOINTING[@]}"
  --seed 42 --max_train_steps "$N" --max_data_loader_n_workers 0
  --output_dir "$OUT" --output_name sls_frog --save_model_as safetensors --save_precision fp16)
measure "$WORK/sd-scripts" "${CMD[@]}"
