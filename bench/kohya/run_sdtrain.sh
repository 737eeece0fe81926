#!/bin/bash
# run_sdtrain.sh RES N [folder|single|single-fp16|folder-fp16|tiny|sdxl] -> 'sdtrain RES SOURCE N wall_s s_per_step peak_rss_GiB first_step_s'
# Runs ${SDTRAIN:-sdtrain}. GRAD_CKPT=1: gradient checkpointing. MIXED_PRECISION=bf16: bf16 mixed precision.
# METHOD=dreambooth|ti: that method. BATCH=N: batch size N. DRY_RUN=1: print the command only.
SIDE=sdtrain
source "$(dirname "$0")/common.sh"
# The method's recipe and settings, those of run_kohya.sh.
case "$METHOD" in
  lora) TRAIN=("$REPO/recipes/sls_frog_lora.yaml" lora.rank=4 lora.alpha=1 lora.dropout=0 lora.feed_forward=true
               lora.conv_rank=0 lora.text_encoder=true train.lr=1e-4 train.weight_decay=0.01 'output.formats=[kohya]') ;;
  dreambooth) TRAIN=("$REPO/recipes/sls_frog_dreambooth.yaml" dreambooth.prior_preservation=false
                     dreambooth.train_text_encoder=true dreambooth.text_encoder_lr=5e-5 dreambooth.text_encoder_steps=0
                     dreambooth.ema=false train.lr=1e-4 train.weight_decay=0.01 'output.formats=[single_file]') ;;
  ti) TRAIN=("$REPO/recipes/sls_frog_ti.yaml" textual_inversion.placeholder=sls_frog textual_inversion.initializer=frog
             textual_inversion.num_vectors=2 textual_inversion.captions=object train.lr=5e-3 train.weight_decay=0.0
             'output.formats=[a1111]') ;;
esac
# SDXL's recipe: the same keys, the SDXL comments and defaults (the overrides below set every one that differs).
if [[ "$SOURCE" == sdxl ]]; then TRAIN=("$REPO/recipes/sdxl/sls_frog_lora.yaml" "${TRAIN[@]:1}"); fi
# output.dir is a fresh folder per run: sdtrain refuses to train into an earlier run's.
CMD=("${SDTRAIN:-sdtrain}" train "${TRAIN[@]}"
  model.base="$MODEL" data.dir="$DATA" data.caption_extension=.txt
  data.resolution="$RES" data.buckets.enabled=true data.buckets.min_side=64 data.buckets.max_side=$((2*RES)) data.buckets.step=64 data.buckets.no_upscale=false
  data.flip=false data.shuffle_tags=false data.cache_latents=memory data.cache_text_encoder_outputs=none
  train.batch_size="$BATCH" train.gradient_accumulation_steps=1 train.optimizer=adamw train.max_grad_norm=1.0
  train.lr_scheduler=constant train.lr_warmup_steps=0 train.min_snr_gamma=5
  "train.mixed_precision=\"$MIXED_PRECISION\"" train.gradient_checkpointing=$([[ "$GRAD_CKPT" == 1 ]] && echo true || echo false)
  train.seed=42 train.max_steps="$N" train.save_every_steps=0 train.keep_checkpoints=1
  sample.every_steps=0 'sample.prompts=[]'
  output.dir="$OUT/run" output.name=sls_frog output.save_dtype=fp16 output.tensorboard=false)
measure "$WORK" "${CMD[@]}"
