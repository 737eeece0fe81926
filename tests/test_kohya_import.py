"""``sdtrain import kohya`` / ``export kohya``: kohya settings arrive at the right recipe keys, the recipe
validates and trains, nothing is dropped silently, and the docs' option table is the importer's own."""

from __future__ import annotations

import json
import math
from pathlib import Path


from tests.conftest import REPO, fast_overrides
from trainer.cli import main
from trainer.kohya_import import import_kohya, options_markdown
from trainer.recipe import load_recipe

KOHYA = REPO / "tests" / "data" / "kohya"


def _import(tmp_path: Path, *names: str):
    written = import_kohya([KOHYA / name for name in names], tmp_path / "imported.yaml")
    return load_recipe(written), written.read_text(encoding="utf-8")


def _steps_per_epoch(recipe) -> int:
    """kohya's rule: batches per epoch (every bucket cut into batches) ÷ gradient accumulation, rounded up."""
    from trainer.data import TrainingData

    batches = TrainingData(recipe.data, seed=0, batch_size=recipe.train.batch_size).batches_per_epoch
    return math.ceil(batches / recipe.train.gradient_accumulation_steps)


def test_gui_lora_preset(tmp_path):
    recipe, text = _import(tmp_path, "lora_preset.json")
    assert recipe.method == "lora"
    assert (recipe.lora.rank, recipe.lora.alpha, recipe.lora.conv_rank) == (16, 8.0, 0)  # conv_dim: the GUI passes it only for LoCon types
    assert recipe.train.lr == 2e-4 and recipe.lora.text_encoder_lr == 5e-5  # unet_lr, text_encoder_lr
    assert recipe.lora.text_encoder  # kohya trains the text encoder unless network_train_unet_only
    assert recipe.model.base == "runwayml/stable-diffusion-v1-5" and recipe.model.clip_skip == 2
    assert Path(recipe.data.dir).resolve() == (REPO / "datasets" / "sls_frog").resolve()
    assert (recipe.data.resolution, recipe.data.buckets.min_side, recipe.data.buckets.max_side, recipe.data.buckets.no_upscale) == (128, 64, 256, True)
    assert (recipe.data.shuffle_tags, recipe.data.keep_tokens, recipe.data.caption_dropout, recipe.data.cache_latents) == (True, 1, 0.05, "memory")
    assert (recipe.train.optimizer, recipe.train.weight_decay, recipe.train.adam_beta2) == ("adamw", 0.05, 0.99)  # optimizer_args
    assert recipe.train.max_grad_norm == 0.5  # from the GUI's additional parameters
    assert (recipe.train.seed, recipe.train.lr_scheduler, recipe.train.noise_offset, recipe.train.min_snr_gamma) == (1234, "cosine", 0.05, 5.0)
    # Units: 2 epochs and saving/sampling every epoch become steps; the GUI's warm-up is 10% of the run.
    per_epoch = _steps_per_epoch(recipe)
    assert recipe.train.max_steps == 2 * per_epoch
    assert recipe.train.save_every_steps == recipe.sample.every_steps == per_epoch
    assert recipe.train.lr_warmup_steps == round(0.1 * recipe.train.max_steps)
    sample = recipe.sample
    assert sample.prompts == ["sls frog, sitting on a lily pad", "sls frog jumping in the sky"]
    assert (sample.negative_prompt, sample.width, sample.height, sample.steps, sample.guidance_scale, sample.seed) == ("blurry", 128, 128, 20, 6.5, 7)
    assert (recipe.output.dir, recipe.output.name, recipe.output.save_dtype, recipe.output.formats) == ("output/kohya_frog", "sls_frog_kohya", "fp16", ["kohya"])
    header = text.split("\nmethod:")[0]
    assert (recipe.train.multires_noise_iterations, recipe.train.multires_noise_discount) == (6, 0.3)
    for shown in ("xformers = xformers", "sample_sampler = euler_a", "conv_dim = 1"):
        assert shown in header


def test_no_gui_field_is_dropped_silently(tmp_path):
    _, text = _import(tmp_path, "lora_preset.json")
    fields = json.loads((KOHYA / "lora_preset.json").read_text())
    fields.pop("additional_parameters")  # its options are read as options
    missing = [name for name in fields if name not in text]
    assert not missing, f"neither mapped nor listed: {missing}"


def test_dreambooth_config_and_dataset_toml_with_reg_subset(tmp_path):
    recipe, text = _import(tmp_path, "dreambooth_config.toml")  # names dreambooth_dataset.toml in dataset_config
    assert recipe.method == "dreambooth"
    train, reg = recipe.data.subsets
    assert (Path(train.dir).name, train.repeats, train.caption, train.is_reg) == ("10_sls frog", 10, "sls frog", False)
    assert (Path(reg.dir).name, reg.repeats, reg.caption, reg.is_reg) == ("5_tagged", 1, "frog", True)
    db = recipe.dreambooth
    # kohya draws no class images: its regularisation subset is trained as is, weighted by prior_loss_weight.
    assert (db.prior_preservation, db.prior_loss_weight) == (False, 0.75)
    assert (db.train_text_encoder, db.text_encoder_lr, db.text_encoder_steps) == (True, 1e-6, 30)
    assert (recipe.train.max_steps, recipe.train.lr, recipe.train.lr_warmup_steps) == (60, 2e-6, 6)  # lr_warmup_steps 0.1 = a tenth of the run
    assert (recipe.train.optimizer, recipe.train.gradient_checkpointing, recipe.train.mixed_precision) == ("adamw8bit", True, "bf16")
    assert (recipe.train.save_every_steps, recipe.train.keep_checkpoints) == (20, 2)  # save_last_n_steps 40 = the last two saves
    assert (recipe.output.formats, recipe.output.save_dtype) == (["diffusers"], "bf16")
    assert (recipe.data.resolution, recipe.data.buckets.enabled, recipe.data.cache_latents) == (128, True, "memory")
    assert recipe.sample.prompts == ["sls frog on a lily pad", "a photo of a frog"] and recipe.sample.seed == 100
    header = text.split("\nmethod:")[0]
    assert recipe.train.huber_c == 0.1
    assert "prompt --h per prompt (512, 768)" in header and "color_aug = true (subset" in header


def test_loha_command_line(tmp_path):
    recipe, text = _import(tmp_path, "loha_command.txt")
    assert (recipe.method, recipe.lycoris.algo, recipe.lycoris.preset) == ("lycoris", "loha", "attn-mlp")
    assert (recipe.lycoris.rank, recipe.lycoris.alpha, recipe.lycoris.conv_rank, recipe.lycoris.conv_alpha) == (8, 4.0, 4, 2.0)
    assert not recipe.lycoris.text_encoder  # --network_train_unet_only
    assert recipe.train.lr == 5e-4  # --unet_lr is the UNet's (the run's) rate
    assert (recipe.train.optimizer, recipe.train.weight_decay, recipe.train.adam_beta1, recipe.train.adam_beta2) == ("prodigy", 0.0, 0.9, 0.99)
    per_epoch = _steps_per_epoch(recipe)
    assert (recipe.train.max_steps, recipe.train.save_every_steps) == (3 * per_epoch, per_epoch)
    assert recipe.data.caption_extension == ".txt" and recipe.train.seed == 31 and recipe.output.name == "sls_frog_loha"
    header = text.split("\nmethod:")[0]
    assert "my_custom_flag" in header and 'module_dropout=…" = 0.1' in header and 'd_coef=…" = 2' in header and "sdpa" in header


def test_sdxl_lokr_preset(tmp_path):
    recipe, text = _import(tmp_path, "sdxl_preset.json")
    assert (recipe.model.family, recipe.model.vae_fp32) == ("sdxl", True)
    assert (recipe.method, recipe.lycoris.algo, recipe.lycoris.factor, recipe.lycoris.decompose_both) == ("lycoris", "lokr", 8, True)
    assert (recipe.data.resolution, recipe.data.buckets.step, recipe.data.cache_text_encoder_outputs) == (1024, 32, "memory")
    assert (recipe.train.max_steps, recipe.train.optimizer, recipe.train.lr) == (1200, "prodigy", 1.0)
    assert recipe.train.timestep_range == [0, 1000]  # min_timestep 0, max_timestep 1000
    header = text.split("\nmethod:")[0]
    assert "epoch = 20: the GUI trains max_train_steps" in header and "clip_skip = 1: kohya's SDXL trainers" in header


def test_imported_recipe_trains(tmp_path):
    written = import_kohya([KOHYA / "loha_command.txt"], tmp_path / "loha.yaml")
    overrides = fast_overrides(tmp_path / "run", **{"model.base": "tiny", "train.max_steps": 2, "train.save_every_steps": 0, "train.mixed_precision": "auto"})
    recipe = load_recipe(written, overrides)
    from trainer.loop import train

    train(recipe, show_progress=False)
    assert (tmp_path / "run" / "sls_frog_loha.safetensors").is_file()


def test_export_then_import_gives_the_recipe_back(tmp_path):
    original = load_recipe(REPO / "recipes" / "sls_frog_lora.yaml", [f"data.dir={REPO / 'datasets' / 'sls_frog'}"])
    recipe_path = tmp_path / "lora.yaml"
    from trainer.recipe import recipe_to_yaml

    recipe_path.write_text(recipe_to_yaml(original))
    assert main(["export", "kohya", str(recipe_path), "-o", str(tmp_path / "kohya")]) == 0
    assert {path.name for path in (tmp_path / "kohya").iterdir()} == {"dataset.toml", "train.sh", "prompts.txt"}
    # sd-scripts' parser refuses --max_token_length 75 (only 150 or 225) and it divides by
    # --validate_every_n_steps after every step: the recipe's 75 tokens and "no validation" are the options left out.
    script = (tmp_path / "kohya" / "train.sh").read_text()
    assert "--max_token_length" not in script and "--validate_every_n_steps" not in script
    assert "--sdpa" in script  # the attention sdtrain trains with
    back = load_recipe(import_kohya([tmp_path / "kohya" / "train.sh"], tmp_path / "back.yaml"))
    for key in ("method", "train.max_steps", "train.batch_size", "train.lr", "train.lr_scheduler", "train.lr_warmup_steps", "train.seed",
                "train.weight_decay", "train.min_snr_gamma", "data.max_token_length", "validation.every_steps", "train.save_every_steps", "train.keep_checkpoints", "lora.rank", "lora.alpha",
                "lora.text_encoder", "data.resolution", "data.buckets.min_side", "data.buckets.max_side", "data.cache_latents", "sample.prompts",
                "sample.seed", "sample.steps", "sample.guidance_scale", "sample.every_steps", "output.dir", "output.name", "output.comment"):
        first, second = original, back
        for part in key.split("."):
            first, second = getattr(first, part), getattr(second, part)
        assert first == second, key
    # data.dir's 'N_words' folders come back as the same subset.
    (subset,) = back.data.subsets
    assert (Path(subset.dir), subset.repeats, subset.caption) == (REPO / "datasets" / "sls_frog" / "10_sls frog", 10, "sls frog")


def test_docs_table_is_the_importers(tmp_path):
    text = (REPO / "docs" / "from-kohya.md").read_text(encoding="utf-8")
    start, end = "<!-- options table: generated -->\n", "<!-- end of generated table -->"
    assert start in text and end in text
    assert text.split(start, 1)[1].split(end, 1)[0] == options_markdown(), "regenerate the table: trainer.kohya_import.options_markdown()"


def _fails(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_errors_are_one_paragraph_and_exit_2(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("remember to buy milk\n")
    assert "not a kohya file sdtrain reads" in _fails(capsys, ["import", "kohya", str(notes)])
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert "not valid JSON" in _fails(capsys, ["import", "kohya", str(broken)])
    assert "does not exist" in _fails(capsys, ["import", "kohya", str(tmp_path / "absent.json")])
    moved = tmp_path / "moved.json"
    moved.write_text(json.dumps({"LoRA_type": "Standard", "train_data_dir": "/nowhere/img"}))
    message = _fails(capsys, ["import", "kohya", str(moved), "-o", str(tmp_path / "out.yaml")])
    assert "train_data_dir" in message and "/nowhere/img" in message and str(moved) in message
    other = tmp_path / "flux.txt"
    other.write_text("accelerate launch flux_train_network.py --network_dim 4\n")
    assert "flux_train_network.py" in _fails(capsys, ["import", "kohya", str(other)])


def test_existing_files_are_kept_without_overwrite(tmp_path, capsys):
    target = tmp_path / "mine.yaml"
    target.write_text("method: lora\n")
    assert "--overwrite" in _fails(capsys, ["import", "kohya", str(KOHYA / "loha_command.txt"), "-o", str(target)])
    assert target.read_text() == "method: lora\n"
    assert main(["import", "kohya", str(KOHYA / "loha_command.txt"), "-o", str(target), "--overwrite"]) == 0
    assert load_recipe(target).method == "lycoris"
    out = tmp_path / "kohya"
    out.mkdir()
    (out / "train.sh").write_text("mine\n")
    assert "--overwrite" in _fails(capsys, ["export", "kohya", str(REPO / "recipes" / "lycoris_loha.yaml"), "-o", str(out)])
    assert (out / "train.sh").read_text() == "mine\n"


def test_loss_noise_mask_and_validation_options_are_carried(tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    line = tmp_path / "train.txt"
    line.write_text(
        f'accelerate launch train_network.py --pretrained_model_name_or_path=/m.safetensors --train_data_dir="{REPO / "datasets" / "sls_frog"}" '
        f'--network_module=networks.lora --max_train_steps=10 --output_dir=out --loss_type=smooth_l1 --huber_schedule=exponential '
        f'--huber_c=0.2 --min_timestep=100 --max_timestep=900 --ip_noise_gamma=0.05 --zero_terminal_snr --debiased_estimation_loss '
        f'--masked_loss --conditioning_data_dir="{masks}" --validation_split=0.1 --validation_seed=3 --validate_every_n_steps=5\n',
        encoding="utf-8",
    )
    recipe = load_recipe(import_kohya([line], tmp_path / "imported.yaml"))
    train = recipe.train
    assert (train.loss, train.huber_schedule, train.huber_c, train.timestep_range) == ("smooth_l1", "exponential", 0.2, [100, 900])
    assert (train.ip_noise_gamma, train.zero_terminal_snr, train.debiased_estimation) == (0.05, True, True)
    assert (recipe.data.masks, recipe.data.mask_dir) == ("dir", str(masks))
    assert (recipe.validation.split, recipe.validation.seed, recipe.validation.every_steps) == (0.1, 3, 5)
