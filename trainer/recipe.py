"""Recipes: YAML files read with omegaconf into typed dataclasses, with ``key=value`` overrides.

Every key a recipe may hold is declared here, with its type and default, so a misspelled key or a
wrong type is caught before anything runs, and named by its dotted path with the closest valid key.
Then every value is checked (``validate_recipe``), so a value that cannot train is refused before a
model or an image is loaded. The method sections (``lora``, ...) are declared, and their values
checked, by the method modules themselves.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from trainer.checks import broken, is_learning_rate, one_of, seed_rule
from trainer.errors import UserError
from trainer.families import AUTO, FAMILIES
from trainer.formats import DTYPE_NAMES
from trainer.methods import check_method_name, section_problems
from trainer.methods.dreambooth.config import DreamBoothConfig
from trainer.methods.hypernetwork.config import HypernetworkConfig
from trainer.methods.lora.config import LoraConfig
from trainer.methods.lycoris.config import LycorisConfig
from trainer.methods.textual_inversion.config import TextualInversionConfig

PREDICTION_TYPES = ("auto", "epsilon", "v_prediction")
FAMILY_NAMES = (AUTO, *FAMILIES)
MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")
# The values these keys take. The code that implements each (trainer.data.cache, trainer.data.masks,
# trainer.models.text, trainer.optim, trainer.diffusion) imports torch; naming them here lets a recipe be
# checked, and its mistakes reported, before any library is imported (trainer.cli).
CACHE_MODES = ("none", "memory", "disk")
MASK_MODES = ("none", "alpha", "dir")
MAX_TOKEN_LENGTHS = (75, 150, 225)  # one to three of CLIP's 75-token windows
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor")
# diffusers' schedules that need nothing beyond warm-up and total steps (piecewise_constant needs step rules).
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
LOSSES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("snr", "exponential", "constant")
# output.name becomes a file name: Windows refuses these characters in one, and '/' or '\' would leave output.dir.
_NOT_IN_FILE_NAMES = set('<>:"/\\|?*')


@dataclass
class ModelConfig:
    # "tiny" or "tiny-sdxl" (built in), "toy", a diffusers folder, a single-file .safetensors/.ckpt, or a hub id in the local cache.
    base: str = "tiny"
    # "auto" (told from model.base), or "sd1", "sd2", "sdxl" where the base cannot tell (see docs/recipes.md).
    family: str = "auto"
    # A diffusers folder whose configs describe a single-file checkpoint (default: the packaged SD1/SD2/SDXL ones).
    config: Optional[str] = None
    # A VAE to use instead of the base model's: a diffusers VAE folder or a .safetensors file.
    vae: Optional[str] = None
    # Keep the VAE in fp32 under fp16/bf16 mixed precision (kohya's --no_half_vae); null = the family's default (SDXL: true).
    vae_fp32: Optional[bool] = None
    # "auto" reads it from the base model's scheduler; or "epsilon" / "v_prediction".
    prediction_type: str = "auto"
    # 1 = the text encoder's last layer; 2 = the penultimate one (what anime models expect).
    clip_skip: int = 1
    # Opt in to reading pickled .ckpt/.pt files that fail torch.load(weights_only=True).
    allow_unsafe_pickle: bool = False


@dataclass
class SubsetConfig:
    # A folder of images (and sidecar captions).
    dir: str = MISSING
    repeats: int = 1
    # Fallback caption for images without a sidecar caption ("class tokens" in kohya).
    caption: Optional[str] = None
    caption_extension: Optional[str] = None
    # Regularisation (prior preservation) images: their loss is weighted by dreambooth.prior_loss_weight.
    is_reg: bool = False
    # A metadata.jsonl (HF datasets imagefolder layout: file_name + text) instead of sidecar captions.
    metadata_file: Optional[str] = None


@dataclass
class BucketConfig:
    enabled: bool = True
    # Unset: half and double data.resolution (kohya's 256 and 1024 at 512).
    min_side: Optional[int] = None
    max_side: Optional[int] = None
    # Bucket sides are multiples of it; the model sets the smallest allowed (SD1/SD2 64, SDXL 32).
    step: int = 64
    # Never upscale: shrink to the resolution's area at most, floor each side to the step.
    no_upscale: bool = False


@dataclass
class DataConfig:
    # A kohya parent folder whose subfolders are named "N_words" (N repeats, words = fallback caption).
    dir: Optional[str] = None
    # Or an explicit list of subsets.
    subsets: list[SubsetConfig] = field(default_factory=list)
    # "folder" (data.dir / data.subsets) or "datasets" (a Hugging Face dataset: data.dataset).
    source: str = "folder"
    # With source "datasets": a save_to_disk folder, parquet/arrow files (a file, a folder or a glob), an
    # imagefolder folder (metadata.jsonl/metadata.csv) or a hub id already in the local cache.
    dataset: Optional[str] = None
    # The dataset's split; null: "train", or its only split.
    split: Optional[str] = None
    image_column: str = "image"
    # null: the dataset has no captions (every caption is empty, before the trigger word).
    caption_column: Optional[str] = "text"
    # How often each dataset row is seen per epoch (a folder's repeats come from its name or its subset).
    repeats: int = 1
    caption_extension: str = ".txt"
    # Unset: the model family's (SD1 512, SD2 768, SDXL 1024).
    resolution: Optional[int] = None
    buckets: BucketConfig = field(default_factory=BucketConfig)
    flip: bool = False
    # Captions as comma-separated tags: shuffle all but the first keep_tokens.
    shuffle_tags: bool = False
    keep_tokens: int = 0
    tag_separator: str = ","
    caption_dropout: float = 0.0
    tag_dropout: float = 0.0
    # Prepended to every caption (e.g. "sls frog") unless the caption already starts with it.
    trigger_word: str = ""
    # Prompts longer than 75 tokens: 150 or 225 encodes them in 75-token chunks (kohya's max_token_length).
    max_token_length: int = 75
    # "none", "memory" or "disk".
    cache_latents: str = "none"
    # Text encoder outputs per caption: "none", "memory" or "disk"; only while no text encoder trains.
    cache_text_encoder_outputs: str = "none"
    # Folder for the disk caches (default: {output.dir}/latent_cache).
    cache_dir: Optional[str] = None
    # Loss masks: "none", "alpha" (the image's alpha channel) or "dir" (same-named mask images in mask_dir).
    masks: str = "none"
    mask_dir: Optional[str] = None


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    lr: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    # "adamw", "adamw8bit", "prodigy" or "adafactor".
    optimizer: str = "adamw"
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    seed: int = 42
    # "auto" = bf16 on a GPU that supports it, else fp16 on GPU, fp32 on CPU; or "no", "fp16", "bf16".
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    # With several processes: each keeps only its share of the optimizer state (ZeRO stage 1); not with prodigy.
    shard_optimizer: bool = False
    # With several processes: each keeps only its share of a full fine-tune's weights, gradients and optimizer
    # state (ZeRO stage 3, torch FSDP; method dreambooth); not with shard_optimizer, prodigy or adamw8bit.
    shard_model: bool = False
    noise_offset: float = 0.0
    # Multi-resolution (pyramid) noise: extra noise levels (0 = off; 6-10 is usual) and each level's weight factor.
    multires_noise_iterations: int = 0
    multires_noise_discount: float = 0.3
    # Input perturbation: the noised input gets this much extra noise the target does not (0 = off; 0.1 is usual).
    ip_noise_gamma: float = 0.0
    # [min, max): the timesteps drawn (kohya's min_timestep, max_timestep); null = the whole schedule.
    timestep_range: Optional[list[int]] = None
    # Rescale the training schedule so its last timestep is pure noise (alpha_bar 0); meant for v-prediction.
    zero_terminal_snr: bool = False
    # Per-pixel loss: "l2", "l1", "huber" or "smooth_l1" (kohya's pseudo-Huber forms, threshold huber_c).
    loss: str = "l2"
    # Huber threshold per timestep: "snr", "exponential" or "constant" (kohya's huber_schedule).
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    min_snr_gamma: Optional[float] = None
    # Weight each sample by 1/sqrt(SNR) (1/(SNR+1) for v-prediction), kohya's debiased estimation.
    debiased_estimation: bool = False
    save_every_steps: int = 0
    keep_checkpoints: int = 3
    log_every_steps: int = 1


@dataclass
class ValidationConfig:
    # Fraction of the training images held out for the validation loss (0 = off); class images never are.
    split: float = 0.0
    # Or a folder of validation images (kohya layout, captions as in training) instead of a split.
    dir: Optional[str] = None
    # Measure every this many optimizer steps (0 = at the end only), and before each checkpoint with keep_best.
    every_steps: int = 0
    # Timesteps per image, evenly spaced over the trained range.
    timesteps: int = 8
    # Seeds the split and the validation noise (never the training RNG).
    seed: int = 0
    # Never delete the checkpoint with the lowest validation loss when rotating old ones.
    keep_best: bool = False


@dataclass
class SampleConfig:
    every_steps: int = 0
    prompts: list[str] = field(default_factory=list)
    negative_prompt: str = ""
    seed: int = 1234
    steps: int = 20
    guidance_scale: float = 7.0
    # 0 = data.resolution.
    width: int = 0
    height: int = 0


@dataclass
class OutputConfig:
    dir: str = "output/run"
    name: str = "model"
    # Artifact formats; each method says which it knows (LoRA: "kohya", "diffusers"). Empty: the method's default.
    formats: list[str] = field(default_factory=list)
    # "fp32", "fp16" or "bf16".
    save_dtype: str = "fp16"
    comment: str = ""
    tensorboard: bool = True


@dataclass
class Recipe:
    method: str = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    hypernetwork: HypernetworkConfig = field(default_factory=HypernetworkConfig)
    dreambooth: DreamBoothConfig = field(default_factory=DreamBoothConfig)
    textual_inversion: TextualInversionConfig = field(default_factory=TextualInversionConfig)
    lycoris: LycorisConfig = field(default_factory=LycorisConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


def _closest_key(node: Any, parent_path: str, key: str) -> str:
    if isinstance(node, DictConfig):
        prefix = f"{parent_path}." if parent_path else ""
        matches = difflib.get_close_matches(key, [str(k) for k in node.keys()], n=1, cutoff=0.5)
        if matches:
            return f" Did you mean '{prefix}{matches[0]}'?"
        return " Valid keys here: " + ", ".join(f"{prefix}{k}" for k in node.keys()) + "."
    return ""


def _explain(error: OmegaConfBaseException, schema: DictConfig, source: str) -> UserError:
    full_key = str(getattr(error, "full_key", "") or "")
    if isinstance(error, ConfigKeyError) and full_key:
        parent_path, _, key = full_key.rpartition(".")
        parent = OmegaConf.select(schema, parent_path) if parent_path else schema
        hint = _closest_key(parent, parent_path, key)
        return UserError(f"{source}: unknown recipe key '{full_key}'.{hint} Fix or remove the key.")
    if isinstance(error, ValidationError) and full_key:
        expected = getattr(error, "ref_type", None) or getattr(error, "object_type", None)
        expected_name = getattr(expected, "__name__", None) or str(expected)
        node = OmegaConf.select(schema, full_key, throw_on_missing=False)
        if node is not None and not isinstance(node, (DictConfig, ListConfig)):
            expected_name = type(node).__name__
        msg = str(error).splitlines()[0]
        return UserError(
            f"{source}: recipe key '{full_key}' has the wrong type ({msg}). Expected a value of type "
            f"{expected_name}; fix the value in the recipe or the override."
        )
    return UserError(f"{source}: {str(error).splitlines()[0]}. Fix the recipe and try again.")


def _read_yaml(path: Path) -> dict:
    example = "e.g. recipes/sls_frog_lora.yaml"
    if path.is_dir():
        raise UserError(f"Recipe '{path}' is a folder. Pass the path of a YAML recipe file, {example}.")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"Recipe file '{path}' does not exist. Pass the path of a YAML recipe, {example}.") from None
    except UnicodeDecodeError:
        raise UserError(f"Recipe '{path}' is not UTF-8 text. Re-save it as UTF-8, or pass a YAML recipe, {example}.") from None
    except OSError as err:
        raise UserError(f"Recipe '{path}' cannot be read ({err.strerror}). Check its permissions, or pass another recipe.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"Recipe '{path}' is not valid YAML{where}: {problem}. Check indentation and quoting there.") from None
    if data is None:
        raise UserError(f"Recipe '{path}' is empty. A recipe needs at least 'method: lora' (or another method); see {example}.")
    if not isinstance(data, dict):
        raise UserError(f"Recipe '{path}' must be a YAML mapping of keys (method:, model:, data:, ...), not a {type(data).__name__}.")
    return data


def _parse_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item:
            raise UserError(f"Override '{item}' is not of the form key=value, e.g. train.max_steps=50.")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise UserError(f"Could not read the overrides {overrides}: {str(err).splitlines()[0]}.") from None


def load_recipe(path: Path | str, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file, apply ``key=value`` overrides and validate every key and type."""
    path = Path(path)
    schema = OmegaConf.structured(Recipe)
    merged = schema
    for source, layer in ((str(path), lambda: OmegaConf.create(_read_yaml(path))), ("override", lambda: _parse_overrides(overrides or []))):
        try:
            merged = OmegaConf.merge(merged, layer())
        except OmegaConfBaseException as err:
            raise _explain(err, schema, source) from None
    if OmegaConf.is_missing(merged, "method"):
        raise UserError(f"{path}: the recipe has no 'method' key. Add e.g. 'method: lora' at the top.")
    for index, subset in enumerate(merged.data.subsets):
        if OmegaConf.is_missing(subset, "dir"):
            raise UserError(f"{path}: data.subsets[{index}] has no 'dir'. Give each subset the folder of its images.")
    recipe: Recipe = OmegaConf.to_object(merged)
    validate_recipe(recipe)
    return recipe


def validate_recipe(recipe: Recipe) -> None:
    """Refuse, in one UserError listing them all, every value that cannot train.

    Covers the shared sections and the section of the recipe's method (the others are unused), with
    nothing loaded yet: no model, no image. What depends on the model (a placeholder the tokenizer
    knows) is checked by the method, and what depends on the machine (fp16 without a GPU) by the loop.
    """
    check_method_name(recipe.method)
    problems = [
        *_model_problems(recipe.model),
        *_data_problems(recipe.data),
        *_train_problems(recipe.train),
        *_validation_problems(recipe.validation),
        *_sample_problems(recipe.sample),
        *_output_problems(recipe.output),
        # A method's section is the recipe key named like the method.
        *section_problems(recipe.method, getattr(recipe, recipe.method)),
    ]
    if len(problems) == 1:
        raise UserError(problems[0])
    if problems:
        raise UserError(f"The recipe has {len(problems)} values that cannot train:\n" + "\n".join(f"- {problem}" for problem in problems))


def _model_problems(cfg: ModelConfig) -> list[str]:
    return broken("model", cfg, [
        ("base", bool(cfg.base.strip()), "set it to 'tiny', a diffusers folder, a single-file .safetensors or a hub id in the local cache."),
        ("prediction_type", cfg.prediction_type in PREDICTION_TYPES, one_of(cfg.prediction_type, PREDICTION_TYPES)),
        ("clip_skip", cfg.clip_skip >= 1, "it must be at least 1 (1 = the family's own layer: SD1/SD2 the last, SDXL the penultimate; 2 = one further back)."),
        ("family", cfg.family in FAMILY_NAMES, one_of(cfg.family, FAMILY_NAMES)),
        ("vae", cfg.vae is None or bool(cfg.vae.strip()), "set it to a diffusers VAE folder or a .safetensors VAE file, or null for the base model's VAE."),
    ])


def _data_problems(cfg: DataConfig) -> list[str]:
    """The data package's own checks of its settings (``sdtrain data inspect`` reports the same), and the cache mode."""
    from trainer.data.buckets import BucketPlan
    from trainer.data.scan import setting_problems

    problems = BucketPlan(cfg).problems + [problem.message for problem in setting_problems(cfg)]
    return problems + broken("data", cfg, [
        ("cache_latents", cfg.cache_latents in CACHE_MODES, one_of(cfg.cache_latents, CACHE_MODES)),
        ("cache_text_encoder_outputs", cfg.cache_text_encoder_outputs in CACHE_MODES, one_of(cfg.cache_text_encoder_outputs, CACHE_MODES)),
        ("masks", cfg.masks in MASK_MODES, one_of(cfg.masks, MASK_MODES)),
        ("mask_dir", cfg.masks != "dir" or bool(cfg.mask_dir), "data.masks is 'dir': set data.mask_dir to the folder of mask images (white = learn)."),
        ("max_token_length", cfg.max_token_length in MAX_TOKEN_LENGTHS,
         f"use one of {', '.join(map(str, MAX_TOKEN_LENGTHS))}: the caption's tokens, in windows of 75 (CLIP's own length)."),
    ])


def _train_problems(cfg: TrainConfig) -> list[str]:
    at_least_one = "it must be at least 1."
    return broken("train", cfg, [
        ("max_steps", cfg.max_steps >= 1, at_least_one),
        ("batch_size", cfg.batch_size >= 1, at_least_one),
        ("gradient_accumulation_steps", cfg.gradient_accumulation_steps >= 1, at_least_one),
        ("lr", is_learning_rate(cfg.lr), "use a positive learning rate (1e-4 is usual for LoRA; for Prodigy a multiplier, usually 1.0)."),
        ("lr_scheduler", cfg.lr_scheduler in LR_SCHEDULERS, one_of(cfg.lr_scheduler, LR_SCHEDULERS)),
        ("lr_warmup_steps", cfg.lr_warmup_steps >= 0, "it must be 0 (no warm-up) or a number of steps."),
        ("optimizer", cfg.optimizer in OPTIMIZERS, one_of(cfg.optimizer, OPTIMIZERS)),
        ("weight_decay", cfg.weight_decay >= 0, "it must be 0 or more (0.01 is usual)."),
        ("adam_beta1", 0 <= cfg.adam_beta1 < 1, "it must be in [0, 1) (0.9 is usual)."),
        ("adam_beta2", 0 <= cfg.adam_beta2 < 1, "it must be in [0, 1) (0.999 is usual)."),
        ("adam_epsilon", 0 <= cfg.adam_epsilon < math.inf, "it must be 0 or more (1e-8 is usual)."),
        ("max_grad_norm", cfg.max_grad_norm >= 0, "it must be 0 (no clipping) or more (1.0 is usual)."),
        seed_rule("seed", cfg.seed),
        ("mixed_precision", cfg.mixed_precision in MIXED_PRECISIONS, one_of(cfg.mixed_precision, MIXED_PRECISIONS)),
        ("shard_optimizer", not (cfg.shard_optimizer and cfg.optimizer == "prodigy"),
         "prodigy estimates its step size from every parameter at once, which a share of them cannot. Use adamw, adamw8bit or adafactor, or set it to false."),
        ("shard_model", not (cfg.shard_model and cfg.shard_optimizer),
         "train.shard_optimizer is true too, and shard_model shards the optimizer state already: set train.shard_optimizer=false."),
        ("shard_model", not (cfg.shard_model and cfg.optimizer in ("prodigy", "adamw8bit")),
         f"train.optimizer '{cfg.optimizer}' cannot step sharded weights (prodigy needs every parameter at once, bitsandbytes whole tensors). "
         "Use adamw or adafactor, or set train.shard_model=false (train.shard_optimizer=true works with adamw8bit)."),
        ("noise_offset", 0 <= cfg.noise_offset < math.inf, "it must be 0 (off) or more (0.05 to 0.1 is usual)."),
        ("min_snr_gamma", cfg.min_snr_gamma is None or 0 <= cfg.min_snr_gamma < math.inf, "use null or 0 (off), or a positive gamma (5 is usual)."),
        ("multires_noise_iterations", cfg.multires_noise_iterations >= 0, "it must be 0 (off) or more (6 to 10 is usual)."),
        ("multires_noise_discount", 0 < cfg.multires_noise_discount <= 1, "it must be in (0, 1] (0.3 is usual)."),
        ("ip_noise_gamma", 0 <= cfg.ip_noise_gamma < math.inf, "it must be 0 (off) or more (0.1 is usual)."),
        ("timestep_range", cfg.timestep_range is None or (len(cfg.timestep_range) == 2 and 0 <= cfg.timestep_range[0] < cfg.timestep_range[1]),
         "use null (every timestep) or [min, max] with 0 <= min < max, e.g. [0, 1000]; max itself is never drawn."),
        ("loss", cfg.loss in LOSSES, one_of(cfg.loss, LOSSES)),
        ("huber_schedule", cfg.huber_schedule in HUBER_SCHEDULES, one_of(cfg.huber_schedule, HUBER_SCHEDULES)),
        ("huber_c", 0 < cfg.huber_c <= 1, "it must be in (0, 1] (0.1 is usual)."),
        ("huber_scale", 0 < cfg.huber_scale < math.inf, "it must be positive (1 is usual)."),
        ("save_every_steps", cfg.save_every_steps >= 0, "it must be 0 (a checkpoint at the end only) or a number of steps."),
        ("keep_checkpoints", cfg.keep_checkpoints >= 0, "it must be 0 (keep all) or more."),
        ("log_every_steps", cfg.log_every_steps >= 1, at_least_one),
    ])


def _validation_problems(cfg: ValidationConfig) -> list[str]:
    return broken("validation", cfg, [
        ("split", 0 <= cfg.split < 1, "use a fraction in [0, 1): 0 (off) or e.g. 0.1 to hold out a tenth of the training images."),
        ("split", not (cfg.split and cfg.dir), "validation.dir is set too: use one of them (set validation.split=0 to use the folder)."),
        ("every_steps", cfg.every_steps >= 0, "it must be 0 (at the end only) or a number of steps."),
        ("timesteps", cfg.timesteps >= 1, "it must be at least 1 (8 is usual)."),
        seed_rule("seed", cfg.seed),
        ("keep_best", not (cfg.keep_best and not (cfg.split or cfg.dir)), "there is no validation set: set validation.split or validation.dir."),
    ])


def _sample_problems(cfg: SampleConfig) -> list[str]:
    # Stable Diffusion pipelines draw only multiples of 8 px.
    size = "it must be 0 (= data.resolution) or a positive multiple of 8 px."
    return broken("sample", cfg, [
        ("every_steps", cfg.every_steps >= 0, "it must be 0 (samples at the end only) or a number of steps."),
        ("every_steps", not (cfg.every_steps > 0 and not cfg.prompts), "there are no sample.prompts to draw. Add prompts or set sample.every_steps=0."),
        seed_rule("seed", cfg.seed),
        ("steps", cfg.steps >= 1, "it must be at least 1 (20 is usual)."),
        ("guidance_scale", 0 <= cfg.guidance_scale < math.inf, "it must be 0 or more (7 is usual; 1 or less means no guidance)."),
        ("width", cfg.width == 0 or (cfg.width > 0 and cfg.width % 8 == 0), size),
        ("height", cfg.height == 0 or (cfg.height > 0 and cfg.height % 8 == 0), size),
    ])


def _output_problems(cfg: OutputConfig) -> list[str]:
    return broken("output", cfg, [
        ("dir", bool(cfg.dir.strip()), "set it to the folder for the run's files, e.g. output/sls_frog."),
        ("name", is_plain_file_name(cfg.name),
         "it names the artifact files ({output.dir}/{output.name}.safetensors), so it must be a plain file name: not empty, "
         "no / or \\, not . or .., no leading dot, none of <>:\"|?* and no control characters. Use e.g. 'sls_frog'."),
        ("save_dtype", cfg.save_dtype in DTYPE_NAMES, one_of(cfg.save_dtype, DTYPE_NAMES)),
    ])


def is_plain_file_name(name: str) -> bool:
    return bool(name) and not name.startswith(".") and not any(char in _NOT_IN_FILE_NAMES or ord(char) < 32 or ord(char) == 127 for char in name)


def recipe_to_yaml(recipe: Recipe) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(recipe))


def recipe_to_dict(recipe: Recipe) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(recipe), resolve=True)
