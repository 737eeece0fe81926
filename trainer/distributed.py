"""Training on several processes (GPUs, machines) with the same result as on one: see docs/distributed.md.

accelerate starts the processes and joins them in one process group (``accelerate launch``,
``torchrun``, or ``sdtrain train --processes N``); this module decides what each process trains on and
adds up their gradients:

- The data order is the one-process order with batches of ``processes x train.batch_size`` samples
  (one *global batch*, always from one bucket); process r trains on its slice of every global batch.
- Every random draw of a sample (noise, timestep, latent sample, flip, caption) comes from a generator
  seeded by (seed, epoch, sample), so a sample gets the same draws whichever process trains it.
- Each process divides its samples' summed loss by the size of the whole global batch, and the
  gradients are summed over the processes before the optimizer steps, so every process holds the
  gradient of the global batch's mean loss: the one-process gradient up to float rounding.

The gradients are summed here rather than by wrapping the model in DistributedDataParallel: the
methods train parameters spread over several modules (UNet, text encoders, hypernetwork modules, new
embedding rows), and a process whose slice of a short last batch is empty must still take part in
the sum without running a forward pass, which DDP does not allow.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from trainer.errors import UserError

# Gradients are summed in flat buffers of about this many elements (100 MB in fp32): one collective per
# bucket instead of one per tensor, without a second copy of every gradient at once.
_BUCKET_ELEMENTS = 25_000_000


@dataclass(frozen=True)
class World:
    """This process's place among the processes of a run."""

    rank: int = 0
    processes: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def slice_of(self, global_batch: Sequence[int], per_process: int) -> list[int]:
        """This process's samples of a global batch: consecutive slices of ``per_process``; a short last
        batch leaves the later processes fewer samples, or none."""
        return list(global_batch[self.rank * per_process:(self.rank + 1) * per_process])


def prepare_environment() -> None:
    """Let accelerate see a CPU launch as distributed: without CUDA it only joins the processes a
    launcher started (``WORLD_SIZE`` > 1) when told to use the CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        os.environ.setdefault("ACCELERATE_USE_CPU", "1")


def world_of(accelerator) -> World:
    """The run's World, refusing the launches whose result would not be the one-process result."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind in (DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.MEGATRON_LM):
        raise UserError(
            f"accelerate is configured for {kind.value}, which sdtrain does not run through accelerate. Launch with plain data "
            "parallelism (`accelerate config` -> multi-GPU, no DeepSpeed/FSDP; or `sdtrain train RECIPE --processes N`) and let the "
            "recipe shard: train.shard_model=true splits a full fine-tune's weights, gradients and optimizer state across the processes "
            "(ZeRO stage 3, with torch's FSDP), train.shard_optimizer=true the optimizer state of any method; see docs/distributed.md."
        )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes != launched:
        raise UserError(
            f"{launched} processes were launched (WORLD_SIZE={launched}) but accelerate joined {accelerator.num_processes}: each would "
            "train alone and write the same files. Launch with `accelerate launch` or `sdtrain train RECIPE --processes N`."
        )
    return World(rank=accelerator.process_index, processes=accelerator.num_processes)


def _buckets(tensors: Iterable[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """The tensors in runs of one dtype and device, each run at most about _BUCKET_ELEMENTS long (the same
    runs on every process: the parameters come in the same order)."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    for group in groups.values():
        bucket, size = [], 0
        for tensor in group:
            if bucket and size + tensor.numel() > _BUCKET_ELEMENTS:
                yield bucket
                bucket, size = [], 0
            bucket.append(tensor)
            size += tensor.numel()
        if bucket:
            yield bucket


def sum_gradients(params: Sequence[torch.nn.Parameter], world: World) -> None:
    """Replace every parameter's gradient by its sum over the processes. A parameter that has a gradient on
    some process counts as zero where it has none (a process that trained no sample of this step); one
    that has none anywhere (e.g. a text encoder after dreambooth.text_encoder_steps) keeps none, so the
    optimizer skips it as it would with one process."""
    if world.processes == 1:
        return
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    # train.shard_model's shards (trainer.sharding) were summed by FSDP in the backward pass.
    params = [param for param in params if not isinstance(param, DTensor)]
    if not params:
        return

    reached = torch.tensor([param.grad is not None for param in params], dtype=torch.int32, device=params[0].device)
    dist.all_reduce(reached)
    params = [param for param, count in zip(params, reached.tolist()) if count]
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    for bucket in _buckets(param.grad for param in params):
        flat = torch.cat([grad.reshape(-1) for grad in bucket])
        dist.all_reduce(flat)
        offset = 0
        for grad in bucket:
            grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
            offset += grad.numel()


def sum_over_processes(values: list[float], world: World, device: torch.device) -> list[float]:
    """Each value summed over the processes (in float64)."""
    if world.processes == 1:
        return list(values)
    import torch.distributed as dist

    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def broadcast_parameters(params: Sequence[torch.nn.Parameter], world: World) -> None:
    """Start every process from the main process's trained parameters (they are built from the same seed;
    this makes it so whatever kernel or file read might differ)."""
    if world.processes == 1:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for param in params:
            dist.broadcast(param.data, src=0)


def gather_objects(value: object, world: World) -> list[object]:
    """``value`` of every process, by rank (for the small, JSON-like states a checkpoint records)."""
    if world.processes == 1:
        return [value]
    import torch.distributed as dist

    gathered: list[object] = [None] * world.processes
    dist.all_gather_object(gathered, value)
    return gathered


def barrier(world: World) -> None:
    if world.processes > 1:
        import torch.distributed as dist

        dist.barrier()


def launcher_command(processes: int, module: str, argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """The command and environment that start ``python -m module argv`` as ``processes`` processes on this
    machine, with torch's launcher (what ``accelerate launch`` uses too)."""
    import sys

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m", module, *argv]
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"
        # With more OpenMP threads than cores in all, libgomp's threads spin while they wait for work and take
        # the cores the other processes need: 2 processes of 2 threads on 2 cores ran the tiny model's step
        # 120x slower. Waiting passively costs a wake-up per parallel region instead (docs/benchmarks.md,
        # "Threads that load images"). torch's launcher gives each process 1 thread when none is set.
        threads = env.get("OMP_NUM_THREADS", "1").split(",")[0].strip()
        if threads.isdigit() and processes * int(threads) > (os.cpu_count() or 1):
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return command, env


def launch(processes: int, argv: list[str]) -> int:
    """``sdtrain train … --processes N``: start N processes of the same command and wait for them."""
    import subprocess

    command, env = launcher_command(processes, "trainer.cli", argv)
    return subprocess.call(command, env=env)
