#!/bin/bash
# run_kohya.sh RES N [folder|single|single-fp16|folder-fp16|tiny|sdxl] -> 'kohya RES SOURCE N wall_s s_per_step peak_rss_GiB first_step_s'
# KOHYA_SDPA=0: kohya's own attention instead of --sdpa (printed as kohya-nosdpa). GRAD_CKPT=1: gradient checkpointing.
# MIXED_PRECISION=bf16: bf16 mixed precision. METHOD=dreambooth|ti: that method. BATCH=N: batch size N.
# DRY_RUN=1: print the command only.
SIDE=kohya; ATTENTION=(--sdpa)
if [[ "${KOHYA_SDPA:-1}" == 0 ]]; then SIDE=kohya-nosdpa; ATTENTION=(); fi
source "$(dirname "$0")/common.sh"
CHECKPOINTING=(); if [[ "$GRAD_CKPT" == 1 ]]; then CHECKPOINTING=(--gradient_checkpointing); fi
# The method's script and settings: LoRA as in the README; DreamBooth trains UNet and text encoder (lr 5e-5) the
# whole run, without prior preservation; Textual Inversion learns 2 vectors for sls_frog from "frog" with the object
# templates, lr 5e-3, no weight decay.
case "$METHOD" in
  lora) TRAIN=(train_network.py --network_module networks.lora --network_dim 4 --network_alpha 1
               --learning_rate 1e-4 --optimizer_args weight_decay=0.01 betas=0.9,0.999 eps=1e-08) ;;
  dreambooth) TRAIN=(train_db.py --learning_rate 1e-4 --learning_rate_te 5e-5
                     --optimizer_args weight_decay=0.01 betas=0.9,0.999 eps=1e-08) ;;
  ti) TRAIN=(train_textual_inversion.py --token_string sls_frog --init_word frog --num_vectors_per_token 2
             --use_object_template --learning_rate 5e-3 --optimizer_args weight_decay=0.0 betas=0.9,0.999 eps=1e-08) ;;
esac
# sd-scripts builds SD1.5's UNet widths only; kohya_narrow_unet.py builds the tiny model's.
if [[ "$SOURCE" == tiny ]]; then TRAIN=("$BENCH/kohya_narrow_unet.py" "$MODEL" "${TRAIN[@]}"); fi
# SDXL has its own script with the same options (its LoRA also on both text encoders, as sdtrain's lora.text_encoder).
if [[ "$SOURCE" == sdxl ]]; then TRAIN=(sdxl_train_network.py "${TRAIN[@]:1}"); fi
CMD=("$WORK/venv/bin/python" "${TRAIN[@]}"
  --pretrained_model_name_or_path "$MODEL"
  --tokenizer_cache_dir "$WORK/tokenizer_cache"
  --train_data_dir "$DATA" --caption_extension .txt
  --resolution "$RES" --train_batch_size "$BATCH"
  --enable_bucket --min_bucket_reso 64 --max_bucket_reso $((2*RES)) --bucket_reso_steps 64
  --optimizer_type AdamW
  --lr_scheduler constant --lr_warmup_steps 0 --max_grad_norm 1.0 --min_snr_gamma 5
  --mixed_precision "$MIXED_PRECISION" --cache_latents "${ATTENTION[@]}" "${CHECKPOINTING[@]}"
  --seed 42 --max_train_steps "$N" --max_data_loader_n_workers 0
  --output_dir "$OUT" --output_name sls_frog --save_model_as safetensors --save_precision fp16)
measure "$WORK/sd-scripts" "${CMD[@]}"
