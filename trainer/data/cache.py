"""Latent cache: encode each (image, crop, flip) with the VAE once instead of every step.

An entry's key is the batch's cache key (file hash, bucket, resize, crop, flip, pixel pipeline) plus
the VAE's fingerprint, so editing an image, changing buckets, flipping, or swapping the VAE all give
new keys: a stale latent can never be used, at worst it sits unused on disk.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from trainer.atomic import write_file
from trainer.data.dataset import Batch
from trainer.errors import UserError

MODES = ("none", "memory", "disk")


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """sha256 over the VAE's state dict (names, shapes, dtypes and bytes): a fine-tuned or fp16 VAE
    encodes differently, so it must not share cached latents with the original."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode("utf-8"))
        # Viewed as bytes, so bfloat16 (which numpy lacks) hashes like any other dtype.
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class LatentCache:
    """``mode``: "none" (encode every time), "memory" (a dict, lost at exit) or "disk" (one small
    .safetensors per entry in ``directory``, written atomically, so it survives restarts and a crash
    mid-write leaves no half file)."""

    def __init__(self, mode: str, directory: Path | str | None, vae_id: str):
        if mode not in MODES:
            raise UserError(f"data.cache_latents is '{mode}'; use one of: {', '.join(MODES)}.")
        if mode == "disk" and directory is None:
            raise UserError("data.cache_latents is 'disk' but no cache folder was given; set data.cache_dir.")
        self.mode = mode
        self.directory = Path(directory) if directory is not None else None
        self.vae_id = vae_id
        self.hits = 0
        self.misses = 0
        self._memory: dict[str, torch.Tensor] = {}

    def _entry_key(self, cache_key: str) -> str:
        return hashlib.sha256(f"{cache_key}|{self.vae_id}".encode("utf-8")).hexdigest()

    def _path(self, entry: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{entry}.safetensors"

    def _lookup(self, entry: str, cache_key: str) -> torch.Tensor | None:
        if self.mode == "memory":
            return self._memory.get(entry)
        path = self._path(entry)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                # The stored key guards against a hash collision and against files copied in by hand.
                metadata = handle.metadata() or {}
                if metadata.get("cache_key") != cache_key or metadata.get("vae_id") != self.vae_id:
                    return None
                return handle.get_tensor("latents")
        except Exception:  # an unreadable entry is just a miss; it is rewritten below
            return None

    def _store(self, entry: str, cache_key: str, latents: torch.Tensor) -> None:
        if self.mode == "memory":
            self._memory[entry] = latents
            return
        metadata = {"cache_key": cache_key, "vae_id": self.vae_id}
        write_file(self._path(entry), lambda tmp: save_file({"latents": latents}, str(tmp), metadata=metadata))

    def latents(self, batch: Batch, encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The batch's latents [B, C, h, w]; ``encode(pixels)`` (already scaled latents) runs on the misses only.

        Mode "none" returns ``encode``'s output as is. Cached modes keep float32 CPU copies and return
        float32 on the device ``encode`` used (CPU when everything was a hit): move it with ``.to()``.
        """
        if self.mode == "none":
            self.misses += len(batch)
            return encode(batch.pixel_values())
        entries = [self._entry_key(key) for key in batch.cache_keys]
        found = [self._lookup(entry, key) for entry, key in zip(entries, batch.cache_keys)]
        missing = [i for i, latent in enumerate(found) if latent is None]
        self.hits += len(batch) - len(missing)
        self.misses += len(missing)
        device = torch.device("cpu")
        for i in missing:
            # One image at a time: a convolution's float result can depend on the batch it ran in,
            # and a cached latent must not depend on which images happened to share its first batch.
            encoded = encode(batch.pixel_values([i]))
            device = encoded.device
            latent = encoded[0].detach().to("cpu", torch.float32).contiguous()
            self._store(entries[i], batch.cache_keys[i], latent)
            found[i] = latent
        return torch.stack(found).to(device)  # type: ignore[arg-type]  # no None left
