"""Recipe validation: every mistake is named by its dotted key, with the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.cli import main
from trainer.errors import UserError
from trainer.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_overrides_apply(lora_recipe_path):
    recipe = load_recipe(lora_recipe_path, ["train.max_steps=7", "lora.rank=4", "output.dir=/tmp/x"])
    assert (recipe.train.max_steps, recipe.lora.rank, recipe.output.dir) == (7, 4, "/tmp/x")


def test_unknown_key_names_path_and_closest_key(lora_recipe_path):
    with pytest.raises(UserError, match=r"unknown recipe key 'train\.max_step'.*Did you mean 'train\.max_steps'"):
        load_recipe(lora_recipe_path, ["train.max_step=5"])


def test_unknown_key_in_file_names_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: lora\nlora:\n  rnak: 4\n")
    with pytest.raises(UserError, match=r"r\.yaml: unknown recipe key 'lora\.rnak'.*'lora\.rank'"):
        load_recipe(recipe)


def test_wrong_type_names_key_and_type(lora_recipe_path):
    with pytest.raises(UserError, match=r"'train\.max_steps' has the wrong type.*int"):
        load_recipe(lora_recipe_path, ["train.max_steps=many"])


def test_invalid_yaml_names_line(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("method: lora\ntrain:\n  lr: [1e-4\n")
    with pytest.raises(UserError, match=r"broken\.yaml' is not valid YAML at line"):
        load_recipe(recipe)


def test_unknown_method_suggests_known(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: lorra\n")
    with pytest.raises(UserError, match=r"'method' is 'lorra'.*Did you mean 'lora'"):
        load_recipe(recipe)


def test_missing_method(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  lr: 0.1\n")
    with pytest.raises(UserError, match="no 'method' key"):
        load_recipe(recipe)


def test_cli_bad_input_exits_2_without_traceback(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert "nope.yaml' does not exist" in err and "Traceback" not in err


def test_cli_print_config_shows_resolved_recipe(lora_recipe_path, capsys):
    assert main(["train", str(lora_recipe_path), "lora.rank=3", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "rank: 3" in out and "method: lora" in out


def test_every_shipped_recipe_is_valid():
    recipes = sorted(RECIPES.rglob("*.yaml"))
    assert len(recipes) >= 10
    for path in recipes:
        load_recipe(path)


# --- values: every one is checked when the recipe is read, before any model loads -------------------


@pytest.fixture
def no_model(monkeypatch):
    """A bad value must be refused before the base model is loaded: loading one fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the base model was loaded before the bad recipe value was refused")

    monkeypatch.setattr("trainer.models.loading.load_base_model", refuse)
    monkeypatch.setattr("trainer.loop.load_recipe_model", refuse)


def _refused(capsys, recipe: str, overrides: list[str]) -> str:
    """Run `sdtrain train`; it must exit 2 with one paragraph on stderr and no traceback. Returns stderr."""
    code = main(["train", str(RECIPES / f"{recipe}.yaml"), *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


BAD_VALUES = [
    # (recipe, overrides separated by spaces, the key the message must name)
    ("sls_frog_lora", "train.max_steps=0", "train.max_steps"),
    ("sls_frog_lora", "train.batch_size=0", "train.batch_size"),
    ("sls_frog_lora", "train.gradient_accumulation_steps=0", "train.gradient_accumulation_steps"),
    ("sls_frog_lora", "train.lr=-1", "train.lr"),
    ("sls_frog_lora", "train.lr=0", "train.lr"),
    ("sls_frog_lora", "train.lr=nan", "train.lr"),
    ("sls_frog_lora", "train.lr_scheduler=cosin", "train.lr_scheduler"),
    ("sls_frog_lora", "train.lr_scheduler=piecewise_constant", "train.lr_scheduler"),
    ("sls_frog_lora", "train.lr_warmup_steps=-1", "train.lr_warmup_steps"),
    ("sls_frog_lora", "train.optimizer=sgd", "train.optimizer"),
    ("sls_frog_lora", "train.weight_decay=-0.01", "train.weight_decay"),
    ("sls_frog_lora", "train.adam_beta1=1.0", "train.adam_beta1"),
    ("sls_frog_lora", "train.adam_beta2=-0.5", "train.adam_beta2"),
    ("sls_frog_lora", "train.adam_epsilon=-1e-8", "train.adam_epsilon"),
    ("sls_frog_lora", "train.max_grad_norm=-1", "train.max_grad_norm"),
    ("sls_frog_lora", "train.seed=-1", "train.seed"),
    ("sls_frog_lora", "train.seed=4294967296", "train.seed"),
    ("sls_frog_lora", "train.mixed_precision=fp32", "train.mixed_precision"),
    ("sls_frog_lora", "train.noise_offset=-0.1", "train.noise_offset"),
    ("sls_frog_lora", "train.min_snr_gamma=-5", "train.min_snr_gamma"),
    ("sls_frog_lora", "train.save_every_steps=-1", "train.save_every_steps"),
    ("sls_frog_lora", "train.keep_checkpoints=-1", "train.keep_checkpoints"),
    ("sls_frog_lora", "train.log_every_steps=0", "train.log_every_steps"),
    ("sls_frog_lora", "data.resolution=100", "data.resolution"),
    ("sls_frog_lora", "data.buckets.enabled=false data.resolution=0", "data.resolution"),
    ("sls_frog_lora", "data.buckets.step=12", "data.buckets.step"),
    ("sls_frog_lora", "data.buckets.min_side=1024", "data.buckets.min_side"),
    ("sls_frog_lora", "data.buckets.max_side=64", "data.buckets.max_side"),
    ("sls_frog_lora", "data.caption_dropout=1.5", "data.caption_dropout"),
    ("sls_frog_lora", "data.tag_dropout=-0.1", "data.tag_dropout"),
    ("sls_frog_lora", "data.keep_tokens=-1", "data.keep_tokens"),
    ("sls_frog_lora", "data.tag_separator=''", "data.tag_separator"),
    ("sls_frog_lora", "data.cache_latents=disc", "data.cache_latents"),
    ("sls_frog_lora", "sample.every_steps=-1", "sample.every_steps"),
    ("sls_frog_lora", "sample.every_steps=5 sample.prompts=[]", "sample.every_steps"),
    ("sls_frog_lora", "sample.seed=-1", "sample.seed"),
    ("sls_frog_lora", "sample.steps=0", "sample.steps"),
    ("sls_frog_lora", "sample.guidance_scale=-1", "sample.guidance_scale"),
    ("sls_frog_lora", "sample.width=100", "sample.width"),
    ("sls_frog_lora", "sample.height=-8", "sample.height"),
    ("sls_frog_lora", "output.dir=''", "output.dir"),
    ("sls_frog_lora", "output.save_dtype=fp8", "output.save_dtype"),
    ("sls_frog_lora", "model.base=''", "model.base"),
    ("sls_frog_lora", "model.prediction_type=v", "model.prediction_type"),
    ("sls_frog_lora", "model.clip_skip=0", "model.clip_skip"),
    ("sls_frog_lora", "model.family=sdxl2", "model.family"),
    ("sls_frog_lora", "data.max_token_length=100", "data.max_token_length"),
    ("sls_frog_lora", "data.cache_text_encoder_outputs=gpu", "data.cache_text_encoder_outputs"),
    ("sls_frog_lora", "lora.rank=0", "lora.rank"),
    ("sls_frog_lora", "lora.alpha=0", "lora.alpha"),
    ("sls_frog_lora", "lora.dropout=1.0", "lora.dropout"),
    ("sls_frog_lora", "lora.conv_rank=-1", "lora.conv_rank"),
    ("sls_frog_lora", "lora.conv_rank=4 lora.conv_alpha=-1", "lora.conv_alpha"),
    ("sls_frog_lora", "lora.text_encoder_lr=-1", "lora.text_encoder_lr"),
    ("lycoris_locon", "lycoris.algo=lorra", "lycoris.algo"),
    ("lycoris_locon", "lycoris.rank=0", "lycoris.rank"),
    ("lycoris_locon", "lycoris.conv_rank=-1", "lycoris.conv_rank"),
    ("lycoris_locon", "lycoris.conv_alpha=0", "lycoris.conv_alpha"),
    ("lycoris_lokr", "lycoris.factor=0", "lycoris.factor"),
    ("lycoris_locon", "lycoris.dropout=1.0", "lycoris.dropout"),
    ("lycoris_locon", "lycoris.text_encoder_lr=0", "lycoris.text_encoder_lr"),
    ("sls_frog_dreambooth", "dreambooth.class_prompt=null", "dreambooth.class_prompt"),
    ("sls_frog_dreambooth", "dreambooth.num_class_images=0", "dreambooth.num_class_images"),
    ("sls_frog_dreambooth", "dreambooth.prior_loss_weight=-1", "dreambooth.prior_loss_weight"),
    ("sls_frog_dreambooth", "dreambooth.class_resolution=100", "dreambooth.class_resolution"),
    ("sls_frog_dreambooth", "dreambooth.class_sample_steps=0", "dreambooth.class_sample_steps"),
    ("sls_frog_dreambooth", "dreambooth.class_guidance_scale=-1", "dreambooth.class_guidance_scale"),
    ("sls_frog_dreambooth", "dreambooth.class_batch_size=0", "dreambooth.class_batch_size"),
    ("sls_frog_dreambooth", "dreambooth.class_seed=-1", "dreambooth.class_seed"),
    ("sls_frog_dreambooth", "dreambooth.text_encoder_lr=0", "dreambooth.text_encoder_lr"),
    ("sls_frog_dreambooth", "dreambooth.text_encoder_steps=-1", "dreambooth.text_encoder_steps"),
    ("sls_frog_dreambooth", "dreambooth.ema_decay=1.0", "dreambooth.ema_decay"),
    ("sls_frog_dreambooth", "train.shard_model=true train.shard_optimizer=true", "train.shard_model"),
    ("sls_frog_dreambooth", "train.shard_model=true train.optimizer=adamw8bit", "train.shard_model"),
    ("sls_frog_ti", "textual_inversion.placeholder=''", "textual_inversion.placeholder"),
    ("sls_frog_ti", "textual_inversion.placeholder=sls/frog", "textual_inversion.placeholder"),
    ("sls_frog_ti", "textual_inversion.placeholder=Sls_Frog", "textual_inversion.placeholder"),
    ("sls_frog_ti", "textual_inversion.num_vectors=0", "textual_inversion.num_vectors"),
    ("sls_frog_ti", "textual_inversion.captions=objects", "textual_inversion.captions"),
    ("sls_frog_ti", "textual_inversion.captions=dataset textual_inversion.templates=['{}']", "textual_inversion.templates"),
    ("sls_frog_ti", "textual_inversion.templates=['photo']", "textual_inversion.templates"),
    ("sls_frog_hypernetwork", "hypernetwork.layer_structure=[1,2]", "hypernetwork.layer_structure"),
    ("sls_frog_hypernetwork", "hypernetwork.activation=prelu", "hypernetwork.activation"),
    ("sls_frog_hypernetwork", "hypernetwork.dropout_structure=[0,1,0]", "hypernetwork.dropout_structure"),
    ("sls_frog_hypernetwork", "hypernetwork.weight_init=normal", "hypernetwork.weight_init"),
]


@pytest.mark.parametrize("recipe, overrides, key", BAD_VALUES, ids=[case[1] for case in BAD_VALUES])
def test_a_bad_value_is_refused_with_its_key_before_any_model_loads(capsys, no_model, recipe, overrides, key):
    err = _refused(capsys, recipe, overrides.split())
    assert key in err and err.count("\n") == 1, err


def test_a_typo_in_a_name_suggests_the_closest(capsys, no_model):
    assert "did you mean 'cosine'?" in _refused(capsys, "sls_frog_lora", ["train.lr_scheduler=cosin"])


def test_every_bad_value_is_listed_at_once(capsys, no_model):
    err = _refused(capsys, "sls_frog_lora", ["train.lr=-1", "lora.rank=0", "output.save_dtype=fp8"])
    assert "3 values that cannot train" in err
    assert all(f"- Recipe key '{key}'" in err for key in ("train.lr", "lora.rank", "output.save_dtype"))


def test_only_the_active_methods_section_is_checked():
    # The lycoris and dreambooth sections are unused by a LoRA run, whatever they hold.
    recipe = load_recipe(RECIPES / "sls_frog_lora.yaml", ["lycoris.algo=nonsense", "dreambooth.class_resolution=3"])
    assert recipe.lycoris.algo == "nonsense"
    with pytest.raises(UserError, match=r"'lycoris\.algo' is 'nonsense'"):
        load_recipe(RECIPES / "sls_frog_lora.yaml", ["method=lycoris", "lycoris.algo=nonsense"])


@pytest.mark.parametrize("name", ["../escaped", "sub/model", "sub\\model", ".", "..", ".hidden", "", "c:model", "what?", "tab\there", "a|b"])
def test_output_name_must_be_a_plain_file_name(name):
    with pytest.raises(UserError, match=r"'output\.name' is .*plain file name"):
        load_recipe(RECIPES / "sls_frog_lora.yaml", [f"output.name='{name}'"])


def test_output_name_cannot_escape_the_output_dir(tmp_path, capsys, no_model):
    out = tmp_path / "out"
    err = _refused(capsys, "sls_frog_lora", [f"output.dir={out}", "output.name=../escaped", "train.max_steps=1"])
    assert "output.name" in err
    assert list(tmp_path.iterdir()) == []


def test_output_names_with_spaces_and_accents_are_fine():
    assert load_recipe(RECIPES / "sls_frog_lora.yaml", ["output.name='sls frög v2'"]).output.name == "sls frög v2"


def test_train_checks_recipes_built_in_code(no_model):
    from trainer import loop

    recipe = load_recipe(RECIPES / "sls_frog_lora.yaml")
    recipe.lora.rank = 0
    with pytest.raises(UserError, match=r"'lora\.rank' is 0"):
        loop.train(recipe, show_progress=False)


def test_fp16_without_a_gpu_is_refused_by_the_loop_before_data_and_model(tmp_path, monkeypatch, no_model):
    import torch

    from trainer import loop

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # Valid as a recipe (a GPU machine runs it), so it loads; this machine refuses it before reading any image.
    recipe = load_recipe(RECIPES / "sls_frog_lora.yaml", ["train.mixed_precision=fp16", f"data.dir={tmp_path / 'missing'}"])
    with pytest.raises(UserError, match=r"'train\.mixed_precision' is 'fp16', which needs a CUDA GPU"):
        loop.train(recipe, show_progress=False)


def test_bf16_on_a_cpu_that_does_not_compute_it_is_refused_before_data_and_model(tmp_path, monkeypatch, no_model):
    # Without AVX-512 (or Arm's bf16) torch computes bf16 in plain loops: 200 times slower than fp32 for a matrix
    # product on an AVX2 CPU (docs/benchmarks.md), so a bf16 recipe there would seem to hang.
    import torch

    from trainer import loop

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(loop, "computes_bf16", lambda: False)
    recipe = load_recipe(RECIPES / "sls_frog_lora.yaml", ["train.mixed_precision=bf16", f"data.dir={tmp_path / 'missing'}"])
    with pytest.raises(UserError, match=r"'train\.mixed_precision' is 'bf16', but this CPU \(\w+\) has no instructions .* Set train\.mixed_precision=no"):
        loop.train(recipe, show_progress=False)


def test_sharding_the_model_of_an_adapter_method_is_refused_before_data_and_model(tmp_path, no_model):
    from trainer import loop

    recipe = load_recipe(RECIPES / "sls_frog_lora.yaml", ["train.shard_model=true", f"data.dir={tmp_path / 'missing'}"])
    with pytest.raises(UserError, match=r"'train\.shard_model' is true, but method 'lora' trains small modules.*train\.shard_optimizer=true"):
        loop.train(recipe, show_progress=False)


def test_a_sharded_dreambooth_with_an_ema_is_refused_before_training(tmp_path):
    from trainer import loop

    recipe = load_recipe(RECIPES / "sls_frog_dreambooth.yaml", ["train.shard_model=true", "dreambooth.ema=true", f"output.dir={tmp_path / 'out'}"])
    with pytest.raises(UserError, match=r"'dreambooth\.ema' and 'train\.shard_model' are both true.*Set dreambooth\.ema=false"):
        loop.train(recipe, show_progress=False)
    assert not (tmp_path / "out").exists()


# --- the file itself ------------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["", "\n\n", "# only a comment\n"])
def test_an_empty_recipe_file_says_it_is_empty(tmp_path, content):
    recipe = tmp_path / "empty.yaml"
    recipe.write_text(content)
    with pytest.raises(UserError, match=r"empty\.yaml' is empty"):
        load_recipe(recipe)


def test_dev_null_is_an_empty_recipe_not_a_missing_one(capsys):
    assert main(["train", "/dev/null"]) == 2
    err = capsys.readouterr().err
    assert "'/dev/null' is empty" in err and "does not exist" not in err


def test_a_folder_is_not_a_recipe(tmp_path):
    with pytest.raises(UserError, match="is a folder"):
        load_recipe(tmp_path)
