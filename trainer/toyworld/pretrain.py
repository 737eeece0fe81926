"""Pretrain the toy base model (and its judge) on the toy world, and find it again later.

The toy base is a standard Stable Diffusion pipeline at toy size: an AutoencoderKL that turns 32 x 32
pictures into 4 x 16 x 16 latents (16 x 16 keeps the sls frog's spots; 8 x 8 lost them), a
UNet2DConditionModel with cross-attention on its 8 x 8 and 4 x 4 levels, and a CLIP text encoder
(width 64, two layers) with the real CLIP BPE tokenizer, trained jointly with the UNet.

``build`` draws the world and trains, in order: the VAE, the judge (on real and VAE-reconstructed
pictures), then the UNet and text encoder on the VAE's latents. Everything is seeded, so a build on
the same torch version and thread count reproduces the shipped weights; other thread counts agree to
float rounding only.

The package ships the result (``weights/toy_base.safetensors``, fp16, and ``weights/judge.safetensors``).
``model.base: toy`` reads the pipeline folder in the per-user cache, writing it there from the shipped
weights on first use; ``sdtrain toyworld build`` writes a fresh build there instead.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import safe_open
from transformers import CLIPTextModel

from trainer import diffusion
from trainer.atomic import check_new_directory, new_directory, replaced_directory, write_text
from trainer.errors import UserError
from trainer.formats.safetensors_file import read_metadata, save_safetensors
from trainer.families.sd import SD1
from trainer.models.base_model import BaseModel, TextEncoder
from trainer.models.export import save_diffusers_folder
from trainer.models.tiny import sd_noise_scheduler, seeded, small_clip_text_encoder
from trainer.models.tokenizer import clip_tokenizer
from trainer.toyworld import world
from trainer.toyworld.judge import Judge, JudgeTraining, accuracy, judge_metadata, train_judge

# Bump when an architecture below changes (the settings and the world version are hashed on their own).
ARCHITECTURE_VERSION = "a1"
TEXT_WIDTH = 64
LATENT_SIZE = world.RESOLUTION // 2
SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "weights"
BASE_FILE, JUDGE_FILE = "toy_base.safetensors", "judge.safetensors"
BASE_NAME = "sdtrain-toy"


def toy_vae(scaling_factor: float = 1.0) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        # Narrow: at 32 px the VAE's full-resolution convolutions cost more than the whole UNet.
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=world.RESOLUTION,
        scaling_factor=scaling_factor,
        # Self-attention over 256 latent pixels costs more than the rest of the VAE and adds nothing at 32 px.
        mid_block_add_attention=False,
    )


def toy_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        # Cross-attention at 16 x 16 would triple the cost; at 8 x 8 and 4 x 4 the prompt still steers the layout.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def toy_text_encoder() -> CLIPTextModel:
    return small_clip_text_encoder(TEXT_WIDTH, layers=2)


@dataclass(frozen=True)
class Pretraining:
    """Everything a build depends on besides the code; its hash names the cache folder."""

    seed: int = 20261127
    world_size: int = 30000
    vae_steps: int = 400
    vae_batch_size: int = 64
    vae_lr: float = 1e-3
    # Small: the latents stay close to a unit Gaussian without blurring what the decoder can rebuild.
    vae_kl_weight: float = 1e-5
    judge_pictures: int = 6000
    judge_test_pictures: int = 1200
    judge: JudgeTraining = field(default_factory=JudgeTraining)
    unet_steps: int = 4000
    unet_batch_size: int = 64
    unet_lr: float = 1e-3
    # Linear warm-up, then a constant rate: the weights after k steps do not depend on the total, so one
    # long build shows (through its snapshots) what any shorter one would give.
    unet_warmup_steps: int = 200
    # The shipped UNet and text encoder are an exponential moving average of the trained ones.
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0


def version(settings: Pretraining = Pretraining()) -> str:
    spec = {"world": world.WORLD_VERSION, "architecture": ARCHITECTURE_VERSION, "settings": asdict(settings)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def cache_root() -> Path:
    """The per-user cache: $SDTRAIN_CACHE_DIR, else $XDG_CACHE_HOME/sdtrain, else ~/.cache/sdtrain."""
    if os.environ.get("SDTRAIN_CACHE_DIR"):
        return Path(os.environ["SDTRAIN_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sdtrain"


def toy_cache_dir(settings: Pretraining = Pretraining()) -> Path:
    return cache_root() / "toyworld" / version(settings)


# --- training -------------------------------------------------------------------------------------


def _adamw(params, lr: float) -> torch.optim.AdamW:
    # No weight decay: it would shrink the embeddings of tokens the world never shows (e.g. "sls") to zero.
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def _one_cycle(params, lr: float, steps: int):
    optimizer = _adamw(params, lr)
    return optimizer, torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)


class _MovingAverage:
    """An exponential moving average of some modules' parameters, kept in copies of those modules."""

    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.decay = decay
        self.modules = modules
        self.averages = [copy.deepcopy(module).eval().requires_grad_(False) for module in modules]

    @torch.no_grad()
    def update(self) -> None:
        for module, average in zip(self.modules, self.averages):
            torch._foreach_lerp_(list(average.parameters()), list(module.parameters()), 1.0 - self.decay)


def train_vae(pixels: torch.Tensor, settings: Pretraining, log=print) -> AutoencoderKL:
    vae = seeded(toy_vae, settings.seed)
    optimizer, schedule = _one_cycle(vae.parameters(), settings.vae_lr, settings.vae_steps)
    generator = torch.Generator().manual_seed(settings.seed + 1)
    vae.train()
    started = time.perf_counter()
    for step in range(settings.vae_steps):
        batch = pixels[torch.randint(0, len(pixels), (settings.vae_batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        loss = F.mse_loss(reconstruction, batch) + settings.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % 100 == 0:
            log(f"vae step {step + 1}/{settings.vae_steps}: loss {loss.item():.5f} ({time.perf_counter() - started:.0f}s)")
    return vae.eval()


@torch.no_grad()
def encode(vae: AutoencoderKL, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Latent means, unscaled (as the VAE writes them)."""
    return torch.cat([vae.encode(pixels[i : i + batch_size]).latent_dist.mean for i in range(0, len(pixels), batch_size)])


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([vae.decode(vae.encode(pixels[i : i + batch_size]).latent_dist.mean).sample.clamp(-1, 1) for i in range(0, len(pixels), batch_size)])


def train_unet_and_text_encoder(
    latents: torch.Tensor, captions: list[str], settings: Pretraining, log=print, snapshot=None
) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """Joint denoising training on scaled latents; ``caption_dropout`` of the captions are empty (for CFG).

    Returns the moving averages. ``snapshot(step, unet, text_encoder)``, if given, sees them every 1,000 steps.
    """
    unet = seeded(toy_unet, settings.seed + 2)
    text_encoder = seeded(toy_text_encoder, settings.seed + 3)
    tokenizer = clip_tokenizer()
    scheduler = sd_noise_scheduler()
    prompts = sorted(set(captions)) + [""]
    prompt_index = torch.tensor([prompts.index(c) for c in captions])
    empty = len(prompts) - 1
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    parameters = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = _adamw(parameters, settings.unet_lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / settings.unet_warmup_steps))
    average = _MovingAverage([unet, text_encoder], settings.ema_decay)
    generator = torch.Generator().manual_seed(settings.seed + 4)
    unet.train()
    text_encoder.train()
    started = time.perf_counter()
    for step in range(settings.unet_steps):
        batch = torch.randint(0, len(latents), (settings.unet_batch_size,), generator=generator)
        which = torch.where(torch.rand(len(batch), generator=generator) < settings.caption_dropout, empty, prompt_index[batch])
        # The world has a few dozen captions: encode each once per step and pick, instead of once per sample.
        hidden = text_encoder(ids).last_hidden_state[which]
        noise, timesteps = diffusion.sample_noise(latents[batch], generator, 0.0, scheduler.config.num_train_timesteps)
        prediction = unet(scheduler.add_noise(latents[batch], noise, timesteps), timesteps, hidden).sample
        loss = diffusion.per_sample_loss(prediction, noise, timesteps, scheduler, diffusion.ObjectiveSettings(min_snr_gamma=settings.min_snr_gamma)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        average.update()
        if (step + 1) % 100 == 0:
            log(f"unet step {step + 1}/{settings.unet_steps}: loss {loss.item():.4f} ({time.perf_counter() - started:.0f}s)")
        if snapshot and (step + 1) % 1000 == 0:
            snapshot(step + 1, *average.averages)
    ema_unet, ema_text_encoder = average.averages
    return ema_unet, ema_text_encoder


# --- packing: one fp16 file for the base, one for the judge -----------------------------------------

PARTS = ("unet", "vae", "text_encoder")


def pack_base(unet, vae, text_encoder, path: Path, settings: Pretraining, extra: dict[str, str]) -> Path:
    tensors = {f"{name}.{key}": value.half() for name, part in zip(PARTS, (unet, vae, text_encoder)) for key, value in part.state_dict().items()}
    metadata = {"version": version(settings), "scaling_factor": repr(vae.config.scaling_factor), **extra}
    return save_safetensors(path, tensors, metadata)


def _read_packed(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata() or {}


def unpack_base(path: Path) -> BaseModel:
    tensors, metadata = _read_packed(path)
    parts = {"unet": toy_unet(), "vae": toy_vae(float(metadata["scaling_factor"])), "text_encoder": toy_text_encoder()}
    for name, module in parts.items():
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)})
        module.eval()
    (spec,) = SD1.text_encoders
    return BaseModel(
        family=SD1, unet=parts["unet"], vae=parts["vae"], text_encoders=[TextEncoder(spec, clip_tokenizer(), parts["text_encoder"])],
        noise_scheduler=sd_noise_scheduler(), source="toy", name=BASE_NAME,
    )


def pack_judge(judge: Judge, path: Path, settings: Pretraining, metadata: dict[str, str]) -> Path:
    return save_safetensors(path, dict(judge.state_dict()), {"version": version(settings), **metadata})


def unpack_judge(path: Path) -> tuple[Judge, dict[str, str]]:
    tensors, metadata = _read_packed(path)
    judge = Judge()
    judge.load_state_dict(tensors)
    return judge.eval(), metadata


# --- build and find ------------------------------------------------------------------------------


def build(directory: Path | None = None, settings: Pretraining = Pretraining(), log=print, snapshot_dir: Path | None = None) -> Path:
    """Draw the world and pretrain the VAE, the judge, the UNet and text encoder; write them to ``directory``.

    ``directory`` (default: this version's cache folder, where ``model.base: toy`` looks) gets
    ``base/`` (a diffusers pipeline), ``toy_base.safetensors`` and ``judge.safetensors`` (the files the
    package ships) and ``build.json`` (timings and accuracies). Written atomically: a crash leaves none.
    A folder the caller names must be new or empty; the cache folder is sdtrain's own and is replaced.
    ``snapshot_dir`` gets ``toy_base_<k>.safetensors`` every 1,000 UNet steps: the base a build with
    ``unet_steps=k`` would ship (the learning rate is constant after warm-up), for choosing the length.
    """
    if directory:
        check_new_directory(directory)
    write_directory = new_directory if directory else replaced_directory
    directory = Path(directory) if directory else toy_cache_dir(settings)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    world_pictures = world.pictures(world.PRETRAIN, settings.world_size)
    judge_pictures = world.pictures(world.JUDGE_TRAIN, settings.judge_pictures)
    test_pictures = world.pictures(world.JUDGE_TEST, settings.judge_test_pictures)
    world_pixels = world.to_tensor([p.image for p in world_pictures])
    judge_pixels = world.to_tensor([p.image for p in judge_pictures])
    test_pixels = world.to_tensor([p.image for p in test_pictures])
    timings["draw_s"] = time.perf_counter() - started
    log(f"drew {len(world_pictures) + len(judge_pictures) + len(test_pictures)} pictures in {timings['draw_s']:.0f}s")

    with torch.random.fork_rng(devices=[]):
        stage = time.perf_counter()
        vae = train_vae(world_pixels, settings, log)
        timings["vae_s"] = time.perf_counter() - stage

        stage = time.perf_counter()
        judge = train_judge(torch.cat([judge_pixels, reconstruct(vae, judge_pixels)]), judge_pictures, settings.judge, log)
        real, reconstructed = accuracy(judge, test_pixels, test_pictures), accuracy(judge, reconstruct(vae, test_pixels), test_pictures)
        timings["judge_s"] = time.perf_counter() - stage
        log(f"judge on real pictures: {real.line()}")
        log(f"judge on VAE reconstructions: {reconstructed.line()}")

        if snapshot_dir:
            pack_judge(judge, Path(snapshot_dir) / JUDGE_FILE, settings, judge_metadata(real, reconstructed))

        stage = time.perf_counter()
        latents = encode(vae, world_pixels)
        # SD's convention: latents times scaling_factor have unit variance.
        vae.register_to_config(scaling_factor=float(1.0 / latents.std()))

        def snapshot(step, unet, text_encoder):
            path = Path(snapshot_dir) / f"toy_base_{step}.safetensors"
            pack_base(unet, vae, text_encoder, path, dataclasses.replace(settings, unet_steps=step), {})
            log(f"snapshot -> {path}")

        unet, text_encoder = train_unet_and_text_encoder(
            latents * vae.config.scaling_factor, [p.caption for p in world_pictures], settings, log, snapshot if snapshot_dir else None
        )
        timings["unet_s"] = time.perf_counter() - stage
    timings["total_s"] = time.perf_counter() - started

    report = {"version": version(settings), "threads": torch.get_num_threads(), "torch": torch.__version__, **timings,
              "judge_real": real.__dict__, "judge_reconstructed": reconstructed.__dict__}
    with write_directory(directory) as tmp:
        pack_base(unet, vae, text_encoder, tmp / BASE_FILE, settings, {"build": json.dumps(report)})
        pack_judge(judge, tmp / JUDGE_FILE, settings, judge_metadata(real, reconstructed))
        # The pipeline is written from the fp16 file, so a build and the shipped weights load the same model.
        save_diffusers_folder(unpack_base(tmp / BASE_FILE), tmp / "base")
        write_text(tmp / "build.json", json.dumps(report, indent=2) + "\n")
    log(f"toy world built in {timings['total_s']:.0f}s -> {directory}")
    return directory


def _shipped(name: str) -> Path | None:
    path = SHIPPED_WEIGHTS / name
    if path.is_file() and read_metadata(path).get("version") == version():
        return path
    return None


def _not_built(what: str) -> UserError:
    return UserError(
        f"The toy world's {what} (version {version()}) is neither in the cache '{toy_cache_dir()}' nor shipped with this "
        "copy of sdtrain. Run `sdtrain toyworld build` once (it pretrains the toy base and its judge on this machine, "
        "about 30 minutes on two CPU cores)."
    )


def toy_base_dir() -> Path:
    """The toy base as a diffusers folder in the cache, written from the shipped weights on first use."""
    directory = toy_cache_dir() / "base"
    if (directory / "model_index.json").is_file():
        return directory
    shipped = _shipped(BASE_FILE)
    if shipped is None:
        raise _not_built("base model")
    save_diffusers_folder(unpack_base(shipped), directory, replace=True)
    return directory


def load_judge() -> tuple[Judge, dict[str, str]]:
    """The judge of the cached build if there is one, else the shipped judge."""
    cached = toy_cache_dir() / JUDGE_FILE
    path = cached if cached.is_file() else _shipped(JUDGE_FILE)
    if path is None:
        raise _not_built("judge")
    return unpack_judge(path)
