"""``train.shard_model``: each process keeps only a share of the trained parts' weights, gradients and
optimizer state (ZeRO stage 3), with torch's FSDP2 (``fully_shard``); see docs/distributed.md.

A full fine-tune (DreamBooth) holds, per process and in fp32, the trained weights, their gradients and
AdamW's two moments: four copies of the UNet. Sharded over N processes each keeps 4/N of them and
gathers a block's whole weights only while that block runs (forward, and again in the backward pass).

The rest of the loop sees the same run as without sharding:

- Gradients are *summed* over the processes by FSDP's reduce-scatter (not averaged), as
  ``trainer.distributed.sum_gradients`` sums them: each process's loss is already its share of the
  global batch's mean.
- Checkpoints hold the whole tensors (``save_whole``: every process takes part in gathering each tensor,
  the main process writes it and lets it go, so no process ever holds the whole state), so a sharded run
  resumes sharded or not, on any process count the global batch allows; ``copy_whole_into`` and
  ``shard_optimizer_state`` put a checkpoint's whole tensors back into the shards.
- Drawing samples and measuring the validation loss run the model outside the training step's rhythm
  (the main process alone, or each process on its own share of the images), so they run inside
  ``whole_weights()``: every process gathers every block once, and no forward pass needs the others.
- The artifact is written from plain modules: ``to_plain`` gathers the weights and puts unsharded
  copies of the trained parts into the model (FSDP modules cannot be copied, and their ``state_dict``
  is sharded).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from trainer.distributed import World
from trainer.formats.safetensors_file import StreamedSafetensors
from trainer.models.base_model import copied_module


def _is_sharded(value) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def copy_whole_into(target: torch.Tensor, whole: torch.Tensor) -> None:
    """``target.copy_(whole)`` for a trained tensor that may be a shard: a shard takes its slice of ``whole``
    (every process holds ``whole``, e.g. read from a checkpoint, so nothing is sent)."""
    whole = whole.to(target.device, target.dtype)
    if _is_sharded(target):
        from torch.distributed.tensor import distribute_tensor

        whole = distribute_tensor(whole, target.device_mesh, target.placements, src_data_rank=None)
    target.copy_(whole)


def _blocks(module: nn.Module) -> Iterator[nn.Module]:
    """The units a part is sharded in: every entry of the outermost ModuleLists (a UNet's down and up blocks,
    a text encoder's layers, a transformer's blocks: whatever the family's modules hold in lists); the
    part itself takes the rest (embeddings, the UNet's middle block, norms)."""
    for child in module.children():
        if isinstance(child, nn.ModuleList):
            yield from child
        else:
            yield from _blocks(child)


def _meta_twin(part: nn.Module) -> nn.Module:
    """An unsharded copy of ``part`` whose parameters are on the meta device (no memory): the module
    structure ``to_plain`` fills with the gathered weights. Buffers (never trained, never sharded) are shared."""
    return copied_module(part, parameter=lambda param: torch.empty_like(param, device="meta"), buffer=lambda buffer: buffer)


class ModelSharding:
    """The trained parts, sharded across the processes (or, with one process or without train.shard_model,
    left whole: then every call here does nothing)."""

    def __init__(self, parts: dict[str, nn.Module], world: World, enabled: bool):
        self.world = world
        self.parts = parts if enabled and world.processes > 1 else {}
        self._twins = {name: _meta_twin(part) for name, part in self.parts.items()}
        self._units: list[nn.Module] = []
        if not self.parts:
            return
        from torch.distributed.fsdp import fully_shard

        for part in self.parts.values():
            for unit in [*_blocks(part), part]:
                # Resharded after every forward pass, the part's own unit too (FSDP would keep a root's weights
                # gathered for the backward pass, which a frozen part, e.g. a text encoder after
                # dreambooth.text_encoder_steps, never runs): between steps every weight is a shard.
                fully_shard(unit, reshard_after_forward=True)
                # Summed, as trainer.distributed.sum_gradients sums: gloo has no pre-scaled sum, so the
                # reduction is a plain SUM divided by 1.
                unit.set_gradient_divide_factor(1.0)
                unit.set_force_sum_reduction_for_comms(True)
                self._units.append(unit)

    @property
    def active(self) -> bool:
        return bool(self.parts)

    def trained_parameters(self, trainable: list[nn.Parameter]) -> list[nn.Parameter]:
        """The trained parameters after sharding (fully_shard replaces every parameter of a part by its shard)."""
        if not self.active:
            return trainable
        return [param for part in self.parts.values() for param in part.parameters() if param.requires_grad]

    def save_whole(self, tensors: dict[str, torch.Tensor], path: Path | None) -> None:
        """Write ``tensors`` to the safetensors file ``path`` with every shard gathered whole, one tensor at a
        time. Every process calls it with the same keys; the main one passes the path, the others None."""
        specs = {key: (value.dtype, tuple(value.shape)) for key, value in tensors.items()}  # a shard's shape is the whole one's
        with StreamedSafetensors(path, specs) if path is not None else nullcontext() as out:
            for key, value in tensors.items():
                whole = value.full_tensor() if _is_sharded(value) else value
                if out is not None:
                    out.write(key, whole)

    def shard_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """After ``optimizer.load_state_dict`` from a checkpoint's whole tensors: each sharded parameter's
        state (AdamW's moments) cut to the parameter's shard."""
        if not self.active:
            return
        from torch.distributed.tensor import distribute_tensor

        for param, state in optimizer.state.items():
            if not _is_sharded(param):
                continue
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and not _is_sharded(value) and value.shape == param.shape:
                    state[key] = distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)

    @contextmanager
    def whole_weights(self) -> Iterator[None]:
        """Every process gathers every block's weights and keeps them through the block's forward passes, so
        the model runs without the other processes (sampling on the main process, validation on each one's
        images). Every process enters it."""
        for unit in self._units:
            unit.unshard()
            unit.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            for unit in self._units:
                unit.reshard()
                unit.set_reshard_after_forward(True, recurse=False)

    def to_plain(self, model) -> None:
        """Replace the model's sharded parts by plain modules holding the whole trained weights, on the main
        process (for the export; the others take part in the gathering). Every process calls it once, after
        the last step."""
        for name, part in self.parts.items():
            whole = {}
            for key, param in part.named_parameters():
                gathered = param.full_tensor().cpu()
                if self.world.is_main:
                    whole[key] = gathered
            if not self.world.is_main:
                continue
            twin = self._twins[name]
            for module_name, module in twin.named_modules():
                for param_name, param in module.named_parameters(recurse=False):
                    key = f"{module_name}.{param_name}" if module_name else param_name
                    setattr(module, param_name, nn.Parameter(whole[key], requires_grad=param.requires_grad))
            model.replace_part(name, twin)
        self.parts, self._units = {}, []
