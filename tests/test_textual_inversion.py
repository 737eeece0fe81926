"""Textual Inversion end to end on the built-in model: only the new word's vectors train, and every
exported file loads in diffusers (and passes AUTOMATIC1111's pickle check) with exactly those vectors."""

from __future__ import annotations

import pickle
import zipfile

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, draw, fast_overrides, train_keeping_model
from tests.tolerances import assert_close_in_norm, layer_rounding
from trainer import loop
from trainer.data import TrainingData
from trainer.errors import UserError
from trainer.formats.safetensors_file import read_metadata
from trainer.formats.textual_inversion import read_embedding
from trainer.methods.textual_inversion.config import OBJECT_TEMPLATES
from trainer.methods.textual_inversion.method import TextualInversionMethod
from trainer.models.export import save_diffusers_folder
from trainer.models.loading import load_base_model
from trainer.recipe import load_recipe

RECIPE = REPO / "recipes" / "sls_frog_ti.yaml"
TOKENS = ["sls_frog", "sls_frog_1"]  # the recipe's placeholder with num_vectors: 2


def _recipe(output_dir, **overrides):
    return load_recipe(RECIPE, fast_overrides(output_dir, **overrides))


def _trained_vectors(model) -> torch.Tensor:
    (text_encoder,) = model.text_encoders
    ids = torch.tensor(text_encoder.tokenizer.convert_tokens_to_ids(TOKENS))
    with torch.no_grad():
        return text_encoder.model.get_input_embeddings()(ids).float()


def _vectors(path) -> torch.Tensor:
    """The vectors of a one-text-encoder embedding file."""
    (vectors,) = read_embedding(path).vectors.values()
    return vectors


@pytest.fixture(scope="module")
def ti_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ti")
    recipe = _recipe(out, **{"train.max_steps": 10, "train.save_every_steps": 5, "output.formats": "[a1111,a1111_pt,diffusers]"})
    result, model = train_keeping_model(recipe)
    return recipe, result, model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "tiny"
    save_diffusers_folder(load_base_model("tiny"), folder)
    return folder


def _pipeline(folder):
    """The folder loaded as diffusers' docs load one: no dtype, no other option."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder)


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor", "prodigy"])
def test_only_the_placeholder_rows_change(tmp_path, optimizer):
    recipe = _recipe(tmp_path, **{"train.max_steps": 3, "train.optimizer": optimizer, "train.weight_decay": 0.5, "train.lr": 0.05})
    _, trained = train_keeping_model(recipe)
    base = load_base_model("tiny")
    base_encoder, trained_encoder = base.text_encoders[0], trained.text_encoders[0]
    base_table = base_encoder.model.get_input_embeddings().weight
    with torch.no_grad():
        looked_up = trained_encoder.model.get_input_embeddings()(torch.arange(base_table.shape[0]))
    assert torch.equal(looked_up, base_table), "a row of the original vocabulary changed"
    embedding_names = {name for name, _ in base_encoder.model.named_parameters() if "token_embedding" in name}
    for part, module in base.parts().items():
        trained_params = dict(trained.parts()[part].named_parameters())
        for name, param in module.named_parameters():
            if name not in embedding_names:
                assert torch.equal(trained_params[name], param), f"{part}.{name} changed"
    frog = base_table[base_encoder.tokenizer.convert_tokens_to_ids("frog</w>")]
    vectors = _trained_vectors(trained)
    assert vectors.shape == (2, base_table.shape[1])
    assert all(not torch.equal(vector, frog) for vector in vectors), "the placeholder's vectors did not train"


def test_files_are_named_after_the_prompt_word(ti_run):
    _, result, _ = ti_run
    assert result.artifacts == [
        result.output_dir / "sls_frog.safetensors",
        result.output_dir / "sls_frog.pt",
        result.output_dir / "sls_frog_diffusers" / "learned_embeds.safetensors",
    ]


def test_checkpoints_hold_only_the_new_rows(ti_run):
    _, result, model = ti_run
    path = result.checkpoints[-1] / "trainable.safetensors"
    (saved,) = load_file(path).values()
    assert torch.equal(saved, _trained_vectors(model))
    assert path.stat().st_size < 4096


@pytest.mark.parametrize(
    "file_name, token",
    [("sls_frog.safetensors", "sls_frog"), ("sls_frog.pt", None), ("sls_frog_diffusers", None)],
    ids=["a1111", "a1111_pt", "diffusers"],
)
def test_diffusers_loads_each_format_with_the_trained_vectors(ti_run, tiny_folder, file_name, token):
    _, result, model = ti_run
    pipe = _pipeline(tiny_folder)
    pipe.load_textual_inversion(str(result.output_dir / file_name), token=token)
    ids = pipe.tokenizer.convert_tokens_to_ids(TOKENS)
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids], _trained_vectors(model))
    # The pipeline expands the word to both vectors and encodes the prompt as training did.
    assert pipe.maybe_convert_prompt("a photo of sls_frog", pipe.tokenizer) == "a photo of sls_frog sls_frog_1"
    with torch.no_grad():
        from_pipeline, _ = pipe.encode_prompt("a photo of sls_frog", "cpu", 1, False)
        from_training = model.encode_text(["a photo of sls_frog sls_frog_1"]).hidden_states
    # Two codes running the same text encoder: rounding through its layers, bound 4e-5 of the states'
    # norm (measured 0). The word without its second vector moves them by 0.18, the initializer's by 0.44.
    assert_close_in_norm(from_pipeline, from_training, layer_rounding(model.text_encoders[0].model), what="prompt embedding")
    draw(pipe, "a photo of sls_frog")


def test_half_diffusers_embedding_loads_into_a_plainly_loaded_pipeline(tmp_path, tiny_folder):
    """output.save_dtype fp16: the float32 text encoder takes the vectors (rounded once) and the pipeline draws the word."""
    recipe = _recipe(tmp_path, **{"train.max_steps": 2, "output.save_dtype": "fp16", "output.formats": "[diffusers]"})
    result, model = train_keeping_model(recipe)
    (path,) = result.artifacts
    assert _vectors(path).dtype == torch.float16
    pipe = _pipeline(tiny_folder)
    pipe.load_textual_inversion(str(path.parent))
    assert pipe.text_encoder.dtype == torch.float32
    ids = pipe.tokenizer.convert_tokens_to_ids(TOKENS)
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids], _trained_vectors(model).half().float())
    draw(pipe, "a photo of sls_frog")


# The globals AUTOMATIC1111's safe unpickler (modules/safe.py) allows that a tensor dictionary can use.
A1111_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    *(("torch", storage) for storage in ("FloatStorage", "HalfStorage", "BFloat16Storage", "DoubleStorage", "IntStorage", "LongStorage", "ByteStorage")),
    ("__builtin__", "set"),
}


class A1111Unpickler(pickle.Unpickler):
    def persistent_load(self, saved_id):
        assert saved_id[0] == "storage"
        return torch.storage.TypedStorage(_internal=True)

    def find_class(self, module, name):
        if (module, name) not in A1111_ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"AUTOMATIC1111 forbids global {module}.{name}")
        return super().find_class(module, name)


def test_pt_is_a1111s_legacy_pickle_and_loads_with_weights_only(ti_run):
    _, result, model = ti_run
    path = result.output_dir / "sls_frog.pt"
    content = torch.load(path, map_location="cpu", weights_only=True)
    assert set(content) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
    assert list(content["string_to_param"]) == ["*"]
    assert torch.equal(content["string_to_param"]["*"], _trained_vectors(model))
    assert content["name"] == "sls_frog" and content["step"] == 10 and content["sd_checkpoint_name"] == "sdtrain-tiny"
    # AUTOMATIC1111 rejects torch's zip format; its legacy-format check unpickles five objects with a whitelist.
    assert not zipfile.is_zipfile(path)
    with open(path, "rb") as handle:
        unpickler = A1111Unpickler(handle)
        for _ in range(5):
            unpickler.load()


def test_multi_vector_embedding_round_trips_through_every_format(ti_run):
    _, result, model = ti_run
    for path, token in zip(result.artifacts, [None, "sls_frog", "sls_frog"]):
        embedding = read_embedding(path)
        assert torch.equal(embedding.vectors[None], _trained_vectors(model)), path.name
        assert embedding.token == token, path.name


def test_metadata_names_base_model_steps_and_initializer(ti_run):
    recipe, result, _ = ti_run
    for path in (result.artifacts[0], result.artifacts[2]):
        meta = read_metadata(path)
        assert meta["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
        assert meta["modelspec.trigger_phrase"] == "sls_frog" and meta["modelspec.title"] == recipe.output.name
        assert meta["ss_sd_model_name"] == "sdtrain-tiny" and meta["ss_steps"] == "10"
        assert meta["ti_initializer"] == "frog" and meta["ti_num_vectors"] == "2"


def _captions(recipe, epoch: int) -> dict[int, str]:
    method = TextualInversionMethod(recipe, load_base_model("tiny"))
    data = method.prepare_data(TrainingData(recipe.data, seed=recipe.train.seed, batch_size=recipe.train.batch_size), torch.device("cpu"))
    captions = {}
    for batch_samples in data.epoch_batches(epoch):
        batch = data.load_batch(batch_samples, epoch)
        captions.update(zip(batch.sample_indices, batch.captions))
    return captions


def test_templates_are_chosen_per_sample_and_epoch_and_expand_the_word(tmp_path):
    recipe = _recipe(tmp_path)
    first = _captions(recipe, epoch=0)
    expected = {template.replace("{}", "sls_frog sls_frog_1") for template in OBJECT_TEMPLATES}
    assert set(first.values()) <= expected and len(set(first.values())) > 3
    assert _captions(recipe, epoch=0) == first
    assert _captions(recipe, epoch=1) != first


def test_user_templates_replace_the_built_in_ones(tmp_path):
    recipe = _recipe(tmp_path, **{"textual_inversion.templates": "['a {} on a lily pad', '{} in the sky']"})
    assert set(_captions(recipe, epoch=0).values()) == {"a sls_frog sls_frog_1 on a lily pad", "sls_frog sls_frog_1 in the sky"}


def test_dataset_captions_get_the_word_expanded(tmp_path):
    recipe = _recipe(tmp_path, **{"textual_inversion.captions": "dataset", "data.trigger_word": "sls_frog"})
    captions = set(_captions(recipe, epoch=0).values())
    assert "sls_frog sls_frog_1, sls frog, leaping over a pond" in captions
    assert all(caption.startswith("sls_frog sls_frog_1, ") for caption in captions)


def test_resume_equals_the_uninterrupted_run(tmp_path):
    settings = {"train.save_every_steps": 3}
    full = loop.train(_recipe(tmp_path / "full", **settings, **{"train.max_steps": 6}), show_progress=False)
    loop.train(_recipe(tmp_path / "resumed", **settings, **{"train.max_steps": 3}), show_progress=False)
    resumed = loop.train(_recipe(tmp_path / "resumed", **settings, **{"train.max_steps": 6}), resume="latest", show_progress=False)
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        expected, actual = load_file(full.checkpoints[-1] / name), load_file(resumed.checkpoints[-1] / name)
        assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected), name
    assert torch.equal(_vectors(full.artifacts[0]), _vectors(resumed.artifacts[0]))


def test_sd2_width_text_encoder(tmp_path):
    """A 1024-wide text encoder with SD2's tokenizer (one layer, so it stays fast): trains, exports, loads."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from trainer.families.sd import SD2
    from trainer.models import tiny
    from trainer.models.base_model import BaseModel, TextEncoder
    from trainer.models.tokenizer import clip_tokenizer

    width = 1024
    text_config = CLIPTextConfig(
        **{**tiny.tiny_text_encoder().config.to_dict(), "hidden_size": width, "intermediate_size": width, "num_hidden_layers": 1, "num_attention_heads": 16, "projection_dim": width}
    )
    sd2_like = BaseModel(
        family=SD2,
        unet=UNet2DConditionModel.from_config({**tiny.tiny_unet().config, "cross_attention_dim": width}),
        vae=tiny.tiny_vae(),
        text_encoders=[TextEncoder(SD2.text_encoders[0], clip_tokenizer(pad_token="!"), CLIPTextModel(text_config))],
        noise_scheduler=tiny.sd_noise_scheduler(),
        source="sd2-like",
        name="sd2-like",
    )
    untrained_text_encoder = {key: value.clone() for key, value in sd2_like.text_encoders[0].model.state_dict().items()}
    result, model = train_keeping_model(_recipe(tmp_path, **{"train.max_steps": 2}), load=lambda *args, **kwargs: sd2_like)
    (path,) = result.artifacts
    assert _vectors(path).shape == (2, width)
    assert read_metadata(path)["modelspec.architecture"] == "stable-diffusion-v2-512/textual-inversion"

    with torch.device("meta"):
        text_encoder = CLIPTextModel(text_config)
    text_encoder.load_state_dict(untrained_text_encoder, assign=True)
    pipe = StableDiffusionPipeline(
        vae=model.vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(pad_token="!"), unet=model.unet,
        scheduler=model.noise_scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.load_textual_inversion(str(path), token="sls_frog")
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids(TOKENS)], _trained_vectors(model))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"textual_inversion.placeholder": "sls"}, "would pollute that existing word"),
        ({"textual_inversion.placeholder": "frog"}, "would pollute that existing word"),
        ({"textual_inversion.placeholder": "sls frog"}, "cannot hold spaces"),
        ({"textual_inversion.placeholder": "Sls_Frog"}, "use lower case"),
        ({"textual_inversion.initializer": "green frog", "textual_inversion.num_vectors": 1}, "splits into 2 tokens"),
        ({"textual_inversion.templates": "['a photo of a frog']"}, "without {}"),
        ({"textual_inversion.captions": "dataset"}, "no caption mentions the placeholder 'sls_frog'"),
        ({"output.formats": "[kohya]"}, "cannot write"),
    ],
    ids=["existing-word", "existing-piece", "space", "upper-case", "multi-token-initializer", "template-without-slot", "captions-without-word", "format"],
)
def test_bad_input_is_refused_before_training(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        loop.train(_recipe(tmp_path, **overrides), show_progress=False)
    assert not (tmp_path / "checkpoints").exists()
