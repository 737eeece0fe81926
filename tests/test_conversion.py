"""Frozen parts converted to the compute dtype give back the file pages they were read from."""

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
