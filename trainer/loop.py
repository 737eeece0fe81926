"""The one training loop. It knows nothing about which method it runs.

Each optimizer step draws ``gradient_accumulation_steps`` micro-batches in the data loader's
deterministic order, forms the method's loss on noise drawn from generators seeded per sample, and
steps. Checkpoints record the step, the data position, the optimizer, scheduler and RNG states, so a
resumed run continues exactly where it stopped. Run by several processes, each trains on its slice of
every batch and the gradients are summed before the step (trainer.distributed, docs/distributed.md).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from trainer import diffusion, warm_start
from trainer.distributed import barrier, broadcast_parameters, prepare_environment, sum_gradients, sum_over_processes, world_of
from trainer.atomic import write_text
from trainer.checkpoint import Progress, complete_checkpoints, latest_complete, load_checkpoint, resolve_checkpoint, save_checkpoint, sweep_leftovers
from trainer.errors import UserError
from trainer.flops import StepFlops
from trainer.formats.safetensors_file import DTYPES, iso_now
from trainer.matmul_conv import use_matmul_convolutions
from trainer.methods import method_class
from trainer.methods.base import ExportContext, TrainingBatch
from trainer.models.conversion import move_part
from trainer.models.loading import load_recipe_model, locate_base
from trainer.models.text import check_clip_skip
from trainer.optim import build_lr_scheduler, build_optimizer
from trainer.recipe import Recipe, recipe_to_dict, recipe_to_yaml, validate_recipe
from trainer.resume import check_resume, flatten
from trainer.run_folder import earlier_run, move_aside, refuse_earlier_run
from trainer.sharding import ModelSharding
from trainer.validation import IMAGES_NAME as VALIDATION_IMAGES
from trainer.validation import Validator


class TrainingDiverged(UserError):
    exit_code = 3


@dataclass
class TrainResult:
    output_dir: Path
    artifacts: list[Path]
    checkpoints: list[Path] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    final_loss: float = float("nan")
    # Wall time of each optimizer step of this run (data, forward, backward, update; not checkpoints or
    # samples), for benchmarks.
    step_seconds: list[float] = field(default_factory=list)
    # time.time() when this run's first optimizer step ended, for benchmarks' time to first step.
    first_step_ended: float | None = None
    # Floating-point operations of the step train(count_flops_of_step=...) named (trainer.bench).
    step_flops: int | None = None
    # The dtype the step's matrix products compute in ("fp32", "bf16" or "fp16": autocast's under mixed
    # precision), for the bench's matmul ceiling in that dtype.
    compute_dtype: str = "fp32"


def _mixed_precision(setting: str) -> str:
    """train.mixed_precision on this machine: "auto" resolved, fp16 refused without a GPU.

    The one setting checked here rather than in validate_recipe: a recipe is valid on every machine,
    whether this one can run it is decided where it runs. bf16 runs on a CPU too (torch's CPU autocast),
    at half the frozen weights' memory, where the CPU computes bf16; "auto" keeps a CPU in fp32
    (docs/benchmarks.md, "bf16 on a CPU").
    """
    if setting != "auto":
        if setting == "fp16" and not torch.cuda.is_available():
            raise UserError("Recipe key 'train.mixed_precision' is 'fp16', which needs a CUDA GPU; on a CPU use 'auto' or 'no' (fp32), or 'bf16' where the CPU computes it.")
        if setting == "bf16" and not computes_bf16():
            raise UserError(
                f"Recipe key 'train.mixed_precision' is 'bf16', but this CPU ({torch.backends.cpu.get_cpu_capability()}) has no "
                "instructions torch computes bf16 with (AVX-512 or Arm's bf16), so every product would run tens to hundreds of "
                "times slower than in fp32 (docs/benchmarks.md, \"bf16 on a CPU\"). Set train.mixed_precision=no (or auto), "
                "or train on a GPU."
            )
        return setting
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def computes_bf16() -> bool:
    """Whether this machine trains in bf16: a CUDA GPU, or a CPU torch computes bf16 on through oneDNN (AVX-512 or
    Arm's bf16 instructions); without them bf16 products and convolutions fall back to plain loops."""
    return torch.cuda.is_available() or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _forget_other_mixed_precision(mixed_precision: str) -> None:
    """Let this process's next Accelerator take ``mixed_precision`` though an earlier run used another.

    accelerate keeps one AcceleratorState per process and refuses an Accelerator with another mixed
    precision than the first one's; a process that trains several recipes in turn (the tests, a
    notebook) must be able to. Only the mixed-precision state is dropped, the processes' stays.
    """
    from accelerate.state import AcceleratorState

    earlier = AcceleratorState._shared_state.get("_mixed_precision")
    if earlier is not None and earlier != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def _quiet(*args, **kwargs) -> None:
    """``print`` on the processes other than the main one: one copy of every message."""


def _check_fits_model(recipe: Recipe, model) -> None:
    """Settings only the loaded model can check: image sides must pass through the VAE and every UNet
    downsampling whole; model.clip_skip must leave a layer of every text encoder."""
    for te in model.text_encoders:
        problem = check_clip_skip(te.spec, te.model, recipe.model.clip_skip)
        if problem:
            raise UserError(f"Recipe key 'model.clip_skip' is {recipe.model.clip_skip}, but {problem}.")
    multiple = model.vae_scale_factor * 2 ** (len(model.unet.config.block_out_channels) - 1)
    data = recipe.data
    for key, value in (("data.resolution", data.resolution), ("data.buckets.step", data.buckets.step if data.buckets.enabled else multiple)):
        if value % multiple:
            raise UserError(
                f"Recipe key '{key}' is {value}, but this {model.family.title} model needs multiples of {multiple} px "
                f"(its VAE shrinks images {model.vae_scale_factor}x and its UNet halves them {len(model.unet.config.block_out_channels) - 1} times). "
                f"Set {key} to a multiple of {multiple}."
            )


def _prepare_model(model, method, device: torch.device, weight_dtype: torch.dtype, gradient_checkpointing: bool) -> list[torch.nn.Parameter]:
    """Frozen parts in the compute dtype (the VAE in fp32 if model.vae_fp32), trained parameters in fp32
    (mixed precision's master weights); on a CPU, convolutions with few output positions as matrix products."""
    for name, part in model.parts().items():
        move_part(part, device, torch.float32 if name == "vae" and model.vae_fp32 else weight_dtype)
        part.eval()
        if device.type == "cpu":
            use_matmul_convolutions(part)
    trainable = []
    for module in method.trainable_modules().values():
        module.train()
        if gradient_checkpointing:
            if hasattr(module, "enable_gradient_checkpointing"):
                module.enable_gradient_checkpointing()
            else:
                module.gradient_checkpointing_enable()
        for param in module.parameters():
            if param.requires_grad:
                param.data = param.data.float()
                trainable.append(param)
    if not trainable:
        raise UserError(f"Method '{method.name}' set up no trainable parameters; check the recipe's '{method.name}' section.")
    return trainable


def _announce_later_checkpoints(output_dir: Path, step: int) -> None:
    later = [path.name for found, path in complete_checkpoints(output_dir) if found > step]
    if later:
        print(
            f"note: resuming from step {step} while later checkpoints exist ({', '.join(later)}); this run replaces each "
            "when it reaches its step, and until then --resume latest would pick them."
        )


def _data_changed(checkpoint, data, allow_data_change: bool) -> None:
    """The data as the method trains on it (e.g. with DreamBooth's class images) against the checkpoint's."""
    if checkpoint.state["data_fingerprint"] == data.fingerprint:
        return
    step = checkpoint.progress.step
    if not allow_data_change:
        raise UserError(
            f"The training data changed since '{checkpoint.path}' was written (images, captions, class images or how they "
            "are read), so resuming would not continue the same run. Restore the data, or pass --allow-data-change to "
            f"continue on the changed data (steps after {step} then train on it)."
        )
    print(f"warning: the training data changed since the checkpoint; steps after {step} train on the new data, so the result will differ from an uninterrupted run.")


def train(
    recipe: Recipe, resume: str | None = None, show_progress: bool = True, overwrite: bool = False, allow_data_change: bool = False,
    count_flops_of_step: int | None = None,
) -> TrainResult:
    """Train ``recipe``; ``resume`` continues a checkpoint ('latest' or a folder).

    Without ``resume`` an earlier run in output.dir is refused, or with ``overwrite`` moved aside
    (trainer.run_folder). With it, recipe changes are checked against the checkpoint's (trainer.resume);
    ``allow_data_change`` lets a resume continue on changed data. ``count_flops_of_step`` (for benchmarks)
    counts that optimizer step's floating-point operations into ``TrainResult.step_flops``.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from trainer.data import LatentCache, TextCache, TrainingData, module_fingerprint, vae_fingerprint
    from trainer.data.cache import latent_masks

    # Recipes built in code (tests, the bench) did not pass through load_recipe.
    validate_recipe(recipe)
    cfg = recipe.train
    mixed_precision = _mixed_precision(cfg.mixed_precision)
    output_dir = Path(recipe.output.dir)
    method_cls = method_class(recipe.method)
    if cfg.shard_model and not method_cls.trains_whole_parts:
        raise UserError(
            f"Recipe key 'train.shard_model' is true, but method '{recipe.method}' trains small modules beside a frozen base model; "
            "sharding the trained weights is for full fine-tunes (method: dreambooth). Set train.shard_model=false; "
            "train.shard_optimizer=true splits the optimizer state of any method across the processes."
        )
    # The base is located (its family told) before anything else reads the recipe: the family fills what
    # the recipe leaves to it, in the recipe itself, so checkpoints, resume checks and recipe.yaml agree.
    source = locate_base(recipe.model.base, recipe.model.family, recipe.model.allow_unsafe_pickle)
    if recipe.data.resolution is None:
        recipe.data.resolution = source.family.default_resolution
    training_key = method_cls.text_encoder_training_key(recipe)
    if recipe.data.cache_text_encoder_outputs != "none" and training_key:
        raise UserError(
            f"Recipe key 'data.cache_text_encoder_outputs' is '{recipe.data.cache_text_encoder_outputs}', but {training_key} trains a "
            "text encoder, whose outputs change every step. Set data.cache_text_encoder_outputs=none, or stop training the text encoder."
        )
    recipe_dict = recipe_to_dict(recipe)
    prepare_environment()
    _forget_other_mixed_precision(mixed_precision)
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        log_with="tensorboard" if recipe.output.tensorboard else None,
        project_dir=str(output_dir / "logs"),
    )
    world = world_of(accelerator)
    say = print if world.is_main else _quiet
    if resume and overwrite:
        raise UserError("--resume continues the run in output.dir and --overwrite moves it aside: pass one of them.")
    earlier = [] if resume else earlier_run(output_dir, recipe_dict)
    if earlier and not overwrite:
        raise refuse_earlier_run(output_dir, earlier)
    checkpoint = load_checkpoint(resolve_checkpoint(output_dir, resume)) if resume else None
    # Every process has looked at the folder before the main one changes it.
    barrier(world)
    if world.is_main:
        sweep_leftovers(output_dir)

    # One global batch of processes x batch_size samples per micro-step; each process trains its slice.
    data = TrainingData(
        recipe.data, seed=cfg.seed, batch_size=cfg.batch_size * world.processes, reg_loss_weight=method_cls.reg_loss_weight(recipe),
        validation_split=recipe.validation.split, validation_seed=recipe.validation.seed,
    )
    for warning in data.warnings:
        say(f"warning: {warning}")
    source_fingerprint = data.fingerprint
    data_change_reported = False
    if checkpoint:
        resume_check = check_resume(checkpoint, recipe_dict, source_fingerprint, allow_data_change, world.processes)
        for warning in resume_check.warnings:
            say(f"warning: {warning}")
        data_change_reported = resume_check.data_changed is True
        if world.is_main:
            _announce_later_checkpoints(output_dir, checkpoint.progress.step)

    set_seed(cfg.seed)
    # The dtype the frozen weights are kept in and autocast computes in ("no": fp32 throughout).
    compute_dtype = "fp32" if mixed_precision == "no" else mixed_precision
    weight_dtype = DTYPES[compute_dtype]

    # Frozen parts load straight in the compute dtype: a half-precision file is never widened to fp32 first.
    model = load_recipe_model(recipe.model, source, frozen_dtype=weight_dtype, full_precision_parts=method_cls.full_precision_parts(recipe))
    model.objective_settings = diffusion.ObjectiveSettings.from_train(cfg)
    _check_fits_model(recipe, model)
    method = method_cls(recipe, model)
    device = accelerator.device
    # The main process completes the data first (e.g. draws class images); the others then find it done.
    with accelerator.main_process_first():
        data = method.prepare_data(data, device)
    if checkpoint and not data_change_reported:
        _data_changed(checkpoint, data, allow_data_change)
    method.setup()
    trainable = _prepare_model(model, method, device, weight_dtype, cfg.gradient_checkpointing)
    broadcast_parameters(trainable, world)
    sharding = ModelSharding(method.trainable_modules(), world, cfg.shard_model)
    trainable = sharding.trained_parameters(trainable)
    optimizer = build_optimizer(method.param_groups(), cfg, world.processes)
    lr_scheduler = build_lr_scheduler(optimizer, cfg)
    # The scheduler is stepped by hand once per optimizer step: accelerate's wrapper would step it once per
    # process, ending the schedule early with several processes. No device placement: the state is empty
    # now, a checkpoint's is placed by load_state_dict, and a sharded optimizer has no whole state to move.
    optimizer = accelerator.prepare_optimizer(optimizer, device_placement=False)

    progress = Progress()
    if checkpoint:
        checkpoint.restore(method, optimizer, lr_scheduler, world)
        sharding.shard_optimizer_state(optimizer)
        progress = checkpoint.progress
        say(f"Resumed from {checkpoint.path} at step {progress.step}.")
        if device.type == "cpu" and checkpoint.state.get("cpu_threads") not in (None, torch.get_num_threads()):
            say(
                f"warning: the checkpoint was written with {checkpoint.state['cpu_threads']} CPU threads, this run uses "
                f"{torch.get_num_threads()}; the result will match an uninterrupted run only to rounding. Set OMP_NUM_THREADS to match."
            )

    cache_dir = Path(recipe.data.cache_dir) if recipe.data.cache_dir else output_dir / "latent_cache"
    cache = LatentCache(recipe.data.cache_latents, cache_dir, vae_fingerprint(model.vae) if recipe.data.cache_latents != "none" else "")
    text_mode = recipe.data.cache_text_encoder_outputs
    if text_mode != "none":
        settings = f"clip_skip={recipe.model.clip_skip}|max_token_length={recipe.data.max_token_length}"
        method.use_text_cache(TextCache(text_mode, cache_dir, module_fingerprint(model.text_encoder_modules().values()) + "|" + settings))

    def encode_mean(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.encode_latents(pixels.to(device))

    validator = Validator.from_recipe(recipe, data, model.objective.scheduler.config.num_train_timesteps, output_dir)
    if validator and checkpoint:
        validator.resume_table(checkpoint.progress.step)

    if world.is_main:
        if earlier:
            print(f"Moved the earlier run's files ({', '.join(path.name for path in earlier)}) to {move_aside(output_dir, earlier)}")
        output_dir.mkdir(parents=True, exist_ok=True)
        write_text(output_dir / "recipe.yaml", recipe_to_yaml(recipe))
        if validator:
            write_text(output_dir / VALIDATION_IMAGES, validator.describe())
    barrier(world)
    if recipe.output.tensorboard:
        accelerator.init_trackers("sdtrain", config={k: v for k, v in flatten(recipe_dict).items() if isinstance(v, (int, float, str, bool))})

    # Every entry the run reads is cached once the walk covers the rest of the run, or one whole epoch
    # whose entries repeat in every later one (one process; no flips, or no random caption changes).
    singles, whole_run = warm_start.coming_samples(data, world, progress, cfg) if recipe.data.cache_latents != "none" or text_mode != "none" else ([], False)
    repeats = world.processes == 1
    fixed_captions = not (recipe.data.shuffle_tags or recipe.data.caption_dropout > 0 or recipe.data.tag_dropout > 0)
    if recipe.data.cache_latents != "none":
        warm_start.encode_latents_ahead(singles, cache, encode_mean, show_progress and world.is_main)
    if text_mode != "none":
        warm_start.encode_captions_ahead(singles, method, accelerator.autocast, show_progress and world.is_main)
    warm_start.page_out_unused(
        model, recipe, recipe.data.cache_latents != "none" and (whole_run or (repeats and not recipe.data.flip)),
        text_mode != "none" and (whole_run or (repeats and fixed_captions)), validator is not None, output_dir,
    )
    result = TrainResult(output_dir=output_dir, artifacts=[], compute_dtype=compute_dtype)
    started_at = iso_now()
    accum = cfg.gradient_accumulation_steps
    bar = tqdm(total=cfg.max_steps, initial=progress.step, disable=not (show_progress and world.is_main), unit="step", dynamic_ncols=True)
    step_loss = 0.0
    started = step_started = time.perf_counter()

    # The step whose state is checkpointed already (the one resumed from counts).
    saved_step = checkpoint.progress.step if checkpoint else None
    checkpointed = {step for step, _ in complete_checkpoints(output_dir) if saved_step is not None and step <= saved_step}
    validated_step = None
    step_flops = StepFlops(count_flops_of_step)

    def validate() -> None:
        nonlocal validated_step
        with sharding.whole_weights():
            values = validator.measure(method, model, cache, encode_mean, world, device, accelerator.autocast)
        validated_step = progress.step
        if world.is_main:
            row = validator.record(progress.step, values)
            accelerator.log({f"validation/{key}": value for key, value in row.items() if key != "step"}, step=progress.step)

    def save() -> None:
        nonlocal saved_step
        keep_best = validator is not None and recipe.validation.keep_best
        if keep_best and validated_step != progress.step:
            validate()
        checkpointed.add(progress.step)
        best = validator.best_step(checkpointed) if keep_best else None
        path = save_checkpoint(
            output_dir, progress, method, optimizer, lr_scheduler, recipe_dict, data.fingerprint, source_fingerprint, cfg.keep_checkpoints, world, best,
            sharding,
        )
        result.checkpoints.append(path)
        saved_step = progress.step

    def sample() -> None:
        from trainer.sampling import write_samples

        with sharding.whole_weights():
            if world.is_main:
                result.samples += write_samples(model, recipe, progress.step, output_dir / "samples", device)

    while progress.step < cfg.max_steps:
        batches = data.epoch_batches(progress.epoch)
        while progress.batch_in_epoch < len(batches) and progress.step < cfg.max_steps:
            if progress.micro_step % accum == 0:
                step_started = time.perf_counter()
                step_flops.start(progress.step + 1)
            global_batch = batches[progress.batch_in_epoch]
            samples = world.slice_of(global_batch, cfg.batch_size)
            # A sharded model's weights are gathered by all processes together, so each one runs every
            # micro-step's passes: one without samples in a short last batch trains the batch's first at weight 0.
            stand_in = not samples and sharding.active
            if stand_in:
                samples = list(global_batch[:1])
            loss = None
            if samples:
                batch = data.load_batch(samples, progress.epoch)
                if recipe.data.cache_latents == "none":
                    with torch.no_grad():
                        dist = model.vae.encode(batch.pixel_values().to(device, model.vae.dtype)).latent_dist
                        latents = model.scale_latents(dist.sample(generator=diffusion.sample_generators(cfg.seed, progress.epoch, samples, "latents")))
                    masks = latent_masks(batch, latents)
                else:
                    latents, masks = cache.latents(batch, encode_mean)
                    latents, masks = latents.to(device), masks.to(device) if masks is not None else None
                noise, timesteps, input_noise = model.objective.sample(latents, diffusion.sample_generators(cfg.seed, progress.epoch, samples, "noise"))
                with accelerator.autocast():
                    loss = method.loss(TrainingBatch(
                        latents, batch.captions, batch.geometry, batch.loss_weights, noise, timesteps, data.counted_samples(global_batch), input_noise, masks
                    ))
                if stand_in:
                    loss = loss * 0.0
            # Each process's loss is its share of the global batch's mean: their sum is that mean.
            (batch_loss,) = sum_over_processes([loss.item() if loss is not None else 0.0], world, device)
            if not math.isfinite(batch_loss):
                last = latest_complete(output_dir)
                raise TrainingDiverged(
                    f"Training diverged at step {progress.step + 1}: the loss is {batch_loss}. "
                    + (f"The last good checkpoint is '{last}'. " if last else "No checkpoint was written yet. ")
                    + "Lower train.lr (or use train.mixed_precision=bf16 instead of fp16), then start again or resume from that checkpoint."
                )
            if loss is not None:
                accelerator.backward(loss / accum)
            step_loss += batch_loss / accum
            progress.micro_step += 1
            progress.batch_in_epoch += 1
            if progress.micro_step % accum:
                continue
            sum_gradients(trainable, world)
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            method.after_optimizer_step()
            progress.step += 1
            result.step_seconds.append(time.perf_counter() - step_started)
            result.first_step_ended = result.first_step_ended or time.time()
            result.step_flops = step_flops.stop() or result.step_flops
            result.final_loss = step_loss
            if progress.step % max(cfg.log_every_steps, 1) == 0:
                accelerator.log({"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0]}, step=progress.step)
            bar.set_postfix(loss=f"{step_loss:.4f}", epoch=progress.epoch)
            bar.update(1)
            step_loss = 0.0
            # Samples before the checkpoint of the same step: a run resumed from that checkpoint never draws
            # them, so a complete checkpoint must imply its samples. (Sampling leaves every RNG as it was.)
            if recipe.sample.every_steps and progress.step % recipe.sample.every_steps == 0:
                sample()
            if validator and recipe.validation.every_steps and progress.step % recipe.validation.every_steps == 0:
                validate()
            if cfg.save_every_steps and progress.step % cfg.save_every_steps == 0:
                save()
        if progress.batch_in_epoch >= len(batches):
            progress.epoch += 1
            progress.batch_in_epoch = 0
    bar.close()

    if recipe.sample.prompts and not (recipe.sample.every_steps and progress.step % recipe.sample.every_steps == 0):
        sample()
    if validator and validated_step != progress.step:
        validate()
    # The final state is checkpointed once: not again by a run resumed from it (rewriting it would only
    # open a window in which a kill damages it).
    if progress.step != saved_step:
        save()
    # The optimizer state is in the last checkpoint and no step follows: its memory (twice what trains) goes
    # to the export instead (a full fine-tune's copy of the model, the gathered weights of a sharded one).
    getattr(optimizer, "optimizer", optimizer).state.clear()
    sharding.to_plain(model)
    if world.is_main:
        context = ExportContext(
            output_dir=output_dir, name=recipe.output.name, step=progress.step, epoch=progress.epoch, started_at=started_at, data=data, processes=world.processes
        )
        result.artifacts = method.export(context)
    barrier(world)
    accelerator.end_training()
    elapsed = time.perf_counter() - started
    if not world.is_main:
        return result
    if result.step_seconds:
        print(f"Trained {recipe.method} for {progress.step} steps in {elapsed:.1f}s; final loss {result.final_loss:.4f}.")
    else:
        print(f"Nothing left to train: the run had reached step {progress.step} of {cfg.max_steps}; wrote its artifacts.")
    if validator:
        final = validator.rows[-1]
        best = min(validator.rows, key=lambda row: row["loss"])
        print(f"Validation loss at step {progress.step}: {final['loss']:.5f} (lowest {best['loss']:.5f} at step {int(best['step'])}; every value in {validator.path}).")
    for path in result.artifacts:
        print(f"Wrote {path}")
    return result
