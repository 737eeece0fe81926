"""kohya's ``ss_*`` training metadata, which AUTOMATIC1111's Lora tab and Civitai read.

Values are strings; JSON-valued keys are JSON strings (docs/formats.md#training-metadata). The flat
"legacy" layout is written, as kohya does without a dataset TOML.
"""

from __future__ import annotations

import json
import uuid

from trainer.formats.safetensors_file import iso_now, modelspec


def training_metadata(recipe, model, context, *, network_module: str, network_dim: int, network_alpha: float, network_args: dict | None = None) -> dict[str, str]:
    train, data = recipe.train, context.data
    values = {
        "ss_session_id": uuid.uuid4().hex[:10],
        "ss_training_started_at": context.started_at,
        "ss_training_finished_at": iso_now(),
        "ss_output_name": recipe.output.name,
        "ss_learning_rate": train.lr,
        "ss_unet_lr": train.lr,
        "ss_text_encoder_lr": getattr(getattr(recipe, recipe.method, None), "text_encoder_lr", None) or train.lr,
        "ss_num_train_images": data.num_train_images,
        "ss_num_reg_images": data.num_reg_images,
        "ss_num_batches_per_epoch": data.batches_per_epoch,
        "ss_epoch": context.epoch,
        "ss_steps": context.step,
        "ss_max_train_steps": train.max_steps,
        "ss_gradient_checkpointing": train.gradient_checkpointing,
        "ss_gradient_accumulation_steps": train.gradient_accumulation_steps,
        "ss_lr_warmup_steps": train.lr_warmup_steps,
        "ss_lr_scheduler": train.lr_scheduler,
        "ss_optimizer": train.optimizer,
        "ss_max_grad_norm": train.max_grad_norm,
        "ss_network_module": network_module,
        "ss_network_dim": network_dim,
        "ss_network_alpha": network_alpha,
        "ss_network_args": json.dumps(network_args or {}),
        "ss_mixed_precision": train.mixed_precision,
        "ss_v2": model.family.is_sd2,
        "ss_base_model_version": model.family.ss_base_model_version(model.prediction_type),
        "ss_sd_model_name": model.name,
        "ss_clip_skip": recipe.model.clip_skip,
        "ss_max_token_length": recipe.data.max_token_length,
        "ss_seed": train.seed,
        "ss_noise_offset": train.noise_offset,
        "ss_min_snr_gamma": train.min_snr_gamma,
        "ss_multires_noise_iterations": train.multires_noise_iterations or None,
        "ss_multires_noise_discount": train.multires_noise_discount,
        "ss_zero_terminal_snr": train.zero_terminal_snr,
        "ss_ip_noise_gamma": train.ip_noise_gamma or None,
        "ss_debiased_estimation": train.debiased_estimation,
        "ss_loss_type": train.loss,
        "ss_huber_schedule": train.huber_schedule,
        "ss_huber_scale": train.huber_scale,
        "ss_huber_c": train.huber_c,
        "ss_cache_latents": recipe.data.cache_latents != "none",
        "ss_resolution": f"({recipe.data.resolution}, {recipe.data.resolution})",
        "ss_batch_size_per_device": train.batch_size,
        "ss_total_batch_size": train.batch_size * train.gradient_accumulation_steps * context.processes,
        "ss_enable_bucket": recipe.data.buckets.enabled,
        "ss_min_bucket_reso": recipe.data.buckets.min_side,
        "ss_max_bucket_reso": recipe.data.buckets.max_side,
        "ss_bucket_no_upscale": recipe.data.buckets.no_upscale,
        "ss_flip_aug": recipe.data.flip,
        "ss_shuffle_caption": recipe.data.shuffle_tags,
        "ss_keep_tokens": recipe.data.keep_tokens,
        "ss_caption_dropout_rate": recipe.data.caption_dropout,
        "ss_caption_tag_dropout_rate": recipe.data.tag_dropout,
        "ss_prior_loss_weight": getattr(getattr(recipe, "dreambooth", None), "prior_loss_weight", 1.0),
        "ss_training_comment": recipe.output.comment,
        "ss_tag_frequency": json.dumps(data.tag_frequency),
        "ss_dataset_dirs": json.dumps(data.dataset_dirs),
        "ss_bucket_info": json.dumps(data.bucket_info),
    }
    return {key: "None" if value is None else str(value) for key, value in values.items()}


def network_metadata(recipe, model, context, *, adapter: str, network_module: str, network_dim: int, network_alpha: float, network_args: dict | None = None) -> dict[str, str]:
    """The whole header of an adapter file: kohya's ``ss_*`` keys plus ModelSpec ``{architecture}/{adapter}``.

    The implementation says whose module names the file uses: diffusers' for SD1/SD2, Stability's (SGM) for SDXL
    (docs/formats.md#modelspec).
    """
    metadata = training_metadata(recipe, model, context, network_module=network_module, network_dim=network_dim, network_alpha=network_alpha, network_args=network_args)
    metadata.update(
        modelspec(
            f"{model.family.modelspec_architecture(model.prediction_type)}/{adapter}",
            model.family.adapter_implementation,
            recipe.output.name,
            recipe.data.resolution,
            model.prediction_type,
            encoder_layer=str(recipe.model.clip_skip) if recipe.model.clip_skip > 1 else "",
            description=recipe.output.comment,
        )
    )
    return metadata
