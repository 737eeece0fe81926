"""safetensors files as the UIs read them: atomic writes, header metadata, AUTOMATIC1111's hashes.

The keys and how kohya computes the hashes: docs/formats.md#safetensors-metadata.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as serialize

from trainer.atomic import write_bytes
from trainer.errors import UserError
from trainer.formats import DTYPE_NAMES


def data_section(serialized: bytes) -> bytes:
    """The tensor bytes of a serialized safetensors file (after the 8-byte length and the JSON header)."""
    (header_length,) = struct.unpack("<Q", serialized[:8])
    return serialized[8 + header_length :]


def addnet_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) exactly as kohya writes them.

    The model hash is the SHA-256 of the tensor data only, which is what AUTOMATIC1111 (and the
    sd-webui-additional-networks extension) compute, independent of the header. The legacy hash is
    taken from the bytes 0x100000..0x110000 of the file serialized with only the ``ss_*`` metadata.
    """
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    serialized = serialize(tensors, metadata=ss_only)
    model_hash = hashlib.sha256(data_section(serialized)).hexdigest()
    legacy_hash = hashlib.sha256(serialized[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None, *, with_hashes: bool = False) -> Path:
    """Write ``tensors`` to ``path`` atomically; metadata values must be strings (the format says so)."""
    metadata = dict(metadata or {})
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    if with_hashes:
        metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = addnet_hashes(tensors, metadata)
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise TypeError(f"safetensors metadata '{key}' must be a string, got {type(value).__name__}")
    return write_bytes(path, serialize(tensors, metadata=metadata))


# The format's names of the dtypes a checkpoint holds.
_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
    torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


class StreamedSafetensors:
    """A safetensors file written one tensor at a time, for tensors that are never all in memory at once
    (a sharded model's, gathered one by one: trainer.sharding). The header is written first from every
    tensor's dtype and shape, then each tensor's bytes in that order: the same file ``save_file`` writes
    (8-byte little-endian header length, JSON header padded with spaces to 8 bytes, the data)."""

    def __init__(self, path: Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]):
        self.handle = open(path, "wb")
        self.order = list(specs)
        header, offset = {}, 0
        for name, (dtype, shape) in specs.items():
            size = dtype.itemsize * math.prod(shape)
            header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)
        self.handle.write(struct.pack("<Q", len(encoded)) + encoded)
        self.specs = specs

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """The next tensor, in the order of ``specs``."""
        expected = self.order.pop(0)
        dtype, shape = self.specs[expected]
        if name != expected or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"streamed safetensors: got {name} {tensor.dtype} {tuple(tensor.shape)}, expected {expected} {dtype} {shape}")
        self.handle.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())

    def close(self) -> None:
        self.handle.close()
        if self.order:
            raise ValueError(f"streamed safetensors: {len(self.order)} tensors were never written, e.g. {self.order[0]}")

    def __enter__(self) -> StreamedSafetensors:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:
            self.handle.close()


def read_safetensors(path: Path, role: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file's tensors and ``__metadata__``; a UserError naming the file (as ``role``, e.g. "adapter") when
    it cannot be read: a short file, a garbled header, data cut off."""
    metadata = read_metadata(path, role)
    try:
        return load_file(path), metadata
    except (SafetensorError, OSError, ValueError) as err:
        raise _unreadable(path, role, err) from None


def _unreadable(path: Path, role: str, err: Exception) -> UserError:
    return UserError(
        f"{role + ' ' if role else ''}'{path}' cannot be read as a safetensors file ({err or 'too short'}). The file may be truncated; "
        "copy or download it again."
    )


def read_header(path: Path, role: str = "") -> dict:
    """The file's JSON header (each tensor's dtype, shape and offsets, and ``__metadata__``), without reading
    the tensors; a UserError naming the file when it cannot be read."""
    try:
        with open(path, "rb") as handle:
            (header_length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_length))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (struct.error, ValueError) as err:  # a short file, a length past its end, a header that is not JSON
        raise _unreadable(path, role, err) from None
    return header


def read_metadata(path: Path, role: str = "") -> dict[str, str]:
    """The file's ``__metadata__``; a UserError naming the file when its header cannot be read."""
    return read_header(path, role).get("__metadata__", {})


# The header's names of the floating-point dtypes a model is stored in.
HEADER_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def stored_float_dtype(paths: list[Path], role: str = "") -> torch.dtype | None:
    """The one floating-point dtype the files' tensors are stored in; None if they mix several or hold another
    (fp64, fp8) or none."""
    found = {
        entry["dtype"] for path in paths for name, entry in read_header(path, role).items()
        if name != "__metadata__" and entry["dtype"].startswith(("F", "BF"))
    }
    return HEADER_DTYPES.get(found.pop()) if len(found) == 1 else None


def iso_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def modelspec(architecture: str, implementation: str, title: str, resolution: int, prediction_type: str, **extra: str) -> dict[str, str]:
    """Stability AI ModelSpec 1.0.1 keys (docs/formats.md#modelspec): the "must" keys plus date and prediction type."""
    spec = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": architecture,
        "modelspec.implementation": implementation,
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": iso_now(),
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
    }
    spec.update({f"modelspec.{k}": v for k, v in extra.items() if v})
    return spec


DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.float16, torch.bfloat16)))
