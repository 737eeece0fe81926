"""SDXL end to end on the built-in tiny SDXL model: conditioning as diffusers and the SDXL paper define it,
single files in Stability's (SGM) layout, and every method's files as the UIs and diffusers read them.

The oracles are other people's code where it exists offline (diffusers' pipeline, its single-file
loader and converters, its LoRA and embedding loaders) and, for ComfyUI's LoRA key map, a re-implementation
of its rule written here from its description (docs/formats.md#kohya-lora): a UNet key
``lora_unet_<SGM module path with _>`` for every SGM weight, ``lora_te1_``/``lora_te2_`` + the text layer.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, fast_overrides, train_keeping_model
from trainer import loop
from trainer.data.dataset import geometry_of
from trainer.errors import UserError
from trainer.formats import lycoris as lycoris_format
from trainer.formats.safetensors_file import read_metadata
from trainer.formats.textual_inversion import read_embedding
from trainer.models.conditioning import ImageGeometry
from trainer.models.export import save_diffusers_folder, save_single_file, single_file_tensors
from trainer.models.loading import load_base_model
from trainer.recipe import load_recipe

RECIPES = REPO / "recipes" / "sdxl"
WIDTHS = (32, 48)  # the tiny SDXL's text encoders (SDXL: 768, 1280)
CONTEXT = sum(WIDTHS)


def _recipe(name: str, out, **overrides):
    return load_recipe(RECIPES / f"{name}.yaml", fast_overrides(out, **overrides))


@pytest.fixture(scope="module")
def base():
    return load_base_model("tiny-sdxl")


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory, base):
    folder = tmp_path_factory.mktemp("tiny_sdxl") / "model"
    save_diffusers_folder(base, folder)
    return folder


def _pipeline(folder):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder), local_files_only=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe, prompt="sls frog, on a rock") -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, height=64, width=64, generator=generator, output_type="np").images[0]


# --- the model and its conditioning ------------------------------------------------------------------


def test_tiny_sdxl_is_sdxl_and_identical_on_every_build(base):
    again = load_base_model("tiny-sdxl")
    assert base.family.name == "sdxl" and [te.component for te in base.text_encoders] == ["text_encoder", "text_encoder_2"]
    assert base.vae.config.scaling_factor == 0.13025 and base.vae_fp32
    for name, part in base.parts().items():
        for key, tensor in part.state_dict().items():
            assert torch.equal(tensor, again.parts()[name].state_dict()[key]), (name, key)


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_text_conditioning_is_what_diffusers_sdxl_pipeline_computes(base, clip_skip):
    pipe = base.pipeline()
    prompts = ["sls frog, sitting on a lily pad", "a photo of a frog"]
    with torch.no_grad():
        ours = base.encode_text(prompts, clip_skip=clip_skip)
        # diffusers' clip_skip counts layers skipped beyond SDXL's own penultimate one.
        context, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, clip_skip=clip_skip - 1 or None)
    assert ours.hidden_states.shape == (2, 77, CONTEXT) and ours.pooled.shape == (2, 40)
    # The same modules on the same tokens in the same order: exactly equal.
    assert torch.equal(ours.hidden_states, context) and torch.equal(ours.pooled, pooled)


def test_pooled_vector_is_taken_at_the_first_end_of_text_token(base):
    """A Textual Inversion token has an id above the vocabulary; pooling at argmax(ids) would land on it."""
    te = base.text_encoders[1]
    model = load_base_model("tiny-sdxl")
    te = model.text_encoders[1]
    te.tokenizer.add_tokens(["sls_word"])
    te.model.resize_token_embeddings(len(te.tokenizer), mean_resizing=False)
    model.text_encoders[0].tokenizer.add_tokens(["sls_word"])
    model.text_encoders[0].model.resize_token_embeddings(len(model.text_encoders[0].tokenizer), mean_resizing=False)
    ids = te.tokenizer(["a sls_word frog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    eos = int((ids[0] == te.tokenizer.eos_token_id).nonzero()[0])
    new = int(ids[0].argmax())
    assert ids[0, new] >= 49408 and new != eos
    with torch.no_grad():
        ours = model.encode_text(["a sls_word frog"])
        last = te.model(ids, output_hidden_states=True).last_hidden_state
    assert torch.equal(ours.pooled[0], te.model.text_projection(last[0, eos]))
    assert not torch.allclose(ours.pooled[0], te.model.text_projection(last[0, new]))


@pytest.mark.parametrize("base_name", ["tiny", "tiny-sdxl"])
def test_long_prompts_are_encoded_in_75_token_chunks(base_name):
    model = load_base_model(base_name)
    # 110 words of one CLIP token each, so a window's words re-encode to exactly its tokens.
    words = [("a", "photo", "of", "red", "frog", "blue", "cat", "green", "tree", "dog")[i * i % 10] for i in range(110)]
    caption = " ".join(words)
    tokenizer = model.text_encoders[0].tokenizer
    ids = tokenizer(caption, add_special_tokens=False).input_ids
    assert len(ids) == 110
    first, second = " ".join(words[:75]), " ".join(words[75:])
    with torch.no_grad():
        long = model.encode_text([caption], max_token_length=150)
        plain = model.encode_text([caption])
        chunks = [model.encode_text([text]) for text in (first, second)]
    assert long.hidden_states.shape[1] == 2 + 150 and plain.hidden_states.shape[1] == 77
    # Every window is encoded on its own: the first 75 inner states are those of the first 75 tokens alone,
    # the next ones those of the rest (each window starts with its own <BOS>).
    torch.testing.assert_close(long.hidden_states[:, 1:76], chunks[0].hidden_states[:, 1:76], rtol=0, atol=0)
    rest = len(ids) - 75
    torch.testing.assert_close(long.hidden_states[:, 76 : 76 + rest], chunks[1].hidden_states[:, 1 : 1 + rest], rtol=0, atol=0)
    if long.pooled is not None:  # the pooled vector comes from the first window, as kohya takes it
        torch.testing.assert_close(long.pooled, plain.pooled, rtol=0, atol=0)


def test_image_geometry_is_the_crop_in_resized_and_flipped_coordinates(tmp_path):
    """diffusers and the SDXL paper: original size before resizing, top-left of the kept window in the
    resized image (mirrored with the image when flipped), target = the bucket."""
    from trainer.data.scan import Item

    item = Item(
        origin=tmp_path / "a.png", relative_path="a.png", caption="", caption_source="none", subset="s", repeats=1, is_reg=False,
        original_size=(300, 200), bucket=(128, 64), resized=(150, 100), crop_ltrb=(11, 18, 139, 82), ar_error=0.0, content_hash="x",
    )
    assert geometry_of(item, flipped=False) == ImageGeometry(original_size=(200, 300), crop_top_left=(18, 11), target_size=(64, 128))
    # Mirrored, the kept window starts 150 - 139 = 11 px from the left edge of the flipped image.
    assert geometry_of(item, flipped=True).crop_top_left == (18, 150 - 139)


def test_size_and_crop_reach_the_unet_as_diffusers_passes_them(base):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    timesteps = torch.tensor([10, 500])
    geometry = [ImageGeometry((200, 300), (18, 11), (64, 64)), ImageGeometry((64, 64), (0, 0), (64, 64))]
    with torch.no_grad():
        text = base.encode_text(["a frog", "a frog"])
        ours = base.predict(latents, timesteps, text, geometry)
        time_ids = torch.tensor([[200, 300, 18, 11, 64, 64], [64, 64, 0, 0, 64, 64]], dtype=latents.dtype)
        expected = base.unet(latents, timesteps, text.hidden_states, added_cond_kwargs={"text_embeds": text.pooled, "time_ids": time_ids}).sample
        uncropped = base.predict(latents, timesteps, text, [geometry[1]] * 2)
    assert torch.equal(ours, expected)
    assert not torch.allclose(ours[0], uncropped[0])


# --- single files ------------------------------------------------------------------------------------


def test_single_file_is_sgm_and_loads_identically_here_and_in_diffusers(base, base_folder, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    path = save_single_file(base, tmp_path / "tiny_sdxl.safetensors", dtype=torch.float32)
    keys = set(load_file(path))
    for prefix in ("model.diffusion_model.label_emb.0.0.", "model.diffusion_model.input_blocks.4.1.", "conditioner.embedders.0.transformer.text_model.",
                   "conditioner.embedders.1.model.transformer.resblocks.9.attn.in_proj_", "first_stage_model."):
        assert any(key.startswith(prefix) for key in keys), prefix
    assert read_metadata(path)["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    ours = load_base_model(str(path), config=str(base_folder))
    theirs = StableDiffusionXLPipeline.from_single_file(str(path), config=str(base_folder), local_files_only=True)
    for name, part in base.parts().items():
        for loaded in (ours.parts()[name], getattr(theirs, name)):
            state = loaded.state_dict()
            for key, tensor in part.state_dict().items():
                assert torch.equal(tensor, state[key].to(tensor.dtype)), (name, key)
    # The projection is not square in the tiny model (40 x 48): a transposed one could not even load.
    assert ours.text_encoders[1].model.text_projection.weight.shape == (40, 48)


def test_sdxl_single_file_without_both_text_encoders_is_refused(base, tmp_path):
    tensors = {key: value for key, value in single_file_tensors(base).items() if not key.startswith("conditioner.embedders.0.")}
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "refiner_like.safetensors")
    with pytest.raises(UserError, match=r"refiner_like.safetensors.*not both of them.*embedders\.0"):
        load_base_model(str(tmp_path / "refiner_like.safetensors"))


def test_family_override_that_contradicts_the_base_is_a_clear_error(base_folder):
    with pytest.raises(UserError, match=r"model\.family' is 'sd1'.*StableDiffusionXLPipeline folder.*Remove model\.family"):
        load_base_model(str(base_folder), family="sd1")
    with pytest.raises(UserError, match="model.family' is 'sdxl'.*Stable Diffusion 1.x model"):
        load_base_model("tiny", family="sdxl")


def test_vae_of_another_architecture_is_refused_by_name(base, tmp_path):
    from diffusers import AutoencoderKL

    other = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                          latent_channels=16, norm_num_groups=16)
    other.save_pretrained(tmp_path / "vae16")
    with pytest.raises(UserError, match=r"model\.vae '.*vae16' has 16 latent channels.*another model family"):
        load_base_model("tiny-sdxl", vae=str(tmp_path / "vae16"))
    from safetensors.torch import save_file

    save_file(other.state_dict(), tmp_path / "vae16.safetensors")
    with pytest.raises(UserError, match=r"vae16.safetensors.*does not match the VAE of this Stable Diffusion XL model"):
        load_base_model("tiny-sdxl", vae=str(tmp_path / "vae16.safetensors"))
    # The same architecture loads, and replaces the base's VAE.
    save_file(base.vae.state_dict(), tmp_path / "same.safetensors")
    assert torch.equal(load_base_model("tiny-sdxl", vae=str(tmp_path / "same.safetensors")).vae.decoder.conv_out.weight, base.vae.decoder.conv_out.weight)


def test_base_tiny_sdxl_writes_a_folder_diffusers_loads_plainly(tmp_path):
    from trainer.cli import main

    assert main(["base", "tiny-sdxl", str(tmp_path / "tiny_sdxl")]) == 0
    pipe = _pipeline(tmp_path / "tiny_sdxl")
    assert _image(pipe).shape == (64, 64, 3)
    assert load_base_model(str(tmp_path / "tiny_sdxl")).family.name == "sdxl"


# --- every method on SDXL ------------------------------------------------------------------------------


def _comfyui_keys(model) -> set[str]:
    """ComfyUI's LoRA key map for an SDXL model: kohya names of the SGM UNet weights and of both CLIP towers' layers."""
    keys = set()
    for key in single_file_tensors(model):
        if key.startswith("model.diffusion_model.") and key.endswith(".weight"):
            keys.add("lora_unet_" + key[len("model.diffusion_model."):-len(".weight")].replace(".", "_"))
    for prefix, te in (("lora_te1", model.text_encoders[0]), ("lora_te2", model.text_encoders[1])):
        for layer in range(te.model.config.num_hidden_layers):
            for module in ("mlp_fc1", "mlp_fc2", "self_attn_k_proj", "self_attn_q_proj", "self_attn_v_proj", "self_attn_out_proj"):
                keys.add(f"{prefix}_text_model_encoder_layers_{layer}_{module}")
    return keys


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sdxl_lora")
    recipe = _recipe("sls_frog_lora", out, **{"train.max_steps": 4, "train.save_every_steps": 2, "lora.text_encoder": True,
                                              "lora.feed_forward": True, "lora.conv_rank": 2, "data.cache_text_encoder_outputs": "none",
                                              "output.formats": "[kohya,diffusers]"})
    return train_keeping_model(recipe)


def test_lora_file_every_key_is_one_comfyui_loads(lora_run, base):
    result, _ = lora_run
    names = {key.split(".")[0] for key in load_file(result.artifacts[0])}
    assert any(n.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") for n in names)
    assert any(n.startswith("lora_te1_text_model_encoder_layers_") for n in names) and any(n.startswith("lora_te2_") for n in names)
    assert any(n.startswith("lora_unet_input_blocks_1_0_in_layers_2") for n in names)  # LoCon on a ResNet conv
    assert names - _comfyui_keys(base) == set()
    meta = read_metadata(result.artifacts[0])
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora" and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"


def test_lora_loads_in_diffusers_both_layouts_and_changes_the_image(lora_run, base_folder):
    result, _ = lora_run
    for source in (result.artifacts[0], result.artifacts[1]):
        pipe = _pipeline(base_folder)
        before = _image(pipe)
        pipe.load_lora_weights(str(source))
        assert set(pipe.get_list_adapters()) == {"unet", "text_encoder", "text_encoder_2"}
        assert np.abs(_image(pipe) - before).max() > 1e-4


def test_lora_merged_as_the_uis_merge_it_predicts_what_training_predicted(lora_run):
    result, trained = lora_run
    merged = load_base_model("tiny-sdxl")
    assert lycoris_format.apply_to_model(load_file(result.artifacts[0]), merged) == []
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    geometry = [ImageGeometry.square(64)]
    with torch.no_grad():
        outputs = [m.predict(latents, torch.tensor([300]), m.encode_text(["sls frog"]), geometry) for m in (trained, merged)]
    # The file is fp16: the merged weights differ from the adapter's by fp16 rounding of the LoRA factors
    # (relative 2^-11 each); the prediction, a sum over many such products, moves by far less than 1e-2.
    assert (outputs[0] - outputs[1]).norm() <= 1e-2 * outputs[0].norm()


@pytest.fixture(scope="module")
def ti_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sdxl_ti")
    recipe = _recipe("sls_frog_ti", out, **{"train.max_steps": 4, "train.save_every_steps": 2, "output.formats": "[a1111,diffusers]"})
    return train_keeping_model(recipe)


def test_ti_file_holds_one_table_per_encoder_and_only_new_rows_change(ti_run, base):
    result, trained = ti_run
    tensors = load_file(result.artifacts[0])
    assert set(tensors) == {"clip_l", "clip_g"}
    assert tensors["clip_l"].shape == (2, WIDTHS[0]) and tensors["clip_g"].shape == (2, WIDTHS[1])
    for te, original in zip(trained.text_encoders, base.text_encoders):
        table = original.model.get_input_embeddings().weight
        new_ids = te.tokenizer.convert_tokens_to_ids(["sls_frog", "sls_frog_1"])
        rows = te.model.get_input_embeddings()(torch.arange(table.shape[0] + 2))
        assert torch.equal(rows[: table.shape[0]], table)
        assert not torch.equal(rows[new_ids], table[te.tokenizer.convert_tokens_to_ids(["frog</w>"] * 2)])
    assert read_embedding(result.artifacts[0]).vectors.keys() == {"clip_l", "clip_g"}


def test_ti_loads_in_diffusers_with_two_calls(ti_run, base_folder):
    result, trained = ti_run
    diffusers_dir = result.output_dir / "sls_frog_diffusers"
    assert {p.name for p in diffusers_dir.iterdir()} >= {"learned_embeds.safetensors", "learned_embeds_2.safetensors"}
    tensors = load_file(result.artifacts[0])
    for source in ("a1111", "diffusers"):
        pipe = _pipeline(base_folder)
        if source == "a1111":
            pipe.load_textual_inversion(tensors["clip_l"], token="sls_frog", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
            pipe.load_textual_inversion(tensors["clip_g"], token="sls_frog", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
        else:
            pipe.load_textual_inversion(str(diffusers_dir / "learned_embeds.safetensors"), text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
            pipe.load_textual_inversion(str(diffusers_dir / "learned_embeds_2.safetensors"), text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
        with torch.no_grad():
            context, _, pooled, _ = pipe.encode_prompt(["a photo of sls_frog"], do_classifier_free_guidance=False)
            ours = trained.encode_text(["a photo of sls_frog sls_frog_1"])
        # The file holds the vectors in fp16 (output.save_dtype); the encoders' outputs move by that rounding only.
        assert (context - ours.hidden_states).norm() <= 1e-2 * ours.hidden_states.norm()
        assert (pooled - ours.pooled).norm() <= 1e-2 * ours.pooled.norm()


def test_ti_a1111_pt_is_refused_for_two_encoders(tmp_path):
    with pytest.raises(UserError, match="a1111_pt.*several text encoders"):
        loop.train(_recipe("sls_frog_ti", tmp_path, **{"output.formats": "[a1111_pt]"}), show_progress=False)


def test_hypernetwork_on_sdxl_uses_the_text_width_and_the_a1111_reader(tmp_path):
    from tests.test_hypernetwork import a1111_load

    result, trained = train_keeping_model(_recipe("sls_frog_hypernetwork", tmp_path, **{"train.max_steps": 2}))
    reference = a1111_load(result.output_dir / "sls_frog.pt")
    # One module pair, for the width of SDXL's text context (2048 on the real model), which only cross-attention sees.
    assert sorted(reference) == [CONTEXT]
    context = torch.randn(1, 77, CONTEXT, generator=torch.Generator().manual_seed(3))
    ours = trained.unet.hypernetwork.pair_for(CONTEXT)
    ours.eval()
    with torch.no_grad():
        for branch, module in zip(("k", "v"), reference[CONTEXT]):
            # fp16 file weights vs the fp32 trained ones: rounding of relative 2^-11 in a residual branch.
            assert (module(context) - ours[branch](context)).norm() <= 1e-3 * context.norm()


def test_sd1_hypernetwork_on_sdxl_warns_that_it_hits_self_attention(tmp_path, capsys):
    from trainer.methods.hypernetwork.module import load_hypernetwork

    sd1 = loop.train(load_recipe(REPO / "recipes" / "sls_frog_hypernetwork.yaml", fast_overrides(tmp_path / "sd1", **{"train.max_steps": 1})), show_progress=False)
    model = load_base_model("tiny-sdxl")
    load_hypernetwork(model.unet, sd1.output_dir / "sls_frog.pt")
    assert "no module for this model's text width (80)" in capsys.readouterr().out


def test_dreambooth_with_prior_preservation_exports_a_single_file_diffusers_loads(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    class_dir = tmp_path / "class"
    recipe = _recipe("sls_frog_dreambooth", tmp_path / "out", **{
        "train.max_steps": 2, "dreambooth.num_class_images": 2, "dreambooth.class_sample_steps": 2, "dreambooth.class_dir": str(class_dir),
        "dreambooth.text_encoder_steps": 1, "output.save_dtype": "fp32",
    })
    result = loop.train(recipe, show_progress=False)
    assert len(list(class_dir.glob("*.png"))) == 2
    single, folder = result.artifacts
    theirs = StableDiffusionXLPipeline.from_single_file(str(single), config=str(folder), local_files_only=True)
    ours = load_base_model(str(folder))
    trained_te2 = ours.text_encoders[1].model.state_dict()
    assert not torch.equal(trained_te2["text_projection.weight"], load_base_model("tiny-sdxl").text_encoders[1].model.text_projection.weight)
    for name, part in ours.parts().items():
        state = getattr(theirs, name).state_dict()
        for key, tensor in part.state_dict().items():
            assert torch.equal(tensor, state[key]), (name, key)


@pytest.mark.parametrize("recipe_name", ["sls_frog_lora", "lycoris_loha", "sls_frog_ti", "sls_frog_hypernetwork", "sls_frog_dreambooth"])
def test_resume_on_sdxl_equals_the_uninterrupted_run(tmp_path, recipe_name):
    settings = {"train.max_steps": 4, "train.save_every_steps": 2, "dreambooth.num_class_images": 2,
                "dreambooth.class_sample_steps": 2, "dreambooth.class_dir": str(tmp_path / "class")}
    full = loop.train(_recipe(recipe_name, tmp_path / "full", **settings), show_progress=False)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-00000002", tmp_path / "resumed" / "checkpoints" / "step-00000002")
    resumed = loop.train(_recipe(recipe_name, tmp_path / "resumed", **settings), resume="latest", show_progress=False)
    for ours, theirs in zip(full.artifacts, resumed.artifacts):
        if ours.suffix == ".safetensors":
            a, b = load_file(ours), load_file(theirs)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), ours.name


def test_cached_text_encoder_outputs_are_reused_and_refused_while_an_encoder_trains(tmp_path, monkeypatch):
    from trainer.data import cache as cache_module

    caches = []
    original = cache_module.TextCache.__init__

    def keep(self, *args, **kwargs):
        original(self, *args, **kwargs)
        caches.append(self)

    monkeypatch.setattr(cache_module.TextCache, "__init__", keep)
    settings = {"train.max_steps": 3, "data.cache_text_encoder_outputs": "disk", "data.cache_dir": str(tmp_path / "cache")}
    first = loop.train(_recipe("sls_frog_lora", tmp_path / "a", **settings), show_progress=False)
    second = loop.train(_recipe("sls_frog_lora", tmp_path / "b", **settings), show_progress=False)
    assert caches[0].misses > 0 and caches[1].misses == 0 and caches[1].hits == caches[0].hits + caches[0].misses
    a, b = load_file(first.artifacts[0]), load_file(second.artifacts[0])
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match="cache_text_encoder_outputs.*lora.text_encoder trains a text encoder"):
        loop.train(_recipe("sls_frog_lora", tmp_path / "c", **settings, **{"lora.text_encoder": True}), show_progress=False)


def test_methods_and_the_loop_never_name_a_model_family():
    """Adding a family touches trainer/families and trainer/models only: no method and not the loop imports a
    family, uses a family's name as an identifier, or compares anything with a family's name."""
    import ast

    from trainer.families import FAMILIES, all_families

    names = set(FAMILIES) | {"is_sd2", "SD1", "SD2", "SDXL"} | {family.pipeline_class_name for family in all_families()}
    sources = [REPO / "trainer" / "loop.py", *sorted((REPO / "trainer" / "methods").rglob("*.py"))]
    hits = []
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.ImportFrom) and "families" in (node.module or ""):
                hits.append(f"{where} imports {node.module}")
            elif isinstance(node, ast.Import) and any("families" in alias.name for alias in node.names):
                hits.append(f"{where} imports a family module")
            elif isinstance(node, ast.Name) and node.id in names or isinstance(node, ast.Attribute) and node.attr in names:
                hits.append(f"{where} names {getattr(node, 'id', None) or node.attr}")
            elif isinstance(node, ast.Compare) and any(isinstance(c, ast.Constant) and c.value in names for c in [node.left, *node.comparators]):
                hits.append(f"{where} compares with a family name")
    assert hits == []


def test_convert_sdxl_between_folder_and_single_file_both_ways(base_folder, base, tmp_path):
    from trainer.cli import main

    assert main(["convert", str(base_folder), str(tmp_path / "tiny_sdxl.safetensors"), "--dtype", "fp32"]) == 0
    assert main(["convert", str(tmp_path / "tiny_sdxl.safetensors"), str(tmp_path / "again"), "--dtype", "fp32", "--config", str(base_folder)]) == 0
    again = load_base_model(str(tmp_path / "again"))
    assert again.family.name == "sdxl"
    for name, part in base.parts().items():
        state = again.parts()[name].state_dict()
        for key, tensor in part.state_dict().items():
            assert torch.equal(tensor, state[key]), (name, key)


def test_resuming_an_sd1_run_on_an_sdxl_base_is_refused_by_name(tmp_path):
    sd1 = load_recipe(REPO / "recipes" / "sls_frog_lora.yaml", fast_overrides(tmp_path, **{"train.max_steps": 2, "train.save_every_steps": 2}))
    loop.train(sd1, show_progress=False)
    sdxl = load_recipe(REPO / "recipes" / "sls_frog_lora.yaml", fast_overrides(tmp_path, **{"train.max_steps": 4, "model.base": "tiny-sdxl"}))
    with pytest.raises(UserError, match=r'model.base: "tiny" -> "tiny-sdxl"'):
        loop.train(sdxl, resume="latest", show_progress=False)
