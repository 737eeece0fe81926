"""Frozen parts converted to the compute dtype give back the file pages they were read from; a base model
loads its frozen parts straight in the compute dtype."""

from __future__ import annotations

import mmap
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from trainer.models.conversion import move_part

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps; the pages are given back on Linux only")


def _resident_kib(path) -> int:
    """Resident memory of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                inside = line.rstrip().endswith(str(path))
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


def test_a_mapped_model_converted_to_bf16_gives_its_file_pages_back_and_keeps_every_value(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 384), nn.Linear(384, 256))
    reference = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    path = tmp_path / "model.safetensors"
    save_file(reference, path)
    loaded = load_file(path)  # mapped from the file, as the loaders keep a base model's weights
    model.load_state_dict(loaded, assign=True)
    model.requires_grad_(False)
    model[1].bias.requires_grad_(True)  # one trained parameter: it stays fp32, in place
    assert all(torch.equal(loaded[name], reference[name]) for name in reference)  # every page read once
    total_kib = sum(tensor.numel() * tensor.element_size() for tensor in reference.values()) // 1024
    assert _resident_kib(path) >= total_kib

    move_part(model, torch.device("cpu"), torch.bfloat16)

    state = model.state_dict()
    assert state["1.bias"].dtype == torch.float32 and torch.equal(state["1.bias"], reference["1.bias"])
    assert all(torch.equal(state[name], reference[name].to(torch.bfloat16)) for name in reference if name != "1.bias")
    # Left resident: only pages holding some tensor's first or last byte, at most two per tensor. A converted
    # tensor's pages inside it go; the pages at its ends may hold a neighbour's bytes and stay. The trained
    # bias (1.5 KiB, still read from the file) lies on at most two pages, both holding one of its ends, and
    # the few-hundred-byte header shares the first tensor's first page. Without the madvise every page stays.
    assert _resident_kib(path) <= 2 * len(reference) * mmap.PAGESIZE // 1024
    # What still points at the given-back pages reads the file's values again.
    assert all(torch.equal(loaded[name], reference[name]) for name in reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_half_precision_file_is_read_into_another_dtype_without_keeping_its_file_pages(tmp_path, dtype):
    # Checkpoints are shared in fp16; a base model loads in fp32, or its frozen parts in bf16 for a bf16 run.
    # Each tensor's file pages go once its copy exists, so the file and the converted model are never resident
    # together (an fp16 SDXL file: 7 GB more at the peak).
    from trainer.models.single_file import empty, load_strict

    def build():
        return nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 384), nn.Linear(384, 256))

    torch.manual_seed(0)
    reference = {name: tensor.half() for name, tensor in build().state_dict().items()}
    path = tmp_path / "model-fp16.safetensors"
    save_file(reference, path)
    loaded = load_file(path)  # mapped, as read_state_dict reads a single file
    assert all(torch.equal(loaded[name], reference[name]) for name in reference)  # every page read once
    total_kib = sum(tensor.numel() * tensor.element_size() for tensor in reference.values()) // 1024
    assert _resident_kib(path) >= total_kib

    model = load_strict(empty(build), loaded, "test model", path, "its config", dtype=dtype)

    state = model.state_dict()
    # Each value is the file's, converted once (fp16 -> fp32 is exact; to bf16 it is rounded once, not twice).
    assert all(state[name].dtype == dtype and torch.equal(state[name], reference[name].to(dtype)) for name in reference)
    # While the mapping is still open (`loaded` holds it), only the end pages of each tensor stay, as above.
    assert _resident_kib(path) <= 2 * len(reference) * mmap.PAGESIZE // 1024
    assert all(torch.equal(loaded[name], reference[name]) for name in reference)


def test_frozen_parts_load_straight_in_the_compute_dtype_and_the_method_s_parts_in_fp32(tmp_path):
    # A bf16 run's frozen parts are read from an fp16 file straight into bf16; the parts the method trains or
    # reads at full precision (here the text encoder, as Textual Inversion asks) come in fp32; all load frozen.
    from trainer.models.export import save_diffusers_folder, save_single_file
    from trainer.models.loading import load_base_model

    tiny = load_base_model("tiny")
    path = save_single_file(tiny, tmp_path / "tiny-fp16.safetensors", dtype=torch.float16)
    config = tmp_path / "tiny"  # the tiny architecture's configs (a single file is read with SD1.5's by default)
    save_diffusers_folder(tiny, config, "fp32")
    file = load_file(path)

    model = load_base_model(str(path), config=str(config), frozen_dtype=torch.bfloat16, full_precision_parts={"text_encoders"})

    dtypes = {name: {p.dtype for p in part.parameters()} for name, part in model.parts().items()}
    assert dtypes == {"unet": {torch.bfloat16}, "vae": {torch.bfloat16}, "text_encoder": {torch.float32}}
    assert not any(p.requires_grad for part in model.parts().values() for p in part.parameters())
    assert torch.equal(model.unet.conv_in.weight, file["model.diffusion_model.input_blocks.0.0.weight"].to(torch.bfloat16))
    text_embedding = model.text_encoders[0].model.get_input_embeddings().weight
    assert torch.equal(text_embedding, file["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"].float())
    # The same load with model.vae_fp32 keeps the VAE in fp32 (SDXL's default: its VAE overflows in half precision).
    kept = load_base_model(str(path), config=str(config), frozen_dtype=torch.bfloat16, vae_fp32=True)
    assert {p.dtype for p in kept.vae.parameters()} == {torch.float32}


def _half_folder(tmp_path, variant: str | None):
    """The tiny model as a diffusers folder of fp16 files: the main files (variant None), or only the variant's, as
    from_pretrained(..., variant="fp16") downloads a hub model. Returns (folder, its UNet's fp16 weights)."""
    from trainer.models.base_model import replace_parts
    from trainer.models.loading import load_base_model

    tiny = load_base_model("tiny")
    half = replace_parts(tiny, {name: part.half() for name, part in tiny.parts().items()})
    folder = tmp_path / f"tiny-{variant or 'half'}"
    half.pipeline().save_pretrained(folder, safe_serialization=True, variant=variant)
    return folder, {name: tensor.clone() for name, tensor in half.unet.state_dict().items()}


def test_a_folder_of_fp16_files_loads_into_bf16_without_an_fp32_copy(tmp_path):
    # A bf16 run from a folder of fp16 files (as many are shared) used to widen every weight to fp32 while loading,
    # then narrow it again: at SD1.5 size 3.4 GB more at the peak, at SDXL's 10 GB. Every tensor made while loading
    # is watched: those in fp32 must stay far below one fp32 copy of the weights (without the fix they were 92 % of
    # one, the UNet and VAE widened; what remains is the noise schedule's 1000-step tables and other small buffers).
    from torch.utils._python_dispatch import TorchDispatchMode

    from trainer.models.loading import load_base_model

    folder, unet_weights = _half_folder(tmp_path, None)

    class Fp32Bytes(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32 and tensor.device.type != "meta":
                    Fp32Bytes.total += tensor.numel() * 4
            return out

    with Fp32Bytes():
        model = load_base_model(str(folder), frozen_dtype=torch.bfloat16, vae_fp32=False)

    weights = [tensor for part in model.parts().values() for tensor in part.state_dict().values()]
    fp32_copy_bytes = sum(tensor.numel() * 4 for tensor in weights)
    assert Fp32Bytes.total < 0.01 * fp32_copy_bytes
    assert {tensor.dtype for tensor in weights if tensor.is_floating_point()} == {torch.bfloat16}
    unet = model.unet.state_dict()
    assert all(torch.equal(unet[name], tensor.to(torch.bfloat16)) for name, tensor in unet_weights.items())


def test_a_folder_holding_only_the_fp16_variant_loads(tmp_path):
    # A hub model downloaded with variant="fp16" has only *.fp16.safetensors files: no main weight file, which
    # from_pretrained without the variant reports as an incomplete folder.
    from trainer.models.loading import load_base_model

    folder, unet_weights = _half_folder(tmp_path, "fp16")
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()

    model = load_base_model(str(folder))

    unet = model.unet.state_dict()
    assert all(torch.equal(unet[name], tensor.float()) for name, tensor in unet_weights.items())
    assert {p.dtype for part in model.parts().values() for p in part.parameters()} == {torch.float32}
