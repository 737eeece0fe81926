"""Single-file (original ldm layout) checkpoints: our mapping, diffusers' loader, our loader, bad files.

Tiny models only, except where the real SD1.5/SD2.1 architectures are built on the meta device
(names and shapes, no memory).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from trainer.errors import UserError
from trainer.formats.ldm_checkpoint import (
    CheckpointLayoutError,
    diffusers_to_ldm,
    ldm_to_diffusers,
    save_single_file,
    sd2_text_encoder_to_ldm,
    unet_module_table,
    unet_to_ldm,
    vae_to_ldm,
)
from trainer.formats.safetensors_file import read_metadata
from trainer.models.loading import BaseModel, load_base_model, save_diffusers_folder
from trainer.models.single_file import PACKAGED_CONFIGS, checkpoint_prediction_type, load_single_file
from trainer.models.tiny import sd_noise_scheduler, tiny_vae
from trainer.models.tokenizer import VOCAB_SIZE, clip_tokenizer

COMPONENTS = ("unet", "vae", "text_encoder")


def assert_same_tensors(expected: dict, actual: dict) -> None:
    assert sorted(expected) == sorted(actual)
    for key, tensor in expected.items():
        assert actual[key].shape == tensor.shape, key
        assert torch.equal(actual[key], tensor), key


def tiny_sd2() -> BaseModel:
    """The tiny SD1 topology with SD2's differences: Linear proj_in/out, OpenCLIP-style text encoder
    (gelu, 23 layers like diffusers' SD2 text encoder, "!" padding), v-prediction."""
    with torch.random.fork_rng(devices=[]):  # leave the global RNG as other tests expect it
        torch.manual_seed(2)
        unet = UNet2DConditionModel(
            sample_size=16,
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=(2, 2, 4, 4),
            use_linear_projection=True,
            norm_num_groups=16,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=VOCAB_SIZE,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=23,
                num_attention_heads=2,
                max_position_embeddings=77,
                hidden_act="gelu",
                projection_dim=32,
            )
        )
        vae = tiny_vae()
    parts = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
    for module in parts.values():
        module.eval()
    return BaseModel(
        **parts,
        tokenizer=clip_tokenizer(pad_token="!"),
        noise_scheduler=sd_noise_scheduler("v_prediction"),
        source="test",
        name="tiny-sd2",
    )


def state_dicts(model) -> tuple[dict, dict, dict]:
    return tuple(getattr(model, name).state_dict() for name in COMPONENTS)


def image(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(7)
    return pipe("a photo of a frog", num_inference_steps=2, height=64, width=64, generator=generator, output_type="np").images


def pipeline(parts: dict, reference: StableDiffusionPipeline) -> StableDiffusionPipeline:
    """Our loaded components with the reference pipeline's sampler."""
    return StableDiffusionPipeline(
        **{name: parts[name] for name in (*COMPONENTS, "tokenizer")},
        scheduler=reference.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.fixture(scope="module")
def tiny():
    return load_base_model("tiny")


@pytest.fixture(scope="module")
def tiny_files(tiny, tmp_path_factory):
    """The tiny model as a diffusers folder and as an fp32 single file."""
    root = tmp_path_factory.mktemp("tiny-single-file")
    save_diffusers_folder(tiny, root / "diffusers")
    path = save_single_file(root / "tiny.safetensors", tiny.unet, tiny.vae, tiny.text_encoder, is_v2=False, dtype=torch.float32)
    return root / "diffusers", path


@pytest.fixture(scope="module")
def sd2_files(tmp_path_factory):
    model = tiny_sd2()
    root = tmp_path_factory.mktemp("tiny-sd2-single-file")
    save_diffusers_folder(model, root / "diffusers")
    path = save_single_file(
        root / "tiny-sd2.safetensors", model.unet, model.vae, model.text_encoder, is_v2=True,
        prediction_type="v_prediction", dtype=torch.float32,
    )
    return model, root / "diffusers", path


# ------------------------------------------------------------------------------------------------
# The mapping


def test_diffusers_ldm_diffusers_is_exact(tiny):
    unet_sd, vae_sd, te_sd = state_dicts(tiny)
    ldm = diffusers_to_ldm(unet_sd, vae_sd, te_sd, unet_config=tiny.unet.config, is_v2=False)
    assert {key.split(".")[0] for key in ldm} == {"model", "first_stage_model", "cond_stage_model"}
    back = ldm_to_diffusers(ldm, unet_config=tiny.unet.config, is_v2=False)
    for expected, actual in zip((unet_sd, vae_sd, te_sd), back, strict=True):
        assert_same_tensors(expected, actual)


def test_ldm_diffusers_ldm_is_exact(tiny):
    ldm = diffusers_to_ldm(*state_dicts(tiny), unet_config=tiny.unet.config, is_v2=False)
    ldm = {key: tensor.clone() for key, tensor in ldm.items()}
    again = diffusers_to_ldm(*ldm_to_diffusers(ldm, unet_config=tiny.unet.config, is_v2=False), unet_config=tiny.unet.config, is_v2=False)
    assert_same_tensors(ldm, again)


def test_text_encoder_with_or_without_text_model_prefix(tiny):
    te_sd = tiny.text_encoder.state_dict()
    assert not any(key.startswith("text_model.") for key in te_sd)  # transformers >= 5
    unet_sd, vae_sd, _ = state_dicts(tiny)
    plain = diffusers_to_ldm(unet_sd, vae_sd, te_sd, unet_config=tiny.unet.config, is_v2=False)
    with_prefix = {"text_model." + k: v for k, v in te_sd.items()}
    prefixed = diffusers_to_ldm(unet_sd, vae_sd, with_prefix, unet_config=tiny.unet.config, is_v2=False)
    assert plain.keys() == prefixed.keys()
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in plain
    # Files written without text_model. (older transformers) read the same.
    legacy = {k.replace("transformer.text_model.", "transformer."): v for k, v in plain.items()}
    assert_same_tensors(te_sd, ldm_to_diffusers(legacy, unet_config=tiny.unet.config, is_v2=False)[2])


def test_vae_attention_is_a_1x1_conv_in_ldm(tiny):
    ldm = vae_to_ldm(tiny.vae.state_dict())
    for side in ("encoder", "decoder"):
        for name in ("q", "k", "v", "proj_out"):
            weight = ldm[f"first_stage_model.{side}.mid.attn_1.{name}.weight"]
            assert weight.ndim == 4 and weight.shape[2:] == (1, 1)
    assert "first_stage_model.decoder.up.0.block.1.conv1.weight" in ldm  # ldm numbers up blocks in reverse
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in ldm
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in ldm


def test_vae_matches_diffusers_converter(tiny):
    """diffusers' own ldm -> diffusers VAE converter gives back our input, values included."""
    vae_sd = tiny.vae.state_dict()
    assert_same_tensors(vae_sd, convert_ldm_vae_checkpoint(vae_to_ldm(vae_sd), dict(tiny.vae.config)))


@pytest.mark.parametrize("name", ["sd1", "sd2", "sd2-base"])
def test_real_architectures_match_diffusers_converter(name):
    """Full-size SD1.5/SD2.1 names and shapes (meta device): diffusers' converters invert our mapping."""
    folder = PACKAGED_CONFIGS / name
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
    unet_sd, vae_sd = unet.state_dict(), vae.state_dict()
    ldm_unet = unet_to_ldm(unet_sd, unet.config)
    assert len(ldm_unet) == len(unet_sd) == 686
    back = convert_ldm_unet_checkpoint(ldm_unet, dict(unet.config))
    assert back.keys() == unet_sd.keys() and all(back[k] is unet_sd[k] for k in unet_sd)
    back = convert_ldm_vae_checkpoint(vae_to_ldm(vae_sd), dict(vae.config))
    assert back.keys() == vae_sd.keys() and all(back[k].shape == vae_sd[k].shape for k in vae_sd)


def test_sd1_unet_names_are_the_real_ones():
    """Spot keys as they appear in v1-5-pruned-emaonly.safetensors."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(PACKAGED_CONFIGS / "sd1" / "unet"))
    ldm = unet_to_ldm(unet.state_dict(), unet.config)
    expected_shapes = {
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
        "middle_block.2.emb_layers.1.weight": (1280, 1280),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
        "time_embed.2.weight": (1280, 1280),
        "out.2.weight": (4, 320, 3, 3),
    }
    for key, shape in expected_shapes.items():
        assert tuple(ldm["model.diffusion_model." + key].shape) == shape, key
    assert not any(".op." in k and "input_blocks.12" in k for k in ldm)


def test_sd2_text_encoder_matches_diffusers_converter():
    """Full-size OpenCLIP-H (meta device): 24 blocks with the dummy copy, and diffusers reads back ours."""
    config = CLIPTextConfig.from_pretrained(PACKAGED_CONFIGS / "sd2" / "text_encoder")
    with init_empty_weights():
        model = CLIPTextModel(config)
    te_sd = model.state_dict()
    ldm = sd2_text_encoder_to_ldm(te_sd)
    assert ldm["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3072, 1024)
    assert "cond_stage_model.model.transformer.resblocks.23.mlp.c_proj.bias" in ldm
    assert "cond_stage_model.model.transformer.resblocks.24.ln_1.weight" not in ldm
    back = convert_open_clip_checkpoint(model, ldm)
    assert {k.removeprefix("text_model."): tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in te_sd.items()}


def test_sd2_round_trip_and_dummy_block():
    model = tiny_sd2()
    unet_sd, vae_sd, te_sd = state_dicts(model)
    ldm = diffusers_to_ldm(unet_sd, vae_sd, te_sd, unet_config=model.unet.config, is_v2=True)
    assert ldm["model.diffusion_model.middle_block.1.proj_in.weight"].ndim == 2  # Linear in SD2
    last, dummy = "cond_stage_model.model.transformer.resblocks.22.", "cond_stage_model.model.transformer.resblocks.23."
    assert torch.equal(ldm[dummy + "attn.in_proj_weight"], ldm[last + "attn.in_proj_weight"])
    q = te_sd["encoder.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(ldm["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"][: q.shape[0]], q)
    assert ldm["cond_stage_model.model.text_projection"].shape == (32, 32)
    back = ldm_to_diffusers(ldm, unet_config=model.unet.config, is_v2=True)
    for expected, actual in zip((unet_sd, vae_sd, te_sd), back, strict=True):
        assert_same_tensors(expected, actual)


def test_unsupported_unet_config_is_refused():
    sdxl_like = {"down_block_types": ["DownBlock2D"], "up_block_types": ["UpBlock2D"], "layers_per_block": 2}
    sdxl_like["addition_embed_type"] = "text_time"
    with pytest.raises(CheckpointLayoutError, match="SD1.x/SD2.x"):
        unet_module_table(sdxl_like)


# ------------------------------------------------------------------------------------------------
# The file: diffusers' loader and ours


def test_metadata(tiny_files, sd2_files):
    _, path = tiny_files
    meta = read_metadata(path)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["modelspec.resolution"] == "128x128"
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert meta["modelspec.title"] == "tiny" and meta["modelspec.date"] and meta["modelspec.sai_model_spec"]
    meta = read_metadata(sd2_files[2])
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    assert meta["modelspec.prediction_type"] == "v"


def test_fp16_export(tiny, tmp_path):
    path = save_single_file(
        tmp_path / "half.safetensors", tiny.unet, tiny.vae, tiny.text_encoder, is_v2=False, metadata={"modelspec.title": "Half"}
    )
    tensors = load_file(path)
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.float16}
    assert read_metadata(path)["modelspec.title"] == "Half"
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file, nothing left behind


def test_diffusers_from_single_file_gives_the_same_image(tiny_files):
    folder, path = tiny_files
    reference = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    loaded = StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    for name in COMPONENTS:
        assert_same_tensors(getattr(reference, name).state_dict(), getattr(loaded, name).state_dict())
    np.testing.assert_array_equal(image(reference), image(loaded))


def test_diffusers_from_single_file_sd2(sd2_files):
    model, folder, path = sd2_files
    loaded = StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    for name in COMPONENTS:
        assert_same_tensors(getattr(model, name).state_dict(), getattr(loaded, name).state_dict())


def test_our_loader_gives_the_same_image(tiny, tiny_files):
    folder, path = tiny_files
    parts = load_single_file(path, config_dir=folder, allow_unsafe_pickle=False)
    for name in COMPONENTS:
        assert_same_tensors(getattr(tiny, name).state_dict(), parts[name].state_dict())
        assert not parts[name].training
    scheduler = parts["scheduler"]
    assert scheduler.config.prediction_type == "epsilon" and scheduler.config.clip_sample is False
    assert scheduler.config.beta_schedule == "scaled_linear"
    reference = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    np.testing.assert_array_equal(image(reference), image(pipeline(parts, reference)))


def test_load_base_model_with_single_file(tiny, tiny_files):
    folder, path = tiny_files
    model = load_base_model(str(path), config=str(folder))
    assert model.name == "tiny" and model.version == "sd_v1"
    assert_same_tensors(tiny.unet.state_dict(), model.unet.state_dict())


def test_ckpt_pickle_loads(tiny, tiny_files, tmp_path):
    folder, path = tiny_files
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(path), "global_step": 1}, ckpt)
    parts = load_single_file(ckpt, config_dir=folder, allow_unsafe_pickle=False)
    assert_same_tensors(tiny.vae.state_dict(), parts["vae"].state_dict())


def test_sd2_loader_prediction_type_and_tokenizer(sd2_files, tmp_path):
    model, folder, path = sd2_files
    configs = tmp_path / "configs"
    shutil.copytree(folder, configs, ignore=shutil.ignore_patterns("*.safetensors", "tokenizer"))
    scheduler_file = configs / "scheduler" / "scheduler_config.json"
    scheduler_file.write_text(json.dumps({**json.loads(scheduler_file.read_text()), "prediction_type": "epsilon"}))
    parts = load_single_file(path, config_dir=configs, allow_unsafe_pickle=False)
    for name in COMPONENTS:
        assert_same_tensors(getattr(model, name).state_dict(), parts[name].state_dict())
    assert parts["scheduler"].config.prediction_type == "v_prediction"  # the file's ModelSpec wins
    assert parts["tokenizer"].pad_token == "!"  # generated, OpenCLIP padding


def test_sd2_prediction_type_guess():
    key = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    spread = {key: torch.linspace(-1, 1, 320)}
    flat = {key: torch.full((320,), 0.01)}
    assert checkpoint_prediction_type(spread, {}, is_v2=True) == "v_prediction"
    assert checkpoint_prediction_type(flat, {}, is_v2=True) == "epsilon"
    assert checkpoint_prediction_type(spread, {"modelspec.prediction_type": "epsilon"}, is_v2=True) == "epsilon"
    assert checkpoint_prediction_type(spread, {}, is_v2=False) is None


# ------------------------------------------------------------------------------------------------
# Files that are not what they should be


def expect_user_error(path: Path, *fragments: str, config_dir: Path | None = None) -> str:
    with pytest.raises(UserError) as caught:
        load_single_file(path, config_dir=config_dir, allow_unsafe_pickle=False)
    message = str(caught.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    return message


def test_wrong_config_says_to_set_model_config(tiny_files):
    _, path = tiny_files  # tiny weights, but no config: sdtrain assumes SD1.5
    expect_user_error(path, "stable-diffusion-v1-5", "model.config", "conv_in.weight")


def test_sd1_file_with_sd2_config(tiny_files):
    _, path = tiny_files
    expect_user_error(path, "SD1 checkpoint", "model.config", config_dir=PACKAGED_CONFIGS / "sd2")


def test_garbage_and_truncated_files(tiny_files, tmp_path):
    _, path = tiny_files
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a model" * 10)
    expect_user_error(garbage, "again")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    expect_user_error(truncated, "again")
    ckpt = tmp_path / "truncated.ckpt"
    torch.save(load_file(path), ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    expect_user_error(ckpt, "incomplete")
    text = tmp_path / "notes.ckpt"
    text.write_text("hello")
    expect_user_error(text, "not a PyTorch checkpoint")
    expect_user_error(tmp_path / "model.onnx", "extension")


def test_other_kinds_of_files(tiny_files, tmp_path):
    _, path = tiny_files
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 4)}, lora)
    expect_user_error(lora, "LoRA")
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(4)}, sdxl)
    expect_user_error(sdxl, "SDXL")
    no_vae = tmp_path / "no_vae.safetensors"
    save_file({k: v for k, v in load_file(path).items() if not k.startswith("first_stage_model.")}, no_vae)
    expect_user_error(no_vae, "no VAE")
    extra = tmp_path / "extra.safetensors"
    save_file({**load_file(path), "model.diffusion_model.input_blocks.99.0.in_layers.0.weight": torch.zeros(2)}, extra)
    expect_user_error(extra, "input_blocks.99", config_dir=tiny_files[0])
