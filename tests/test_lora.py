"""LoRA end to end on the built-in model: a kohya file the UIs and diffusers load, that changes the image."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import draw, fast_overrides
from trainer.formats.safetensors_file import read_metadata
from trainer.loop import train
from trainer.recipe import load_recipe


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    from tests.conftest import REPO

    recipe = load_recipe(
        REPO / "recipes" / "sls_frog_lora.yaml",
        fast_overrides(out, **{"train.max_steps": 20, "train.save_every_steps": 10, "lora.text_encoder": True, "output.formats": "[kohya,diffusers]"}),
    )
    result = train(recipe, show_progress=False)
    return recipe, result


def test_kohya_file_keys_and_shapes(lora_run):
    recipe, result = lora_run
    path = result.output_dir / "sls_frog.safetensors"
    assert path in result.artifacts
    tensors = load_file(path)
    names = {key.split(".")[0] for key in tensors}
    unet = [n for n in names if n.startswith("lora_unet_")]
    te = [n for n in names if n.startswith("lora_te_")]
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in unet
    # The UIs only match text-encoder keys spelled with text_model_ (transformers 5 lacks that level).
    assert te and all(n.startswith("lora_te_text_model_encoder_layers_") for n in te)
    for name in names:
        down, up, alpha = (tensors[f"{name}.{s}"] for s in ("lora_down.weight", "lora_up.weight", "alpha"))
        assert down.shape[0] == up.shape[1] == recipe.lora.rank
        assert alpha.dim() == 0 and alpha.dtype == torch.float32 and alpha.item() == recipe.lora.alpha
    # Training moved the up matrices away from their zero initialisation.
    assert any(tensors[f"{n}.lora_up.weight"].abs().max() > 0 for n in unet)


def test_metadata_and_hash(lora_run):
    recipe, result = lora_run
    path = result.output_dir / "sls_frog.safetensors"
    meta = read_metadata(path)
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "8.0"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_output_name"] == "sls_frog" and meta["ss_steps"] == "20"
    assert meta["ss_training_comment"] == recipe.output.comment
    assert json.loads(meta["ss_tag_frequency"])
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.sai_model_spec"] and meta["modelspec.title"] == "sls_frog"
    assert meta["modelspec.resolution"] == "64x64" and meta["modelspec.implementation"] == "diffusers"
    # AUTOMATIC1111's hash: SHA-256 of everything after the 8-byte length and the JSON header.
    raw = path.read_bytes()
    (header_length,) = struct.unpack("<Q", raw[:8])
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + header_length :]).hexdigest()


def _pipeline(model_dir):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_diffusers_loads_kohya_file_and_it_changes_the_image(lora_run, tmp_path):
    from trainer.models.export import save_diffusers_folder
    from trainer.models.loading import load_base_model

    _, result = lora_run
    save_diffusers_folder(load_base_model("tiny"), tmp_path / "tiny")
    pipe = _pipeline(tmp_path / "tiny")
    before = draw(pipe)
    pipe.load_lora_weights(str(result.output_dir), weight_name="sls_frog.safetensors", adapter_name="sls")
    after = draw(pipe)
    assert np.abs(after - before).max() > 1e-3
    pipe.set_adapters(["sls"], adapter_weights=[0.0])
    # Exactly the base model's image: at weight 0 peft adds lora_B(lora_A(x)) * 0, an exact zero, to the
    # base layer's own output, which is the computation drawing "before" did, operation for operation.
    np.testing.assert_array_equal(draw(pipe), before)


def test_diffusers_format_export_loads(lora_run, tmp_path):
    """The peft layout, saved in output.save_dtype fp16, loads into a plainly loaded float32 pipeline and changes its image."""
    from diffusers import StableDiffusionPipeline

    from trainer.models.export import save_diffusers_folder
    from trainer.models.loading import load_base_model

    _, result = lora_run
    directory = result.output_dir / "sls_frog_diffusers"
    tensors = load_file(directory / "pytorch_lora_weights.safetensors")
    assert {tensor.dtype for tensor in tensors.values()} == {torch.float16}
    assert any(key.startswith("unet.") for key in tensors) and any(key.startswith("text_encoder.") for key in tensors)
    save_diffusers_folder(load_base_model("tiny"), tmp_path / "tiny")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "tiny")
    before = draw(pipe)
    pipe.load_lora_weights(str(directory))
    assert np.abs(draw(pipe) - before).max() > 1e-3
