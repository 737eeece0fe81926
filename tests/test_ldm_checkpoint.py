"""Single-file (original ldm layout) SD1/SD2 checkpoints: our mapping, diffusers' loader, our loader, bad files.

Tiny models only, except where the real SD1.5/SD2.1/SDXL architectures are built on the meta device
(names and shapes, no memory). SDXL's files end to end: tests/test_sdxl.py.
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
from trainer.families.base import PACKAGED_CONFIGS
from trainer.families.sd import SD2
from trainer.formats.ldm_checkpoint import (
    TEXT_LAYOUTS,
    CheckpointLayoutError,
    from_single_file,
    to_single_file,
    unet_module_table,
    unet_to_ldm,
    vae_to_ldm,
)
from trainer.formats.safetensors_file import read_metadata
from trainer.models.base_model import BaseModel, TextEncoder
from trainer.models.export import save_diffusers_folder, save_single_file
from trainer.models.loading import load_base_model
from trainer.models.single_file import declared_prediction_type
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
    for module in (unet, vae, text_encoder):
        module.eval()
    (spec,) = SD2.text_encoders
    return BaseModel(
        family=SD2,
        unet=unet,
        vae=vae,
        text_encoders=[TextEncoder(spec, clip_tokenizer(pad_token="!"), text_encoder)],
        noise_scheduler=sd_noise_scheduler("v_prediction"),
        source="test",
        name="tiny-sd2",
    )


def state_dicts(model) -> dict[str, dict]:
    return {name: part.state_dict() for name, part in model.parts().items()}


def components(model) -> dict:
    """The model's parts and tokenizer by pipeline component name."""
    return {**model.parts(), "tokenizer": model.text_encoders[0].tokenizer}


def image(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(7)
    return pipe("a photo of a frog", num_inference_steps=2, height=64, width=64, generator=generator, output_type="np").images


def pipeline(model: BaseModel, reference: StableDiffusionPipeline) -> StableDiffusionPipeline:
    """Our loaded components with the reference pipeline's sampler."""
    parts = components(model)
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
    path = save_single_file(tiny, root / "tiny.safetensors", dtype=torch.float32)
    return root / "diffusers", path


@pytest.fixture(scope="module")
def sd2_files(tmp_path_factory):
    model = tiny_sd2()
    root = tmp_path_factory.mktemp("tiny-sd2-single-file")
    save_diffusers_folder(model, root / "diffusers")
    path = save_single_file(model, root / "tiny-sd2.safetensors", dtype=torch.float32)
    return model, root / "diffusers", path


# ------------------------------------------------------------------------------------------------
# The mapping


def test_diffusers_ldm_diffusers_is_exact(tiny):
    parts = state_dicts(tiny)
    ldm = to_single_file(parts, unet_config=tiny.unet.config, layout="sd1")
    assert {key.split(".")[0] for key in ldm} == {"model", "first_stage_model", "cond_stage_model"}
    back = from_single_file(ldm, unet_config=tiny.unet.config, layout="sd1")
    assert back.keys() == parts.keys()
    for name, expected in parts.items():
        assert_same_tensors(expected, back[name])


def test_ldm_diffusers_ldm_is_exact(tiny):
    ldm = to_single_file(state_dicts(tiny), unet_config=tiny.unet.config, layout="sd1")
    ldm = {key: tensor.clone() for key, tensor in ldm.items()}
    again = to_single_file(from_single_file(ldm, unet_config=tiny.unet.config, layout="sd1"), unet_config=tiny.unet.config, layout="sd1")
    assert_same_tensors(ldm, again)


def test_text_encoder_with_or_without_text_model_prefix(tiny):
    parts = state_dicts(tiny)
    te_sd = parts["text_encoder"]
    assert not any(key.startswith("text_model.") for key in te_sd)  # transformers >= 5
    plain = to_single_file(parts, unet_config=tiny.unet.config, layout="sd1")
    prefixed = to_single_file({**parts, "text_encoder": {"text_model." + k: v for k, v in te_sd.items()}}, unet_config=tiny.unet.config, layout="sd1")
    assert plain.keys() == prefixed.keys()
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in plain
    # Files written without text_model. (older transformers) read the same.
    legacy = {k.replace("transformer.text_model.", "transformer."): v for k, v in plain.items()}
    assert_same_tensors(te_sd, from_single_file(legacy, unet_config=tiny.unet.config, layout="sd1")["text_encoder"])


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


@pytest.mark.parametrize("name, tensors", [("sd1", 686), ("sd2", 686), ("sd2-base", 686), ("sdxl", 1680)])
def test_real_architectures_match_diffusers_converter(name, tensors):
    """Full-size SD1.5/SD2.1/SDXL names and shapes (meta device): diffusers' converters invert our mapping."""
    folder = PACKAGED_CONFIGS / name
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
    unet_sd, vae_sd = unet.state_dict(), vae.state_dict()
    ldm_unet = unet_to_ldm(unet_sd, unet.config)
    assert len(ldm_unet) == len(unet_sd) == tensors
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


def test_sdxl_unet_names_are_the_real_ones():
    """Spot keys as they appear in sd_xl_base_1.0.safetensors (SGM layout)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(PACKAGED_CONFIGS / "sdxl" / "unet"))
    ldm = unet_to_ldm(unet.state_dict(), unet.config)
    expected_shapes = {
        "label_emb.0.0.weight": (1280, 2816),
        "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": (640, 2048),
        "input_blocks.7.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
        "input_blocks.6.0.op.weight": (640, 640, 3, 3),
        "middle_block.1.transformer_blocks.9.attn1.to_q.weight": (1280, 1280),
        "output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        "output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
        "out.2.weight": (4, 320, 3, 3),
    }
    for key, shape in expected_shapes.items():
        assert tuple(ldm["model.diffusion_model." + key].shape) == shape, key
    assert not any(key.startswith("model.diffusion_model.output_blocks.8.1.") for key in ldm)  # the last level has no attention


@pytest.mark.parametrize("name, component", [("sd2", "text_encoder"), ("sdxl", "text_encoder_2")])
def test_openclip_text_encoders_match_diffusers_converter(name, component):
    """Full-size OpenCLIP-H (SD2: 24 blocks with the dummy copy) and OpenCLIP-bigG (SDXL: 32 blocks and the
    projection) on the meta device: diffusers reads back ours."""
    from transformers import CLIPTextModelWithProjection

    config = CLIPTextConfig.from_pretrained(PACKAGED_CONFIGS / name / component)
    with init_empty_weights():
        model = (CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel)(config)
    te_sd = model.state_dict()
    (text_layout,) = [layout for layout in TEXT_LAYOUTS[name] if layout.openclip]
    ldm = text_layout.to_file(te_sd)
    prefix = text_layout.prefix
    if name == "sdxl":
        assert ldm[prefix + "transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)
        assert ldm[prefix + "text_projection"].shape == (1280, 1280) and prefix + "transformer.resblocks.32.ln_1.weight" not in ldm
        back = convert_open_clip_checkpoint(model, ldm, prefix=prefix)
        assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in te_sd.items()}
        return
    assert ldm["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3072, 1024)
    assert "cond_stage_model.model.transformer.resblocks.23.mlp.c_proj.bias" in ldm
    assert "cond_stage_model.model.transformer.resblocks.24.ln_1.weight" not in ldm
    back = convert_open_clip_checkpoint(model, ldm)
    assert {k.removeprefix("text_model."): tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in te_sd.items()}


def test_sd2_round_trip_and_dummy_block():
    model = tiny_sd2()
    parts = state_dicts(model)
    te_sd = parts["text_encoder"]
    ldm = to_single_file(parts, unet_config=model.unet.config, layout="sd2")
    assert ldm["model.diffusion_model.middle_block.1.proj_in.weight"].ndim == 2  # Linear in SD2
    last, dummy = "cond_stage_model.model.transformer.resblocks.22.", "cond_stage_model.model.transformer.resblocks.23."
    assert torch.equal(ldm[dummy + "attn.in_proj_weight"], ldm[last + "attn.in_proj_weight"])
    q = te_sd["encoder.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(ldm["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"][: q.shape[0]], q)
    assert ldm["cond_stage_model.model.text_projection"].shape == (32, 32)
    back = from_single_file(ldm, unet_config=model.unet.config, layout="sd2", text_encoder_layers={"text_encoder": 23})
    for name, expected in parts.items():
        assert_same_tensors(expected, back[name])


def test_unsupported_unet_config_is_refused():
    upscaler_like = {"down_block_types": ["DownBlock2D"], "up_block_types": ["UpBlock2D"], "layers_per_block": 2, "class_embed_type": "timestep"}
    with pytest.raises(CheckpointLayoutError, match="SD1.x/SD2.x/SDXL UNet config.*class embeddings"):
        unet_module_table(upscaler_like)


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
    path = save_single_file(tiny, tmp_path / "half.safetensors", metadata={"modelspec.title": "Half"})
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
        assert_same_tensors(model.parts()[name].state_dict(), getattr(loaded, name).state_dict())


def test_our_loader_gives_the_same_image(tiny, tiny_files):
    folder, path = tiny_files
    loaded = load_base_model(str(path), config=str(folder))
    assert loaded.name == "tiny" and loaded.family.name == "sd1"
    for name, part in tiny.parts().items():
        assert_same_tensors(part.state_dict(), loaded.parts()[name].state_dict())
        assert not loaded.parts()[name].training
    scheduler = loaded.noise_scheduler
    assert scheduler.config.prediction_type == "epsilon" and scheduler.config.clip_sample is False
    assert scheduler.config.beta_schedule == "scaled_linear"
    reference = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    np.testing.assert_array_equal(image(reference), image(pipeline(loaded, reference)))


def test_ckpt_pickle_loads(tiny, tiny_files, tmp_path):
    folder, path = tiny_files
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(path), "global_step": 1}, ckpt)
    loaded = load_base_model(str(ckpt), config=str(folder))
    assert_same_tensors(tiny.vae.state_dict(), loaded.vae.state_dict())


def test_sd2_loader_prediction_type_and_tokenizer(sd2_files, tmp_path):
    model, folder, path = sd2_files
    configs = tmp_path / "configs"
    shutil.copytree(folder, configs, ignore=shutil.ignore_patterns("*.safetensors", "tokenizer"))
    scheduler_file = configs / "scheduler" / "scheduler_config.json"
    scheduler_file.write_text(json.dumps({**json.loads(scheduler_file.read_text()), "prediction_type": "epsilon"}))
    loaded = load_base_model(str(path), config=str(configs))
    assert loaded.family.name == "sd2"
    for name, part in model.parts().items():
        assert_same_tensors(part.state_dict(), loaded.parts()[name].state_dict())
    assert loaded.prediction_type == "v_prediction"  # the file's ModelSpec wins
    assert loaded.text_encoders[0].tokenizer.pad_token == "!"  # generated, OpenCLIP padding


def test_sd2_prediction_type_guess():
    key = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    spread = {key: torch.linspace(-1, 1, 320)}
    flat = {key: torch.full((320,), 0.01)}
    assert SD2.guess_prediction_type(spread) == "v_prediction"
    assert SD2.guess_prediction_type(flat) == "epsilon"
    assert declared_prediction_type(spread, {"modelspec.prediction_type": "epsilon"}) == "epsilon"
    assert declared_prediction_type(spread, {}) is None
    assert declared_prediction_type({"v_pred": torch.zeros(())}, {}) == "v_prediction"  # v-prediction SDXL files' marker


# ------------------------------------------------------------------------------------------------
# Files that are not what they should be


def expect_user_error(path: Path, *fragments: str, config_dir: Path | None = None) -> str:
    with pytest.raises(UserError) as caught:
        load_base_model(str(path), config=str(config_dir) if config_dir else None)
    message = str(caught.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    return message


def test_wrong_config_says_to_set_model_config(tiny_files):
    _, path = tiny_files  # tiny weights, but no config: sdtrain assumes SD1.5
    expect_user_error(path, "Stable Diffusion 1.x configuration", "model.config", "conv_in.weight")


def test_sd1_file_with_sd2_config(tiny_files):
    _, path = tiny_files
    expect_user_error(path, "Stable Diffusion 1.x checkpoint", "describes a Stable Diffusion 2.x model", "model.config", config_dir=PACKAGED_CONFIGS / "sd2")


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
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    expect_user_error(tmp_path / "model.onnx", "extension")


def test_other_kinds_of_files(tiny_files, tmp_path):
    _, path = tiny_files
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 4)}, lora)
    expect_user_error(lora, "LoRA")
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.out.0.weight": torch.zeros(4), "first_stage_model.x": torch.zeros(1), "conditioner.embedders.1.model.ln_final.weight": torch.zeros(4)}, sdxl)
    expect_user_error(sdxl, "SDXL-style text encoders but not both")
    no_vae = tmp_path / "no_vae.safetensors"
    save_file({k: v for k, v in load_file(path).items() if not k.startswith("first_stage_model.")}, no_vae)
    expect_user_error(no_vae, "without a VAE")
    extra = tmp_path / "extra.safetensors"
    save_file({**load_file(path), "model.diffusion_model.input_blocks.99.0.in_layers.0.weight": torch.zeros(2)}, extra)
    expect_user_error(extra, "input_blocks.99", config_dir=tiny_files[0])
