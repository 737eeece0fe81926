"""Caches of what frozen models compute from the data: VAE latents per image, text encoder outputs per caption.

An entry's key holds everything that decides its content - for latents the batch's cache key (file
hash, bucket, resize, crop, flip, pixel pipeline) plus the VAE's fingerprint; for text the caption
itself plus the text encoders' fingerprint and encoding settings - so editing an image or a caption,
changing buckets, flipping, or swapping a model all give new keys: a stale entry can never be used,
at worst it sits unused on disk. Caption shuffling and dropout need no special care: each caption
a step really uses is its own entry (the empty caption of a dropped one included).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from trainer.atomic import write_file
from trainer.data.dataset import Batch
from trainer.data.masks import on_latent_grid
from trainer.errors import UserError
from trainer.models.conditioning import TextConditioning
from trainer.recipe import CACHE_MODES


def module_fingerprint(modules: Iterable[torch.nn.Module]) -> str:
    """sha256 over the modules' state dicts (names, shapes, dtypes and bytes): a fine-tuned or fp16
    model computes differently, so it must not share cached entries with the original."""
    digest = hashlib.sha256()
    for index, module in enumerate(modules):
        for name, tensor in sorted(module.state_dict().items()):
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{index}|{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode("utf-8"))
            # Viewed as bytes, so bfloat16 (which numpy lacks) hashes like any other dtype.
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def vae_fingerprint(vae: torch.nn.Module) -> str:
    return module_fingerprint([vae])


class TensorCache:
    """``mode``: "none" (nothing kept), "memory" (a dict, lost at exit) or "disk" (one small .safetensors
    per entry in ``directory``, written atomically, so it survives restarts and a crash mid-write leaves
    no half file). ``owner_id`` (a model fingerprint and settings) is part of every entry's key.
    ``setting``: the recipe key that chose the mode, for messages."""

    def __init__(self, mode: str, directory: Path | str | None, owner_id: str, setting: str):
        if mode not in CACHE_MODES:
            raise UserError(f"{setting} is '{mode}'; use one of: {', '.join(CACHE_MODES)}.")
        if mode == "disk" and directory is None:
            raise UserError(f"{setting} is 'disk' but no cache folder was given; set data.cache_dir.")
        self.mode = mode
        self.directory = Path(directory) if directory is not None else None
        self.owner_id = owner_id
        self.hits = 0
        self.misses = 0
        self._memory: dict[str, dict[str, torch.Tensor]] = {}

    def _entry(self, key: str) -> str:
        return hashlib.sha256(f"{key}|{self.owner_id}".encode("utf-8")).hexdigest()

    def _path(self, entry: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{entry}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        entry = self._entry(key)
        if self.mode == "memory":
            return self._memory.get(entry)
        path = self._path(entry)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                # The stored key guards against a hash collision and against files copied in by hand.
                metadata = handle.metadata() or {}
                if metadata.get("cache_key") != key or metadata.get("owner_id") != self.owner_id:
                    return None
                return {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception:  # an unreadable entry is just a miss; it is rewritten by put()
            return None

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Keep float32 CPU copies of ``tensors`` under ``key``; returns those copies."""
        tensors = {name: tensor.detach().to("cpu", torch.float32).contiguous() for name, tensor in tensors.items()}
        entry = self._entry(key)
        if self.mode == "memory":
            self._memory[entry] = tensors
        else:
            metadata = {"cache_key": key, "owner_id": self.owner_id}
            write_file(self._path(entry), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        return tensors

    def lookup(self, keys: list[str], compute: Callable[[list[int]], list[dict[str, torch.Tensor]]]) -> list[dict[str, torch.Tensor]]:
        """The entries of ``keys``; ``compute(positions)`` makes the missing ones (float32 CPU copies are kept)."""
        found = [self.get(key) for key in keys]
        missing = [i for i, entry in enumerate(found) if entry is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            for i, entry in zip(missing, compute(missing)):
                found[i] = self.put(keys[i], entry)
        return found  # type: ignore[return-value]  # no None left


class LatentCache(TensorCache):
    """The VAE latents of each (image, crop, flip), encoded once instead of every step."""

    def __init__(self, mode: str, directory: Path | str | None, vae_id: str):
        super().__init__(mode, directory, vae_id, "data.cache_latents")

    def latents(self, batch: Batch, encode: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The batch's latents [B, C, h, w] and, with data.masks, their loss masks on the latent grid
        [B, 1, h, w] (else None); ``encode(pixels)`` (already scaled latents) runs on the misses only.

        Mode "none" returns ``encode``'s output as is. Cached modes return float32 on the device
        ``encode`` used (CPU when everything was a hit): move it with ``.to()``. A mask is cached with
        its latents (its key carries the mask's identity).
        """
        if self.mode == "none":
            self.misses += len(batch)
            latents = encode(batch.pixel_values())
            return latents, latent_masks(batch, latents)
        device = torch.device("cpu")

        def compute(positions: list[int]) -> list[dict[str, torch.Tensor]]:
            nonlocal device
            entries = []
            for i in positions:
                # One image at a time: a convolution's float result can depend on the batch it ran in,
                # and a cached latent must not depend on which images happened to share its first batch.
                encoded = encode(batch.pixel_values([i]))
                device = encoded.device
                entry = {"latents": encoded[0]}
                if batch.masked:
                    entry["mask"] = on_latent_grid(batch.mask_values([i]), tuple(encoded.shape[-2:]))[0]
                entries.append(entry)
            return entries

        found = self.lookup(batch.cache_keys, compute)
        masks = torch.stack([entry["mask"] for entry in found]).to(device) if batch.masked else None
        return torch.stack([entry["latents"] for entry in found]).to(device), masks


def latent_masks(batch: Batch, latents: torch.Tensor) -> torch.Tensor | None:
    """The batch's loss masks on the grid of ``latents`` (None without data.masks)."""
    return on_latent_grid(batch.mask_values(), tuple(latents.shape[-2:])).to(latents.device) if batch.masked else None


class TextCache(TensorCache):
    """The text encoders' output per caption, while no text encoder trains (``data.cache_text_encoder_outputs``)."""

    def __init__(self, mode: str, directory: Path | str | None, encoders_id: str):
        super().__init__(mode, directory, encoders_id, "data.cache_text_encoder_outputs")

    def conditioning(self, captions: list[str], encode: Callable[[list[str]], TextConditioning]) -> TextConditioning:
        """``encode(captions)`` for the captions not cached yet; every caption's rows from the cache."""
        if self.mode == "none":
            return encode(captions)

        def compute(positions: list[int]) -> list[dict[str, torch.Tensor]]:
            # One caption at a time, for the same reason as the latents: an entry must not depend on its batch.
            return [encode([captions[i]]).row(0) for i in positions]

        return TextConditioning.stack(self.lookup([f"text|{caption}" for caption in captions], compute))
