"""Frozen parts to their device and compute dtype, one tensor at a time, without a second copy of the model.

A base model loaded from ``.safetensors`` files keeps its weights where the files are mapped into
memory: nothing is read until a step reads it. Converting such a model to bf16 reads every fp32 page,
and the pages stay resident until the last tensor of the file is dropped, so the conversion peaked at
the fp32 and the bf16 model together (an SD1.5 UNet: 5.3 GB for a 1.6 GB result, docs/benchmarks.md).
Here each tensor's pages are given back to the OS (Linux ``madvise(MADV_DONTNEED)``) as soon as its
converted copy exists. That only drops the process's view of file pages: read again, they come from
the file, unchanged, so nothing that still points at them loses its values.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import sys

import torch
from torch import nn

_MADV_DONTNEED = 4


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's memory mapped from regular files, sorted; none off Linux."""
    if not sys.platform.startswith("linux"):
        return []
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            # address perms offset dev inode path: an inode and an absolute path name a file's pages
            if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):
                start, end = (int(address, 16) for address in fields[0].split("-"))
                ranges.append((start, end))
    return sorted(ranges)


def _release_file_pages(tensor: torch.Tensor, mappings: list[tuple[int, int]], libc) -> None:
    """Give back the whole pages of a contiguous CPU tensor that lie in a file mapping."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    index = bisect.bisect_right(mappings, (start, float("inf"))) - 1
    if index < 0 or end > mappings[index][1]:
        return
    # Only pages wholly inside the tensor: a page it shares with a neighbour stays.
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


class FileBackedConversion:
    """Converts tensors one by one and gives back each source tensor's file pages once its copy exists.

    Made after the files are mapped: it reads this process's file mappings once."""

    def __init__(self):
        self.mappings = _file_mappings()
        self.libc = ctypes.CDLL(None) if self.mappings else None

    def __call__(self, tensor: torch.Tensor, **to: object) -> torch.Tensor:
        """``tensor.to(**to)``; a copy (not ``tensor`` itself) releases ``tensor``'s file pages."""
        converted = tensor.to(**to)
        if self.mappings and converted.data_ptr() != tensor.data_ptr():
            _release_file_pages(tensor, self.mappings, self.libc)
        return converted


def move_part(part: nn.Module, device: torch.device | None, dtype: torch.dtype) -> None:
    """``part``'s floating-point tensors to ``device`` (None: where they are) in ``dtype``, its trained parameters in fp32.

    Trained parameters keep fp32 values: a round trip through the compute dtype would round a full
    fine-tune's master weights to bf16/fp16 (methods that train base weights load those parts in fp32:
    ``TrainingMethod.full_precision_parts``). Tensor by tensor, so a GPU never holds the fp32 copy of a
    bf16 part either.
    """
    conversion = FileBackedConversion()

    def convert(tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_floating_point():
            return tensor.to(device)
        return conversion(tensor, device=device, dtype=torch.float32 if tensor.requires_grad else dtype)

    part._apply(convert)
