"""``sdtrain import kohya`` and ``sdtrain export kohya``: kohya settings to a recipe, and back.

``RULES`` is the one table of every kohya option sdtrain knows: the recipe keys it maps to and how, or
why it is not carried over. The importer applies it, the exporter reads it backwards, and
docs/from-kohya.md is generated from it (``options_markdown``; a test keeps the page equal to it).
The files themselves are read and written by trainer/formats/kohya_config.py.
"""

from __future__ import annotations

import importlib
import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.errors import UserError
from trainer.formats.kohya_config import KohyaSetup, find_referenced, prompt_lines, read_kohya_files, read_prompts

# Why an option is not carried over, by kind.
MACHINE = "a speed or memory setting of the machine: sdtrain picks attention, precision handling and data loading itself"
OUTSIDE = "logging, upload or launcher setting outside training: no recipe key"
NO_FEATURE = "sdtrain has no such option; the run trains without it"
FROM_WEIGHTS = "starts from earlier kohya weights or state: sdtrain resumes only its own checkpoints (--resume)"
GUI_ONLY = "a kohya_ss GUI field that does not reach sd-scripts"

NETWORK_METHODS = ("lora", "lycoris")
# sd-scripts' lr_scheduler names that diffusers' get_scheduler (train.lr_scheduler) shares.
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
# kohya optimizer_type (lower case) -> train.optimizer, and each one's weight decay when optimizer_args gives none.
OPTIMIZERS = {"adamw": "adamw", "adamw8bit": "adamw8bit", "pagedadamw8bit": "adamw8bit", "prodigy": "prodigy", "adafactor": "adafactor"}
OPTIMIZER_WEIGHT_DECAY = {"adamw": 0.01, "adamw8bit": 0.01, "prodigy": 0.0, "adafactor": 0.0}
# kohya_ss GUI LoRA_type -> (method, lycoris algo).
GUI_LORA_TYPES = {
    "Standard": ("lora", None),
    "Kohya LoCon": ("lora", None),
    "LoCon": ("lora", None),
    "LyCORIS/LoCon": ("lycoris", "locon"),
    "LyCORIS/LoHa": ("lycoris", "loha"),
    "LyCORIS/LoKr": ("lycoris", "lokr"),
    "LyCORIS/iA3": ("lycoris", "ia3"),
    "LyCORIS/Native Fine-Tuning": ("lycoris", "full"),
}
# LyCORIS' algo names (network_args "algo=...") -> lycoris.algo.
LYCORIS_ALGOS = {"lora": "locon", "locon": "locon", "loha": "loha", "lokr": "lokr", "ia3": "ia3", "full": "full"}
SCRIPT_METHODS = {
    "train_network.py": "network",
    "sdxl_train_network.py": "network",
    "train_db.py": "dreambooth",
    "fine_tune.py": "dreambooth",
    "sdxl_train.py": "dreambooth",
    "train_textual_inversion.py": "textual_inversion",
    "sdxl_train_textual_inversion.py": "textual_inversion",
}
PRECISIONS = {"float": "fp32", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _is_off(value: Any) -> bool:
    """A value that switches nothing on: nothing is lost when it is not carried over."""
    if isinstance(value, str):
        return value.strip().lower() in ("", "0", "0.0", "false", "none", "no")
    return value is None or value is False or value == 0 or value == []


@dataclass
class Draft:
    """The recipe being built: dotted recipe keys -> values, with where each came from."""

    setup: KohyaSetup
    method: str = "lora"
    family: str | None = None
    script: str = "train_network.py"
    values: dict[str, Any] = field(default_factory=dict)
    # recipe key -> the comment written beside it (the kohya options, and a conversion).
    comments: dict[str, str] = field(default_factory=dict)
    # (option = value, why) for every option that is not carried over.
    dropped: list[tuple[str, str]] = field(default_factory=list)
    unset: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    # Options read without a recipe key of their own (e.g. dataset_config, sample_sampler ddim).
    used: set[str] = field(default_factory=set)
    # recipe key -> (amount, "epochs"/"percent"/"fraction", kohya option), converted to steps once the data is known.
    epochs: dict[str, tuple[float, str, str]] = field(default_factory=dict)
    defaulting: bool = False

    def set(self, key: str, value: Any, comment: str) -> None:
        self.values[key] = value
        self.comments[key] = comment if not self.defaulting else f"{comment} (kohya's default; the file does not set it)"

    def drop(self, name: str, value: Any, why: str) -> None:
        if self.defaulting:
            return
        if _is_off(value):
            self.unset.append(name)
        else:
            self.dropped.append((f"{_display(name)} = {_shown(value)}", why))

    def origin(self, name: str) -> str:
        path = self.setup.origins.get(name.partition(":")[0]) or self.setup.dataset_file
        return f"'{path}'" if path else "the kohya file"

    def number(self, name: str, value: Any, kind: type) -> Any:
        try:
            if kind is int:
                as_float = float(value)
                if not as_float.is_integer():
                    raise ValueError
                return int(as_float)
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"kohya option {_display(name)} in {self.origin(name)} is {value!r}; sdtrain expects {'a whole number' if kind is int else 'a number'} there. Fix it in that file.") from None

    def flag(self, name: str, value: Any) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)):
            return bool(value)
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off", "none"):
            return False
        raise UserError(f"kohya option {_display(name)} in {self.origin(name)} is {value!r}; sdtrain expects true or false there. Fix it in that file.")


def _display(name: str) -> str:
    """``network_args:conv_dim`` as a kohya user writes it."""
    group, _, arg = name.partition(":")
    return f'{group} "{arg}=…"' if arg else name


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


Apply = Callable[[Draft, str, Any], None]
Export = Callable[[Any], dict[str, Any]]


@dataclass(frozen=True)
class Rule:
    """One row of docs/from-kohya.md: kohya option names (the first is sd-scripts', the others aliases,
    e.g. the GUI's), the recipe keys they set ("" = not carried over), and how (or why not)."""

    options: tuple[str, ...]
    keys: str
    how: str
    apply: Apply | None = None
    export: Export | None = None
    # What sd-scripts uses when the option is absent, where it differs from the recipe's default.
    kohya_default: Any = None

    @property
    def carried(self) -> bool:
        return bool(self.keys)


def _get(recipe: Any, key: str) -> Any:
    value = recipe
    for part in key.split("."):
        value = getattr(value, part)
    return value


def to(option: str, key: str, kind: type, how: str = "", *aliases: str, default: Any = None, only: tuple[str, ...] = (), unset: tuple = ()) -> Rule:
    """A rule that copies the value, converted to ``kind``, to ``key`` (``{method}`` = the method's section).
    The export leaves the option out for the recipe values in ``unset``: those sd-scripts spells by omitting it."""

    def apply(draft: Draft, name: str, value: Any) -> None:
        if only and draft.method not in only:
            draft.drop(name, value, f"only for method {' or '.join(only)}; this is {draft.method}")
            return
        converted = draft.flag(name, value) if kind is bool else value if kind is str else draft.number(name, value, kind)
        draft.set(key.format(method=draft.method), converted, f"kohya {_display(name)}")

    def export(recipe: Any) -> dict[str, Any]:
        # optimizer_args entries are exported together (_export_train).
        if (only and recipe.method not in only) or ":" in option:
            return {}
        value = _get(recipe, key.format(method=recipe.method))
        if kind is bool:
            return {option: True} if value else {}
        return {} if value is None or value == "" or value in unset else {option: value}

    return Rule((option, *aliases), key, how or "copied", apply, export, default)


def dropped(why: str, *options: str) -> Rule:
    return Rule(tuple(options), "", why)


# --- handlers of the rules that convert -----------------------------------------------------------


def _decided_first(draft: Draft, name: str, value: Any) -> None:
    """Options that decide the method, family or data were read before the table (see _start)."""
    draft.used.add(name)


def _train_data_dir(draft: Draft, name: str, value: Any) -> None:
    if "data.subsets" in draft.values and draft.setup.dataset is not None:
        draft.drop(name, value, "the dataset TOML's subsets are used (sd-scripts ignores train_data_dir with --dataset_config)")
        return
    folder = find_referenced(draft.setup, name, str(value), want_dir=True)
    draft.set("data.dir", str(folder), f"kohya {name}: subfolders 'N_words' = N repeats, words = caption of uncaptioned images")


def _reg_data_dir(draft: Draft, name: str, value: Any) -> None:
    if draft.setup.dataset is not None:
        draft.drop(name, value, "the dataset TOML's subsets are used (sd-scripts ignores reg_data_dir with --dataset_config)")
        return
    from trainer.data.sources import parse_kohya_folder

    parent = find_referenced(draft.setup, name, str(value), want_dir=True)
    subsets = []
    for child in sorted(parent.iterdir(), key=lambda path: path.name):
        parsed = parse_kohya_folder(child.name) if child.is_dir() else None
        if parsed:
            repeats, words = parsed
            subsets.append({"dir": str(child), "repeats": repeats, **({"caption": words} if words else {}), "is_reg": True})
    if not subsets:
        raise UserError(f"reg_data_dir in {draft.origin(name)} names '{parent}', which has no 'N_words' subfolders (e.g. '1_frog'). Fix the path or the folder names.")
    draft.set("data.subsets", draft.values.get("data.subsets", []) + subsets, f"kohya {name}: regularisation images, weighted by the prior loss weight")


def _resolution(draft: Draft, name: str, value: Any) -> None:
    sides = value if isinstance(value, list) else [part for part in str(value).replace("x", ",").split(",") if part.strip()]
    width, height = (draft.number(name, side, int) for side in (sides * 2)[:2])
    if width == height:
        draft.set("data.resolution", width, f"kohya {name}")
        return
    side = int(math.sqrt(width * height)) // 8 * 8
    draft.set("data.resolution", side, f"kohya {name} {width}x{height}: the same training area as a square (sdtrain's resolution is an area)")


def _caption_prefix(draft: Draft, name: str, value: Any) -> None:
    separator = str(draft.values.get("data.tag_separator", ","))
    word = str(value).strip().rstrip(separator).strip()
    draft.set("data.trigger_word", word, f"kohya {name} (sdtrain skips captions that already start with it, and regularisation images)")


def _switch(key: str, setting: str) -> Apply:
    """A kohya flag that, when on, sets ``key`` to ``setting``."""

    def apply(draft: Draft, name: str, value: Any) -> None:
        if draft.flag(name, value):
            draft.set(key, setting, f"kohya {name}")

    return apply


def _switch_export(key: str, setting: str, option: str) -> Export:
    return lambda recipe: {option: True} if _get(recipe, key) == setting else {}


def _cache(key: str, mode: str) -> Apply:
    def apply(draft: Draft, name: str, value: Any) -> None:
        if draft.flag(name, value) and draft.values.get(key) != "disk":
            draft.set(key, mode, f"kohya {name}")

    return apply


def _network_dim(key: str) -> Apply:
    def apply(draft: Draft, name: str, value: Any) -> None:
        if draft.method not in NETWORK_METHODS:
            draft.drop(name, value, f"no network in method {draft.method}")
            return
        kind = int if key == "rank" else float
        draft.set(f"{draft.method}.{key}", draft.number(name, value, kind), f"kohya {_display(name)}")

    return apply


def _text_encoder_lr(draft: Draft, name: str, value: Any) -> None:
    values = value if isinstance(value, list) else [value]
    values = [item for item in values if not _is_empty(item)]
    if not values:
        return
    rate = draft.number(name, values[0], float)
    if draft.method == "textual_inversion" or rate == 0:
        # kohya: a text-encoder lr of 0 leaves the text encoder out of the optimizer.
        if draft.method in NETWORK_METHODS and rate == 0 and not draft.setup.from_gui:
            draft.set(f"{draft.method}.text_encoder", False, f"kohya {name} = 0: the text encoder does not train")
        else:
            draft.drop(name, value, "the text encoder does not train in this method" if draft.method == "textual_inversion" else "0 in the GUI means 'use learning_rate'")
        return
    note = "" if len(values) == 1 else f" (the first of {values}: sdtrain has one text-encoder rate)"
    draft.set(f"{draft.method}.text_encoder_lr", rate, f"kohya {name}{note}")


def _learning_rate(draft: Draft, name: str, value: Any) -> None:
    rate = draft.number(name, value, float)
    te_rates = [draft.setup.options.get(option) for option in _RULE_OF["text_encoder_lr"].options]
    if "train.lr" not in draft.values:
        draft.set("train.lr", rate, f"kohya {name}")
    elif any(not _is_off(te_rate) for te_rate in te_rates) and draft.method != "textual_inversion":
        draft.drop(name, value, "unet_lr and text_encoder_lr set both rates (as in sd-scripts)")
    elif draft.method != "textual_inversion" and f"{draft.method}.text_encoder_lr" not in draft.values:
        # unet_lr set the UNet's rate; the text encoder keeps learning_rate, as in sd-scripts.
        draft.set(f"{draft.method}.text_encoder_lr", rate, f"kohya {name} (unet_lr sets the UNet's)")


def _unet_lr(draft: Draft, name: str, value: Any) -> None:
    rate = draft.number(name, value, float)
    if rate:
        draft.set("train.lr", rate, f"kohya {name}")


def _scheduler(draft: Draft, name: str, value: Any) -> None:
    scheduler = str(value).strip().lower()
    if scheduler in SCHEDULERS:
        draft.set("train.lr_scheduler", scheduler, f"kohya {name}")
    else:
        draft.drop(name, value, f"sdtrain's schedules are {', '.join(SCHEDULERS)}; the recipe keeps constant")


def _warmup(draft: Draft, name: str, value: Any) -> None:
    amount = draft.number(name, value, float)
    if amount == 0:
        draft.set("train.lr_warmup_steps", 0, f"kohya {name}")
    elif name == "lr_warmup":
        draft.epochs["train.lr_warmup_steps"] = (amount / 100, "percent", name)
    elif 0 < amount < 1:
        # sd-scripts reads a warm-up below 1 as a fraction of the run.
        draft.epochs["train.lr_warmup_steps"] = (amount, "fraction", name)
    else:
        draft.set("train.lr_warmup_steps", int(amount), f"kohya {name}")


def _optimizer(draft: Draft, name: str, value: Any) -> None:
    chosen = "adamw8bit" if name == "use_8bit_adam" else OPTIMIZERS.get(str(value).strip().lower())
    if name == "use_8bit_adam" and not draft.flag(name, value):
        return
    if chosen is None:
        draft.drop(name, value, f"sdtrain's optimizers are adamw, adamw8bit, prodigy and adafactor; the recipe keeps adamw (check train.lr: it was meant for {value})")
        return
    draft.set("train.optimizer", chosen, f"kohya {name}")
    if "train.weight_decay" not in draft.values:
        draft.set("train.weight_decay", OPTIMIZER_WEIGHT_DECAY[chosen], f"the weight decay {value} uses when optimizer_args gives none")


def _betas(draft: Draft, name: str, value: Any) -> None:
    parts = [part for part in str(value).strip("()[] ").split(",") if part.strip()]
    if len(parts) != 2:
        raise UserError(f"kohya option {_display(name)} in {draft.origin(name)} is {value!r}; expected two numbers, e.g. betas=0.9,0.999. Fix it in that file.")
    draft.set("train.adam_beta1", draft.number(name, parts[0], float), f"kohya {_display(name)}")
    draft.set("train.adam_beta2", draft.number(name, parts[1], float), f"kohya {_display(name)}")


def _timestep_bound(index: int) -> Apply:
    """min_timestep / max_timestep: one end of train.timestep_range (the other kohya's default until set)."""

    def apply(draft: Draft, name: str, value: Any) -> None:
        bounds = list(draft.values.get("train.timestep_range") or [0, 1000])
        bounds[index] = draft.number(name, value, int)
        draft.set("train.timestep_range", bounds, "kohya min_timestep, max_timestep")

    return apply


def _timestep_export(option: str, index: int) -> Export:
    def export(recipe: Any) -> dict[str, Any]:
        bounds = recipe.train.timestep_range
        return {option: bounds[index]} if bounds else {}

    return export


def _precision(key: str) -> Apply:
    def apply(draft: Draft, name: str, value: Any) -> None:
        text = str(value).strip().lower()
        choices = {"no": "no", "fp16": "fp16", "bf16": "bf16"} if key == "train.mixed_precision" else PRECISIONS
        if text in choices:
            draft.set(key, choices[text], f"kohya {name}")
        else:
            draft.drop(name, value, f"not one of {', '.join(choices)}")

    return apply


def _duration(draft: Draft, name: str, value: Any) -> None:
    if name == "max_train_steps":
        steps = draft.number(name, value, int)
        if steps > 0:
            draft.set("train.max_steps", steps, f"kohya {name}")
        return
    epochs = draft.number(name, value, int)
    if epochs <= 0:
        return
    if draft.setup.from_gui and name == "epoch" and draft.values.get("train.max_steps"):
        draft.drop(name, value, "the GUI trains max_train_steps when it is set")
        return
    draft.epochs["train.max_steps"] = (epochs, "epochs", name)


def _every(key: str, per: str) -> Apply:
    def apply(draft: Draft, name: str, value: Any) -> None:
        count = draft.number(name, value, int)
        if count <= 0:
            return
        if per == "steps":
            draft.set(key, count, f"kohya {name}")
        else:
            draft.epochs[key] = (count, "epochs", name)

    return apply


def _keep_last(draft: Draft, name: str, value: Any) -> None:
    count = draft.number(name, value, int)
    if count <= 0:
        return
    if name.startswith("save_last_n_steps"):
        every = draft.values.get("train.save_every_steps")
        if not every:
            draft.drop(name, value, "without save_every_n_steps there is nothing to count")
            return
        count = max(1, count // every)
    draft.set("train.keep_checkpoints", count, f"kohya {name}: sdtrain keeps the newest N checkpoints")


def _save_model_as(draft: Draft, name: str, value: Any) -> None:
    kind = str(value).strip().lower()
    formats = {
        "lora": {"safetensors": "kohya"},
        "lycoris": {"safetensors": "kohya"},
        "dreambooth": {"safetensors": "single_file", "ckpt": "single_file", "diffusers": "diffusers", "diffusers_safetensors": "diffusers"},
        "textual_inversion": {"safetensors": "a1111", "pt": "a1111_pt"},
    }[draft.method]
    if kind in formats:
        draft.set("output.formats", [formats[kind]], f"kohya {name}")
    else:
        draft.drop(name, value, f"sdtrain writes {', '.join(sorted(set(formats.values())))} for {draft.method}; the recipe keeps the method's default")


def _family_flag(family: str) -> Apply:
    def apply(draft: Draft, name: str, value: Any) -> None:
        if draft.flag(name, value) and draft.family is None:
            draft.family = family
        if draft.family:
            draft.set("model.family", draft.family, f"kohya {name}" if draft.family == family else f"kohya script {draft.script}")

    return apply


def _prediction(draft: Draft, name: str, value: Any) -> None:
    if draft.flag(name, value):
        draft.set("model.prediction_type", "v_prediction", f"kohya {name}")


def _clip_skip(draft: Draft, name: str, value: Any) -> None:
    skip = draft.number(name, value, int)
    if draft.family == "sdxl":
        draft.drop(name, value, "kohya's SDXL trainers do not use it (they always take SDXL's own layers, as model.clip_skip 1 does)")
    elif skip >= 1:
        draft.set("model.clip_skip", skip, f"kohya {name}")


def _no_half_vae(draft: Draft, name: str, value: Any) -> None:
    if draft.flag(name, value):
        draft.set("model.vae_fp32", True, f"kohya {name}")


def _unet_only(draft: Draft, name: str, value: Any) -> None:
    if draft.method in NETWORK_METHODS:
        if f"{draft.method}.text_encoder" not in draft.values:
            draft.set(f"{draft.method}.text_encoder", not draft.flag(name, value), f"kohya {name}" + ("" if draft.flag(name, value) else " absent: the text encoder trains too"))
    elif not draft.defaulting:
        draft.drop(name, value, f"no network in method {draft.method}")


def _stop_text_encoder(draft: Draft, name: str, value: Any) -> None:
    if draft.method != "dreambooth":
        draft.drop(name, value, "only for DreamBooth")
        return
    steps = draft.number(name, value, int)
    if steps < 0:
        draft.set("dreambooth.train_text_encoder", False, f"kohya {name} = {steps}: the text encoder does not train")
    elif draft.setup.from_gui and steps > 0:
        draft.epochs["dreambooth.text_encoder_steps"] = (steps / 100, "percent", name)
    elif steps > 0:
        draft.set("dreambooth.text_encoder_steps", steps, f"kohya {name}")


def _prior_loss_weight(draft: Draft, name: str, value: Any) -> None:
    weight = draft.number(name, value, float)
    if draft.method == "dreambooth":
        draft.set("dreambooth.prior_loss_weight", weight, f"kohya {name}")
    elif weight != 1.0:
        draft.drop(name, value, f"sdtrain weights regularisation images 1.0 in method {draft.method} (only dreambooth has a prior loss weight)")


def _token_string(draft: Draft, name: str, value: Any) -> None:
    word = str(value).strip()
    note = "" if word == word.lower() else f" '{word}' lower-cased: CLIP lower-cases every prompt"
    draft.set("textual_inversion.placeholder", word.lower(), f"kohya {name}{note}")


def _template(kind: str) -> Apply:
    def apply(draft: Draft, name: str, value: Any) -> None:
        if draft.flag(name, value):
            draft.set("textual_inversion.captions", kind, f"kohya {name}")

    return apply


def _sample_prompts(draft: Draft, name: str, value: Any) -> None:
    text = str(value)
    path = None
    if "\n" not in text.strip() and (text.endswith((".txt", ".toml", ".json")) or not draft.setup.from_gui):
        path = find_referenced(draft.setup, name, text.strip(), want_dir=False)
    prompts = read_prompts(path) if path else prompt_lines(text)
    prompts = [prompt for prompt in prompts if prompt.get("prompt")]
    if not prompts:
        return
    draft.set("sample.prompts", [prompt["prompt"] for prompt in prompts], f"kohya {name}" + (f" ({path})" if path else ""))
    # kohya's defaults for what a prompt does not say (sample_image_inference); seeds are drawn at random there.
    settings = {"negative_prompt": ("sample.negative_prompt", "--n", ""), "width": ("sample.width", "--w", 512), "height": ("sample.height", "--h", 512),
                "sample_steps": ("sample.steps", "--s", 30), "scale": ("sample.guidance_scale", "--l", 7.5)}
    for setting, (key, flag, default) in settings.items():
        chosen = {prompt.get(setting, default) for prompt in prompts}
        if len(chosen) == 1:
            draft.set(key, chosen.pop(), f"kohya prompt {flag}" if any(setting in prompt for prompt in prompts) else f"kohya's default for prompts without {flag}")
        else:
            first = prompts[0].get(setting, default)
            draft.set(key, first, f"kohya prompt {flag} of the first prompt")
            draft.dropped.append((f"prompt {flag} per prompt ({', '.join(str(p.get(setting, default)) for p in prompts)})", "sdtrain's sample settings are shared by all prompts; the recipe uses the first prompt's"))
    seeds = [prompt.get("seed") for prompt in prompts]
    if seeds[0] is not None and all(seed == seeds[0] + i for i, seed in enumerate(seeds)):
        draft.set("sample.seed", seeds[0], "kohya prompt --d (prompt i uses seed + i)")
    elif any(seed is not None for seed in seeds):
        draft.dropped.append((f"prompt --d ({', '.join(str(seed) for seed in seeds)})", "sdtrain seeds prompt i with sample.seed + i"))
    others = sorted({key for prompt in prompts for key in prompt} - {"prompt", "seed", *settings})
    if others:
        draft.dropped.append((f"prompt options {', '.join(others)}", "sdtrain samples with DDIM and nothing else per prompt"))


def _sampler(draft: Draft, name: str, value: Any) -> None:
    if str(value).strip().lower() == "ddim":
        draft.used.add(name)
    else:
        draft.drop(name, value, "sdtrain samples with DDIM")


def _module_choice(draft: Draft, name: str, value: Any) -> None:
    """network_args "algo", "preset", "conv_dim" and the like: each to its own key, per method."""
    arg = name.partition(":")[2] or name
    arg = {"use_cp": "use_tucker", "LyCORIS_preset": "preset", "dropout": "network_dropout"}.get(arg, arg)
    if draft.setup.from_gui and draft.setup.options.get("LoRA_type") == "Standard" and arg in ("conv_dim", "conv_alpha"):
        draft.drop(name, value, "the GUI passes it only for LoCon and LyCORIS types, not LoRA_type Standard")
        return
    if draft.method == "lora":
        keys = {"conv_dim": ("lora.conv_rank", int), "conv_alpha": ("lora.conv_alpha", float)}
    elif draft.method == "lycoris":
        keys = {"conv_dim": ("lycoris.conv_rank", int), "conv_alpha": ("lycoris.conv_alpha", float), "factor": ("lycoris.factor", int),
                "decompose_both": ("lycoris.decompose_both", bool), "use_tucker": ("lycoris.use_tucker", bool),
                "rank_dropout": ("lycoris.rank_dropout", float), "network_dropout": ("lycoris.dropout", float)}
    else:
        draft.drop(name, value, f"no network in method {draft.method}")
        return
    if draft.setup.from_gui and draft.method == "lora" and arg not in keys:
        draft.unset.append(name)  # the GUI passes its LyCORIS fields only for LyCORIS types
        return
    if arg == "algo" and draft.method == "lycoris":
        return  # read with the method (_start)
    if arg == "preset" and draft.method == "lycoris":
        preset = str(value).strip().lower()
        from trainer.methods.lycoris.config import PRESET_NAMES

        if preset in PRESET_NAMES:
            draft.set("lycoris.preset", preset, f"kohya {_display(name)}")
        else:
            draft.drop(name, value, f"sdtrain's LyCORIS presets are {', '.join(PRESET_NAMES)}; the recipe keeps full (LyCORIS' default)")
        return
    if arg == "dora_wd" and draft.method == "lycoris":
        if draft.flag(name, value) and draft.values.get("lycoris.algo") == "locon":
            draft.set("lycoris.algo", "dora", f"kohya {_display(name)}: LoCon with weight decomposition")
        elif draft.flag(name, value):
            draft.drop(name, value, f"sdtrain has DoRA for LoCon only, not {draft.values.get('lycoris.algo')}")
        return
    if arg not in keys:
        draft.drop(name, value, f"sdtrain's {draft.method} has no such argument")
        return
    key, kind = keys[arg]
    converted = draft.flag(name, value) if kind is bool else draft.number(name, value, kind)
    draft.set(key, converted, f"kohya {_display(name)}")


def _logging(draft: Draft, name: str, value: Any) -> None:
    draft.set("output.tensorboard", True, f"kohya {name} (sdtrain logs to {{output.dir}}/logs)")


def _export_network(recipe: Any) -> dict[str, Any]:
    if recipe.method == "lora":
        cfg = recipe.lora
        args = [f"conv_dim={cfg.conv_rank}", f"conv_alpha={cfg.conv_alpha:g}"] if cfg.conv_rank else []
        options = {"network_module": "networks.lora", "network_dim": cfg.rank, "network_alpha": cfg.alpha}
    elif recipe.method == "lycoris":
        cfg = recipe.lycoris
        algo = "locon" if cfg.algo == "dora" else cfg.algo
        args = [f"algo={algo}", f"preset={cfg.preset}"] + (["dora_wd=True"] if cfg.algo == "dora" else [])
        if cfg.conv_rank is not None:
            args.append(f"conv_dim={cfg.conv_rank}")
        if cfg.conv_alpha is not None:
            args.append(f"conv_alpha={cfg.conv_alpha:g}")
        args += [f"factor={cfg.factor}"] if cfg.algo == "lokr" else []
        args += [f"{name}=True" for name in ("decompose_both", "use_tucker") if getattr(cfg, name)]
        args += [f"rank_dropout={cfg.rank_dropout:g}"] if cfg.rank_dropout else []
        options = {"network_module": "lycoris.kohya", "network_dim": cfg.rank, "network_alpha": cfg.alpha}
    else:
        return {}
    if cfg.dropout:
        options["network_dropout"] = cfg.dropout
    if args:
        options["network_args"] = args
    if not cfg.text_encoder:
        options["network_train_unet_only"] = True
    elif cfg.text_encoder_lr is not None:
        options["text_encoder_lr"] = cfg.text_encoder_lr
    return options


def _export_train(recipe: Any) -> dict[str, Any]:
    cfg = recipe.train
    options: dict[str, Any] = {"max_train_steps": cfg.max_steps, "train_batch_size": cfg.batch_size, "learning_rate": cfg.lr,
                               "lr_scheduler": cfg.lr_scheduler, "lr_warmup_steps": cfg.lr_warmup_steps, "seed": cfg.seed,
                               "optimizer_type": {"adamw": "AdamW", "adamw8bit": "AdamW8bit", "prodigy": "Prodigy", "adafactor": "Adafactor"}[cfg.optimizer],
                               "optimizer_args": [f"weight_decay={cfg.weight_decay:g}", f"betas={cfg.adam_beta1:g},{cfg.adam_beta2:g}"] + ([f"eps={cfg.adam_epsilon:g}"] if cfg.optimizer != "adafactor" else [])}
    if cfg.optimizer == "adafactor":
        options["optimizer_args"] += ["relative_step=False", "scale_parameter=False", "warmup_init=False"]
    if cfg.mixed_precision in ("no", "fp16", "bf16"):
        options["mixed_precision"] = cfg.mixed_precision
    if recipe.method == "dreambooth":
        options["prior_loss_weight"] = recipe.dreambooth.prior_loss_weight
    return options


def _export_dreambooth(recipe: Any) -> dict[str, Any]:
    if recipe.method != "dreambooth":
        return {}
    cfg = recipe.dreambooth
    if not cfg.train_text_encoder:
        return {"stop_text_encoder_training": -1}
    options: dict[str, Any] = {"learning_rate_te": cfg.text_encoder_lr} if cfg.text_encoder_lr is not None else {}
    if cfg.text_encoder_steps:
        options["stop_text_encoder_training"] = cfg.text_encoder_steps
    return options


def _export_ti(recipe: Any) -> dict[str, Any]:
    if recipe.method != "textual_inversion":
        return {}
    cfg = recipe.textual_inversion
    options: dict[str, Any] = {"token_string": cfg.placeholder, "init_word": cfg.initializer, "num_vectors_per_token": cfg.num_vectors}
    if cfg.captions in ("object", "style"):
        options[f"use_{cfg.captions}_template"] = True
    return options


def _export_family(recipe: Any) -> dict[str, Any]:
    options: dict[str, Any] = {"v2": True} if recipe.model.family == "sd2" else {}
    if recipe.model.prediction_type == "v_prediction":
        options["v_parameterization"] = True
    if recipe.model.vae_fp32:
        options["no_half_vae"] = True
    if recipe.model.clip_skip > 1 and recipe.model.family != "sdxl":
        options["clip_skip"] = recipe.model.clip_skip
    return options


def _export_caches(recipe: Any) -> dict[str, Any]:
    options = {}
    for mode, option in ((recipe.data.cache_latents, "cache_latents"), (recipe.data.cache_text_encoder_outputs, "cache_text_encoder_outputs")):
        if mode != "none":
            options[option] = True
        if mode == "disk":
            options[f"{option}_to_disk"] = True
    return options


def _export_saving(recipe: Any) -> dict[str, Any]:
    options: dict[str, Any] = {"output_dir": recipe.output.dir, "output_name": recipe.output.name,
                               "save_precision": {"fp32": "float"}.get(recipe.output.save_dtype, recipe.output.save_dtype),
                               "save_model_as": {"diffusers": "diffusers", "a1111_pt": "pt"}.get(recipe.output.formats[0] if recipe.output.formats else "", "safetensors")}
    if recipe.train.save_every_steps:
        options["save_every_n_steps"] = recipe.train.save_every_steps
        if recipe.train.keep_checkpoints:
            options["save_last_n_steps"] = recipe.train.save_every_steps * recipe.train.keep_checkpoints
    if recipe.output.comment:
        options["training_comment"] = recipe.output.comment
    if recipe.output.tensorboard:
        options["logging_dir"] = str(Path(recipe.output.dir) / "logs")
    return options


# The mapping, in the order the importer applies it (the method and the data come first: later rules depend on them).
RULES: list[Rule] = [
    # the method and the model family
    Rule(("network_module", "LoRA_type"), "method", "networks.lora -> lora; lycoris.kohya -> lycoris (algo from network_args); kohya_ss GUI LoRA_type likewise. The script decides the rest: train_db.py, fine_tune.py, sdxl_train.py -> dreambooth; train_textual_inversion.py -> textual_inversion", _decided_first, _export_network),
    Rule(("sdxl",), "model.family", "true -> sdxl (as the sdxl_* scripts)", _family_flag("sdxl")),
    Rule(("v2",), "model.family", "true -> sd2", _family_flag("sd2")),
    Rule(("v_parameterization",), "model.prediction_type", "true -> v_prediction", _prediction, _export_family),
    to("pretrained_model_name_or_path", "model.base", str, "copied (a file, a diffusers folder or a hub id in the local cache)"),
    to("vae", "model.vae", str),
    Rule(("no_half_vae", "sdxl_no_half_vae"), "model.vae_fp32", "true -> true", _no_half_vae),
    Rule(("clip_skip",), "model.clip_skip", "copied (SD1/SD2; kohya's SDXL trainers ignore it)", _clip_skip),
    # data
    Rule(("dataset_config",), "data.subsets", "the dataset TOML's subsets (image_dir, num_repeats, class_tokens, is_reg, caption_extension); settings sdtrain has once per run come from the first training subset", _decided_first),
    Rule(("train_data_dir",), "data.dir", "copied: the same 'N_words' folder layout", _train_data_dir),
    Rule(("reg_data_dir",), "data.subsets[]", "each 'N_words' subfolder a subset with is_reg: true", _reg_data_dir),
    to("caption_extension", "data.caption_extension", str, "copied (kohya's default is .caption)", "caption_extention", default=".caption"),
    Rule(("resolution", "max_resolution"), "data.resolution", "'512,512' -> 512; a non-square W,H -> the square of the same area (sdtrain's resolution is an area)", _resolution),
    to("enable_bucket", "data.buckets.enabled", bool, "copied (kohya's default is off)", default=False),
    to("min_bucket_reso", "data.buckets.min_side", int),
    to("max_bucket_reso", "data.buckets.max_side", int),
    to("bucket_reso_steps", "data.buckets.step", int),
    to("bucket_no_upscale", "data.buckets.no_upscale", bool),
    to("flip_aug", "data.flip", bool),
    to("shuffle_caption", "data.shuffle_tags", bool),
    to("keep_tokens", "data.keep_tokens", int),
    to("caption_separator", "data.tag_separator", str),
    to("caption_dropout_rate", "data.caption_dropout", float),
    to("caption_tag_dropout_rate", "data.tag_dropout", float),
    Rule(("caption_prefix",), "data.trigger_word", "the prefix without its trailing separator; sdtrain does not prefix a caption that already starts with it, nor regularisation images", _caption_prefix),
    # sd-scripts accepts only 150 or 225; its 75 tokens is the option left out.
    to("max_token_length", "data.max_token_length", int, unset=(75,)),
    Rule(("cache_latents",), "data.cache_latents", "true -> memory", _cache("data.cache_latents", "memory"), _export_caches),
    Rule(("cache_latents_to_disk",), "data.cache_latents", "true -> disk", _cache("data.cache_latents", "disk")),
    Rule(("cache_text_encoder_outputs", "sdxl_cache_text_encoder_outputs"), "data.cache_text_encoder_outputs", "true -> memory", _cache("data.cache_text_encoder_outputs", "memory")),
    Rule(("cache_text_encoder_outputs_to_disk",), "data.cache_text_encoder_outputs", "true -> disk", _cache("data.cache_text_encoder_outputs", "disk")),
    # training
    to("train_batch_size", "train.batch_size", int, "copied (a dataset TOML's batch_size too)", "batch_size"),
    to("gradient_accumulation_steps", "train.gradient_accumulation_steps", int),
    Rule(("max_train_steps", "max_train_epochs", "epoch"), "train.max_steps", "steps copied; epochs × optimizer steps per epoch, counted on the data as sdtrain buckets it (max_train_epochs wins, as in sd-scripts; kohya's default is 1600 steps)", _duration, _export_train, kohya_default=1600),
    Rule(("unet_lr",), "train.lr", "copied: the UNet's rate is the run's rate", _unet_lr),
    Rule(("learning_rate",), "train.lr", "copied; with unet_lr set it is the text encoder's rate (as in sd-scripts)", _learning_rate, kohya_default=2e-6),
    Rule(("text_encoder_lr", "learning_rate_te", "learning_rate_te1"), "lora/lycoris/dreambooth.text_encoder_lr", "copied (a list: its first value); 0 on the command line -> the text encoder does not train", _text_encoder_lr),
    Rule(("lr_scheduler",), "train.lr_scheduler", f"copied when one of {', '.join(SCHEDULERS)}", _scheduler),
    Rule(("lr_warmup_steps", "lr_warmup"), "train.lr_warmup_steps", "copied; a value below 1 is a fraction of the run, the GUI's lr_warmup a percentage of it", _warmup),
    Rule(("optimizer_type", "optimizer", "use_8bit_adam"), "train.optimizer", "AdamW, AdamW8bit, PagedAdamW8bit, Prodigy, Adafactor (any case); the weight decay becomes that optimizer's default unless optimizer_args sets it", _optimizer),
    to("optimizer_args:weight_decay", "train.weight_decay", float),
    Rule(("optimizer_args:betas",), "train.adam_beta1, train.adam_beta2", "betas=0.9,0.999 -> 0.9 and 0.999", _betas),
    to("optimizer_args:eps", "train.adam_epsilon", float),
    to("max_grad_norm", "train.max_grad_norm", float),
    to("seed", "train.seed", int),
    Rule(("mixed_precision",), "train.mixed_precision", "copied (kohya's default is no)", _precision("train.mixed_precision"), kohya_default="no"),
    to("gradient_checkpointing", "train.gradient_checkpointing", bool),
    to("noise_offset", "train.noise_offset", float),
    to("min_snr_gamma", "train.min_snr_gamma", float),
    Rule(("alpha_mask",), "data.masks", "true -> alpha", _switch("data.masks", "alpha"), _switch_export("data.masks", "alpha", "alpha_mask")),
    Rule(("masked_loss",), "data.masks", "true -> dir (the masks in conditioning_data_dir)", _switch("data.masks", "dir"), _switch_export("data.masks", "dir", "masked_loss")),
    to("conditioning_data_dir", "data.mask_dir", str, "copied (the mask folder of masked_loss)"),
    to("validation_split", "validation.split", float),
    to("validation_seed", "validation.seed", int),
    # sd-scripts divides by it after every step: never validating is the option left out.
    to("validate_every_n_steps", "validation.every_steps", int, unset=(0,)),
    to("multires_noise_iterations", "train.multires_noise_iterations", int),
    to("multires_noise_discount", "train.multires_noise_discount", float),
    to("ip_noise_gamma", "train.ip_noise_gamma", float),
    to("zero_terminal_snr", "train.zero_terminal_snr", bool),
    to("debiased_estimation_loss", "train.debiased_estimation", bool),
    to("loss_type", "train.loss", str),
    to("huber_schedule", "train.huber_schedule", str),
    to("huber_c", "train.huber_c", float),
    to("huber_scale", "train.huber_scale", float),
    Rule(("min_timestep",), "train.timestep_range", "the range's first value", _timestep_bound(0), _timestep_export("min_timestep", 0)),
    Rule(("max_timestep",), "train.timestep_range", "the range's second value (drawn up to it, not including it)", _timestep_bound(1), _timestep_export("max_timestep", 1)),
    Rule(("prior_loss_weight",), "dreambooth.prior_loss_weight", "copied for DreamBooth; LoRA and LyCORIS weight regularisation images 1.0", _prior_loss_weight),
    # the network
    Rule(("network_dim",), "lora.rank / lycoris.rank", "copied (kohya's default is 4)", _network_dim("rank"), kohya_default=4),
    Rule(("network_alpha",), "lora.alpha / lycoris.alpha", "copied (kohya's default is 1)", _network_dim("alpha"), kohya_default=1),
    Rule(("network_dropout",), "lora.dropout / lycoris.dropout", "copied", _network_dim("dropout")),
    Rule(("network_train_unet_only",), "lora.text_encoder / lycoris.text_encoder", "true -> false; absent -> true (sd-scripts trains the text encoder unless told not to)", _unet_only, kohya_default=False),
    Rule(("network_args:conv_dim", "conv_dim"), "lora.conv_rank / lycoris.conv_rank", "copied", _module_choice),
    Rule(("network_args:conv_alpha", "conv_alpha"), "lora.conv_alpha / lycoris.conv_alpha", "copied", _module_choice),
    Rule(("network_args:algo",), "lycoris.algo", "lora/locon -> locon; loha, lokr, ia3, full copied", _module_choice),
    Rule(("network_args:preset", "LyCORIS_preset"), "lycoris.preset", "attn-only, attn-mlp, full copied", _module_choice),
    Rule(("network_args:factor", "factor"), "lycoris.factor", "copied", _module_choice),
    Rule(("network_args:decompose_both", "decompose_both"), "lycoris.decompose_both", "copied", _module_choice),
    Rule(("network_args:use_tucker", "network_args:use_cp", "use_tucker", "use_cp"), "lycoris.use_tucker", "copied", _module_choice),
    Rule(("network_args:rank_dropout", "rank_dropout"), "lycoris.rank_dropout", "copied (LyCORIS only)", _module_choice),
    Rule(("network_args:dropout",), "lycoris.dropout", "copied", _module_choice),
    Rule(("network_args:dora_wd", "dora_wd"), "lycoris.algo", "true with algo locon -> dora", _module_choice),
    # DreamBooth and Textual Inversion
    Rule(("stop_text_encoder_training",), "dreambooth.text_encoder_steps, dreambooth.train_text_encoder", "N -> N steps (the GUI's value is a percentage of the run); -1 -> the text encoder does not train", _stop_text_encoder, _export_dreambooth),
    to("train_text_encoder", "dreambooth.train_text_encoder", bool, "copied (fine_tune.py, sdxl_train.py)", only=("dreambooth",)),
    Rule(("token_string",), "textual_inversion.placeholder", "copied, lower-cased", _token_string, _export_ti),
    to("init_word", "textual_inversion.initializer", str, only=("textual_inversion",)),
    to("num_vectors_per_token", "textual_inversion.num_vectors", int, only=("textual_inversion",)),
    Rule(("use_object_template",), "textual_inversion.captions", "true -> object (neither template: dataset, the captions)", _template("object")),
    Rule(("use_style_template",), "textual_inversion.captions", "true -> style", _template("style")),
    # sampling
    Rule(("sample_prompts",), "sample.prompts, sample.negative_prompt, sample.width, sample.height, sample.steps, sample.guidance_scale, sample.seed",
         "the prompt file (.txt lines with --n --w --h --s --l --d, or .toml/.json; the GUI's text); a setting the prompts share, or kohya's default (512×512, 30 steps, scale 7.5); seeds when they count up from the first", _sample_prompts),
    Rule(("sample_every_n_steps",), "sample.every_steps", "copied", _every("sample.every_steps", "steps")),
    Rule(("sample_every_n_epochs",), "sample.every_steps", "epochs × optimizer steps per epoch", _every("sample.every_steps", "epochs")),
    Rule(("sample_sampler",), "(sdtrain samples with DDIM)", "ddim matches; any other sampler is not carried over", _sampler),
    # saving
    to("output_dir", "output.dir", str),
    to("output_name", "output.name", str, "copied (kohya's default is last)", default="last"),
    Rule(("save_every_n_steps",), "train.save_every_steps", "copied: a resumable checkpoint (the artifact is written at the end)", _every("train.save_every_steps", "steps"), _export_saving),
    Rule(("save_every_n_epochs",), "train.save_every_steps", "epochs × optimizer steps per epoch", _every("train.save_every_steps", "epochs")),
    Rule(("save_last_n_epochs", "save_last_n_steps", "save_last_n_epochs_state", "save_last_n_steps_state"), "train.keep_checkpoints", "the number of saves kept (steps ÷ save_every_n_steps)", _keep_last),
    Rule(("save_precision",), "output.save_dtype", "float -> fp32; fp16, bf16 copied", _precision("output.save_dtype")),
    Rule(("save_model_as",), "output.formats", "LoRA/LyCORIS safetensors -> kohya; DreamBooth safetensors/ckpt -> single_file, diffusers -> diffusers; TI safetensors -> a1111, pt -> a1111_pt", _save_model_as),
    to("training_comment", "output.comment", str),
    Rule(("logging_dir",), "output.tensorboard", "set -> true (sdtrain logs to {output.dir}/logs)", _logging),
    # not carried over
    dropped(MACHINE, "xformers", "sdpa", "mem_eff_attn", "diffusers_xformers", "lowram", "highvram", "full_fp16", "full_bf16", "fp8_base", "fp8_base_unet",
            "torch_compile", "dynamo_backend", "max_data_loader_n_workers", "persistent_data_loader_workers", "vae_batch_size", "text_encoder_batch_size",
            "blocks_to_swap", "cpu_offload_checkpointing", "fused_backward_pass", "fused_optimizer_groups", "ddp_timeout", "ddp_gradient_as_bucket_view",
            "ddp_static_graph", "deepspeed", "zero_stage", "offload_optimizer_device", "offload_optimizer_nvme_path", "offload_param_device",
            "offload_param_nvme_path", "zero3_init_flag", "zero3_save_16bit_model", "fp16_master_weights_and_gradients", "disable_mmap_load_safetensors",
            "skip_cache_check", "cache_info", "tokenizer_cache_dir", "num_cpu_threads_per_process", "num_processes", "num_machines", "multi_gpu", "gpu_ids",
            "main_process_port", "dynamo_mode", "dynamo_use_fullgraph", "dynamo_use_dynamic", "extra_accelerate_launch_args", "mixed_precision_te"),
    dropped(OUTSIDE, "log_with", "log_prefix", "log_tracker_name", "log_tracker_config", "wandb_run_name", "wandb_api_key", "use_wandb", "log_config",
            "huggingface_repo_id", "huggingface_repo_type", "huggingface_path_in_repo", "huggingface_token", "huggingface_repo_visibility", "async_upload",
            "save_state_to_huggingface", "output_config", "config_file", "debug_dataset", "no_metadata", "metadata_title", "metadata_author",
            "metadata_description", "metadata_license", "metadata_tags", "console_log_level", "console_log_file", "console_log_simple"),
    dropped(FROM_WEIGHTS, "resume", "resume_from_huggingface", "network_weights", "lora_network_weights", "dim_from_weights", "base_weights",
            "base_weights_multiplier", "weights", "initial_epoch", "initial_step", "skip_until_initial_step"),
    dropped("sdtrain's checkpoints are always resumable: nothing to switch on", "save_state", "save_state_on_train_end", "save_n_epoch_ratio"),
    dropped(NO_FEATURE, "color_aug", "random_crop", "face_crop_aug_range", "caption_suffix", "caption_dropout_every_n_epochs", "keep_tokens_separator",
            "secondary_separator", "enable_wildcard", "token_warmup_min", "token_warmup_step", "weighted_captions",
            "custom_attributes", "resize_interpolation", "network_multiplier", "in_json", "metadata_file", "dataset_repeats",
            "dataset_class", "validate_every_n_epochs", "max_validation_steps",
            "noise_offset_random_strength", "adaptive_noise_scale",
            "ip_noise_gamma_random_strength", "scale_v_pred_loss_like_noise_pred", "v_pred_like_loss", "perlin_noise", "weighting_scheme", "logit_mean", "logit_std",
            "mode_scale", "scale_weight_norms", "lr_scheduler_num_cycles", "lr_scheduler_power", "lr_scheduler_args", "lr_scheduler_type", "lr_decay_steps",
            "lr_scheduler_timescale", "lr_scheduler_min_lr_ratio", "optimizer_schedulefree_wrapper", "schedulefree_wrapper_args", "use_lion_optimizer",
            "network_train_text_encoder_only", "learning_rate_te2", "block_lr", "no_token_padding", "sample_at_first", "module_dropout",
            "network_args:module_dropout", "network_args:train_norm", "train_norm", "network_args:use_scalar", "use_scalar", "network_args:rank_dropout_scale",
            "rank_dropout_scale", "network_args:bypass_mode", "bypass_mode", "network_args:constrain", "constrain", "network_args:rescaled", "rescaled",
            "network_args:block_dims", "network_args:block_alphas", "network_args:conv_block_dims", "network_args:conv_block_alphas",
            "network_args:down_lr_weight", "network_args:mid_lr_weight", "network_args:up_lr_weight", "network_args:block_lr_zero_threshold",
            "network_args:loraplus_lr_ratio", "network_args:loraplus_unet_lr_ratio", "network_args:loraplus_text_encoder_lr_ratio",
            "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "conv_dims", "conv_alphas", "down_lr_weight", "mid_lr_weight",
            "up_lr_weight", "block_lr_zero_threshold", "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio", "unit",
            "optimizer_args:d_coef", "optimizer_args:decouple", "optimizer_args:use_bias_correction", "optimizer_args:safeguard_warmup",
            "optimizer_args:relative_step", "optimizer_args:scale_parameter", "optimizer_args:warmup_init", "optimizer_args:d0"),
    dropped(GUI_ONLY, "model_list", "noise_offset_type", "train_on_input", "save_as_bool", "save_every_n_steps_state", "caption_metadata_filename",
            "sample_prompts_file", "stop_text_encoder_training_pct", "output_folder_name", "train_dir"),
]
_RULE_OF = {name: rule for rule in RULES for name in rule.options}


# --- the import ----------------------------------------------------------------------------------

SUBSET_OWN_KEYS = ("image_dir", "num_repeats", "class_tokens", "is_reg", "caption_extension", "metadata_file")


def _explode_args(setup: KohyaSetup) -> None:
    """``network_args = ["algo=loha", ...]`` -> options ``network_args:algo`` ..., so each has its own rule."""
    for group in ("network_args", "optimizer_args"):
        items = setup.options.pop(group, None)
        if _is_empty(items):
            continue
        for item in items if isinstance(items, list) else str(items).split():
            arg, sep, value = str(item).partition("=")
            if not sep:
                raise UserError(f"{group} in '{setup.origins[group]}' has '{item}'; each entry is name=value (e.g. conv_dim=4). Fix it in that file.")
            setup.options[f"{group}:{arg.strip()}"] = value.strip()
            setup.origins[f"{group}:{arg.strip()}"] = setup.origins[group]


def _dataset_subsets(draft: Draft) -> None:
    """A dataset TOML's subsets become data.subsets; what sdtrain has once per run comes from the first
    training subset (subset > dataset > general > command line, sd-scripts' order)."""
    setup = draft.setup
    general = setup.dataset.get("general", {})
    merged = []
    for dataset in setup.dataset.get("datasets", []):
        level = {**general, **{key: value for key, value in dataset.items() if key != "subsets"}}
        merged += [{**level, **subset} for subset in dataset.get("subsets", [])]
    subsets = []
    for settings in merged:
        if "image_dir" not in settings:
            draft.dropped.append((f"subset with metadata_file = {settings.get('metadata_file')}", "kohya's fine-tuning metadata is not sdtrain's metadata.jsonl: caption the images with .txt files and list the folder"))
            continue
        folder = find_referenced(setup, "image_dir", str(settings["image_dir"]), want_dir=True)
        subset: dict[str, Any] = {"dir": str(folder), "repeats": draft.number("num_repeats", settings.get("num_repeats", 1), int)}
        if not _is_empty(settings.get("class_tokens")):
            subset["caption"] = str(settings["class_tokens"])
        if "caption_extension" in settings:
            subset["caption_extension"] = str(settings["caption_extension"])
        if draft.flag("is_reg", settings.get("is_reg", False)):
            subset["is_reg"] = True
        subsets.append((subset, settings))
    training = [settings for subset, settings in subsets if not subset.get("is_reg")]
    if not training:
        raise UserError(f"The dataset TOML '{setup.dataset_file}' has no subset of training images (each needs image_dir, and not is_reg = true). Fix that file.")
    first = training[0]
    for key, value in first.items():
        if key not in SUBSET_OWN_KEYS:
            setup.options[key] = value
            setup.origins[key] = setup.dataset_file
    for other in (settings for _, settings in subsets if settings is not first):
        for key, value in other.items():
            if key in SUBSET_OWN_KEYS or value == first.get(key):
                continue
            rule = _RULE_OF.get(key)
            what = f"{key} = {_shown(value)} (subset '{other['image_dir']}')"
            if rule is not None and not rule.carried:
                draft.dropped.append((what, rule.how))
            else:
                draft.dropped.append((what, f"sdtrain has one {key} per run: the first training subset's ({_shown(first.get(key))})"))
    draft.set("data.subsets", [subset for subset, _ in subsets], f"kohya dataset TOML '{setup.dataset_file}'")


def _start(draft: Draft, script: str | None) -> None:
    """The script, the method and the family: every later rule depends on them."""
    setup, options = draft.setup, draft.setup.options
    script = script or setup.script
    if script is None:
        if "token_string" in options:
            script = "train_textual_inversion.py"
        elif "network_module" in options or "LoRA_type" in options:
            script = "train_network.py"
        else:
            script = "train_db.py"
        if draft.setup.from_gui and draft.flag("sdxl", options.get("sdxl") or False):
            script = {"train_db.py": "sdxl_train.py"}.get(script, f"sdxl_{script}")
    if script not in SCRIPT_METHODS:
        raise UserError(
            f"The kohya setup is for '{script}', which sdtrain cannot import: it trains what "
            f"{', '.join(SCRIPT_METHODS)} train (SD1, SD2, SDXL). Use sdtrain's recipes for other models."
        )
    draft.script = script
    if script.startswith("sdxl_"):
        draft.family = "sdxl"
        draft.set("model.family", "sdxl", f"kohya script {script}")
    kind = SCRIPT_METHODS[script]
    if kind == "network":
        _network_method(draft)
    else:
        draft.method = kind
        draft.set("method", kind, f"kohya script {script}")
    if draft.method == "dreambooth":
        draft.set("dreambooth.prior_preservation", False, "kohya draws no class images: regularisation images are data subsets with is_reg")
        draft.set("dreambooth.train_text_encoder", script == "train_db.py", f"{script} trains the text encoder {'unless stop_text_encoder_training is -1' if script == 'train_db.py' else 'only with train_text_encoder'}")
    if draft.method == "textual_inversion":
        draft.set("textual_inversion.captions", "dataset", "kohya without use_object_template / use_style_template trains on the captions")
    _explode_args(setup)
    if setup.dataset is not None:
        _dataset_subsets(draft)


def _network_method(draft: Draft) -> None:
    options = draft.setup.options
    if "LoRA_type" in options and "network_module" not in options:
        kind = str(options["LoRA_type"])
        if kind not in GUI_LORA_TYPES:
            raise UserError(f"LoRA_type '{kind}' in {draft.origin('LoRA_type')} is not one sdtrain trains; it trains {', '.join(GUI_LORA_TYPES)}.")
        draft.method, algo = GUI_LORA_TYPES[kind]
        source = f"kohya_ss LoRA_type {kind}"
    else:
        module = str(options.get("network_module", "networks.lora"))
        if module not in ("networks.lora", "lycoris.kohya"):
            raise UserError(f"network_module '{module}' in {draft.origin('network_module')} is not one sdtrain trains; it trains networks.lora (method lora) and lycoris.kohya (method lycoris).")
        draft.method = "lora" if module == "networks.lora" else "lycoris"
        algo = None
        source = f"kohya network_module {module}"
        args = options.get("network_args") or []
        for item in args if isinstance(args, list) else str(args).split():
            name, _, value = str(item).partition("=")
            if name.strip() == "algo":
                algo = value.strip().lower()
                if algo not in LYCORIS_ALGOS:
                    raise UserError(f'network_args "algo={value}" in {draft.origin("network_args")} is not a LyCORIS algorithm sdtrain trains; it trains {", ".join(LYCORIS_ALGOS)}.')
                algo = LYCORIS_ALGOS[algo]
                source += f', network_args "algo={value}"'
        if draft.method == "lycoris" and algo is None:
            algo = "locon"
            source += " (LyCORIS' default algo lora = locon)"
    draft.set("method", draft.method, source)
    if draft.method == "lycoris":
        draft.set("lycoris.algo", algo, source)
        draft.set("lycoris.preset", "full", "LyCORIS' default preset")


def _apply_rules(draft: Draft) -> None:
    options = draft.setup.options
    for rule in RULES:
        present = [(name, options[name]) for name in rule.options if name in options]
        if not rule.carried:
            for name, value in present:
                draft.drop(name, value, rule.how)
            continue
        given = [(name, value) for name, value in present if not _is_empty(value)]
        if not given and rule.kohya_default is not None:
            draft.defaulting = True
            rule.apply(draft, rule.options[0], rule.kohya_default)
            draft.defaulting = False
        for name, value in present:
            before = (dict(draft.comments), len(draft.dropped), len(draft.unset), dict(draft.epochs), len(draft.used))
            if (name, value) in given:
                rule.apply(draft, name, value)
            if before == (draft.comments, len(draft.dropped), len(draft.unset), draft.epochs, len(draft.used)):
                draft.unset.append(name)  # empty, 0 = off, or superseded: it set nothing
    draft.unknown = [_display(name) for name in options if name not in _RULE_OF and name not in SUBSET_OWN_KEYS]


def _steps_per_epoch(draft: Draft) -> tuple[int, str]:
    """Optimizer steps per epoch on the imported data, bucketed as sdtrain (and kohya) bucket it."""
    from omegaconf import OmegaConf

    from trainer.data import TrainingData
    from trainer.families import FAMILIES
    from trainer.recipe import DataConfig

    data = _nested({key: value for key, value in draft.values.items() if key.startswith("data.")}).get("data", {})
    cfg: DataConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), data))
    if cfg.resolution is None:
        module, _, name = FAMILIES[draft.family or "sd1"].partition(":")
        cfg.resolution = getattr(importlib.import_module(module), name).default_resolution
    batch = draft.values.get("train.batch_size", 1)
    accumulation = draft.values.get("train.gradient_accumulation_steps", 1)
    batches = TrainingData(cfg, seed=0, batch_size=batch).batches_per_epoch
    steps = max(1, math.ceil(batches / accumulation))
    return steps, f"{batches} batches of {batch}" + (f" / {accumulation} accumulated" if accumulation > 1 else "") + f" = {steps} steps per epoch"


def _convert_epochs(draft: Draft) -> None:
    if not draft.epochs:
        return
    per_epoch, how = _steps_per_epoch(draft) if any(unit == "epochs" for _, unit, _ in draft.epochs.values()) else (0, "")
    for key in ("train.max_steps", *draft.epochs):
        if key not in draft.epochs:
            continue
        amount, unit, name = draft.epochs[key]
        if unit == "epochs":
            draft.set(key, int(amount) * per_epoch, f"kohya {name} {amount} × {how}")
        else:
            total = draft.values["train.max_steps"]
            steps = math.ceil(total * amount) if key == "dreambooth.text_encoder_steps" else round(total * amount)
            what = f"{amount * 100:g}% (the GUI's percentage)" if unit == "percent" else f"{amount:g}"
            draft.set(key, steps, f"kohya {name} {what} of {total} steps")


def _nested(values: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return tree


def _yaml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        # YAML 1.1 (PyYAML) reads 1e-05 as a string; 1.0e-05 is a float.
        return f"{mantissa if '.' in mantissa else mantissa + '.0'}e{exponent}" if e else text
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_value(item) for item in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)


def _recipe_lines(draft: Draft) -> list[str]:
    from omegaconf import OmegaConf

    from trainer.methods import METHODS
    from trainer.recipe import Recipe

    schema = OmegaConf.to_container(OmegaConf.structured(Recipe), throw_on_missing=False)
    tree = _nested(draft.values)
    lines: list[str] = []

    def line(indent: str, key: str, value: str, path: str) -> None:
        comment = draft.comments.get(path)
        lines.append(f"{indent}{key}: {value}" + (f"  # {comment}" if comment else ""))

    def walk(node: dict, shape: dict, indent: str, prefix: str) -> None:
        for key in shape:
            if key not in node:
                continue
            path = f"{prefix}{key}"
            value = node[key]
            if isinstance(value, dict):
                lines.append(f"{indent}{key}:")
                walk(value, shape[key], indent + "  ", f"{path}.")
            elif path == "data.subsets":
                comment = draft.comments.get(path)
                lines.append(f"{indent}{key}:" + (f"  # {comment}" if comment else ""))
                for subset in value:
                    entries = [f"{name}: {_yaml_value(item)}" for name, item in subset.items()]
                    lines.append(f"{indent}  - {entries[0]}")
                    lines.extend(f"{indent}    {entry}" for entry in entries[1:])
            else:
                line(indent, key, _yaml_value(value), path)

    # Of the method sections, only the recipe's own.
    sections = {key: shape for key, shape in schema.items() if key not in METHODS or key == draft.method}
    for key, shape in sections.items():
        if key in tree:
            if isinstance(shape, dict):
                lines.append(f"{key}:")
                walk(tree[key], shape, "  ", f"{key}.")
            else:
                line("", key, _yaml_value(tree[key]), key)
            lines.append("")
    return lines


def _header(draft: Draft, sources: list[Path], target: Path) -> list[str]:
    lines = [
        f"# Imported from kohya by `sdtrain import kohya {' '.join(str(path) for path in sources)}`",
        f"# (sd-scripts {draft.script} -> method {draft.method}).",
        f"#   sdtrain train {target}",
        "# Each key says which kohya option it came from; keys not written keep their defaults (docs/recipes.md).",
        "# docs/from-kohya.md lists every kohya option and where it goes.",
    ]
    if "model.base" not in draft.values:
        lines.append("# The kohya file names no base model: set model.base (the built-in tiny model is the default).")
    if draft.dropped or draft.unknown:
        lines += ["#", "# Not carried over:"]
        lines += [f"#   - {what}: {why}" for what, why in draft.dropped]
        if draft.unknown:
            lines.append(f"#   - unknown to sdtrain, so not carried over: {', '.join(draft.unknown)}")
    if draft.unset:
        lines += ["#", f"# Off or empty in the kohya file, nothing lost: {', '.join(dict.fromkeys(_display(name) for name in draft.unset))}."]
    return lines + [""]


def draft_recipe(paths: list[Path], script: str | None = None) -> Draft:
    """The recipe the kohya files describe, not yet written."""
    draft = Draft(read_kohya_files(paths))
    _start(draft, script)
    _apply_rules(draft)
    _convert_epochs(draft)
    return draft


def import_kohya(paths: list[Path], output: Path | None = None, *, overwrite: bool = False, script: str | None = None) -> Path:
    """Write the recipe of the kohya files to ``output`` (default ``<first file's stem>.yaml`` here), checked by load_recipe."""
    from trainer.atomic import refuse_to_replace, write_text
    from trainer.recipe import load_recipe

    target = output or Path(f"{paths[0].stem}.yaml")
    if not overwrite:
        refuse_to_replace([target], "Pass --overwrite to replace it, or -o with another file name.")
    draft = draft_recipe(paths, script)
    text = "\n".join(_header(draft, paths, target) + _recipe_lines(draft)).rstrip() + "\n"
    with tempfile.TemporaryDirectory() as scratch:
        check = Path(scratch) / target.name
        check.write_text(text, encoding="utf-8")
        try:
            load_recipe(check)
        except UserError as err:
            raise UserError(
                f"The recipe imported from {', '.join(map(str, paths))} would not load: {str(err).replace(str(check), str(target))} "
                "The kohya option behind each value is in docs/from-kohya.md; fix it in the kohya file."
            ) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    return write_text(target, text)


# --- the export ----------------------------------------------------------------------------------

# What a dataset TOML's [general] takes; the other exported options go on the command line.
DATASET_OPTIONS = ("resolution", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale", "flip_aug",
                   "shuffle_caption", "keep_tokens", "caption_separator", "caption_dropout_rate", "caption_tag_dropout_rate", "caption_extension", "caption_prefix")


def _export_script(recipe: Any) -> str:
    sdxl = recipe.model.family == "sdxl" or (recipe.model.family == "auto" and recipe.model.base == "tiny-sdxl")
    scripts = {"lora": "train_network.py", "lycoris": "train_network.py", "dreambooth": "train_db.py", "textual_inversion": "train_textual_inversion.py"}
    if recipe.method not in scripts:
        raise UserError(f"Method {recipe.method} has no sd-scripts counterpart to export to; sdtrain exports lora, lycoris, dreambooth and textual_inversion recipes.")
    script = scripts[recipe.method]
    return ({"train_db.py": "sdxl_train.py"}.get(script, f"sdxl_{script}")) if sdxl else script


def _export_subsets(recipe: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """The recipe's subsets (data.dir's folders and data.subsets, as training resolves them) as
    [[datasets.subsets]], and notes on what sd-scripts will do differently."""
    from trainer.data.sources import resolve_subsets

    if recipe.data.source == "datasets":
        raise UserError(f"The recipe's data cannot be exported: sd-scripts reads folders, not the Hugging Face dataset '{recipe.data.dataset}' (data.source: datasets). Write its images and captions to a folder and set data.dir to it first.")
    resolved, problems = resolve_subsets(recipe.data)
    fatal = [problem.text() for problem in problems if problem.fatal]
    if fatal:
        raise UserError("The recipe's data cannot be exported: " + " ".join(fatal))
    subsets, notes = [], []
    for subset in resolved:
        entry: dict[str, Any] = {"image_dir": str(subset.dir), "num_repeats": subset.repeats}
        if subset.fallback_caption:
            entry["class_tokens"] = subset.fallback_caption
        entry["caption_extension"] = subset.caption_extension
        if subset.is_reg:
            entry["is_reg"] = True
        if subset.metadata_file:
            notes.append(f"{subset.dir}: its captions in {subset.metadata_file.name} (sdtrain's metadata.jsonl) are not read by sd-scripts, which uses the caption files")
        subsets.append(entry)
    if recipe.method == "dreambooth" and recipe.dreambooth.prior_preservation:
        class_dir = recipe.dreambooth.class_dir or str(Path(recipe.output.dir) / "class_images")
        subsets.append({"image_dir": class_dir, "num_repeats": 1, "class_tokens": recipe.dreambooth.class_prompt, "is_reg": True})
        notes.append(f"{class_dir}: sd-scripts draws no class images; train once with sdtrain (or fill the folder) first")
    return subsets, notes


def export_options(recipe: Any) -> dict[str, Any]:
    """The sd-scripts options of a recipe, from every rule that knows its way back."""
    options: dict[str, Any] = {}
    for rule in RULES:
        if rule.export:
            options.update(rule.export(recipe))
    resolution = recipe.data.resolution
    if resolution is None:
        from trainer.families import FAMILIES

        module, _, name = FAMILIES["sdxl" if _export_script(recipe).startswith("sdxl_") else recipe.model.family if recipe.model.family != "auto" else "sd1"].partition(":")
        resolution = getattr(importlib.import_module(module), name).default_resolution
    options["resolution"] = resolution
    if recipe.data.trigger_word:
        options["caption_prefix"] = f"{recipe.data.trigger_word}{recipe.data.tag_separator} "
    return options


def export_kohya(recipe_path: Path, out_dir: Path, *, overwrite: bool = False) -> list[Path]:
    """Write ``dataset.toml``, ``prompts.txt`` (with sample prompts) and ``train.sh`` for sd-scripts into ``out_dir``."""
    from trainer.atomic import refuse_to_replace, write_text
    from trainer.formats.kohya_config import command_line, dataset_toml, prompt_line
    from trainer.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    # train.sh runs in the sd-scripts folder: the files it names must not be relative to this one.
    out_dir = out_dir.resolve()
    script = _export_script(recipe)
    options = export_options(recipe)
    subsets, notes = _export_subsets(recipe)
    files = {"dataset.toml": None, "train.sh": None}
    if recipe.sample.prompts:
        files["prompts.txt"] = None
    if not overwrite:
        refuse_to_replace([out_dir / name for name in files], "Pass --overwrite to replace them, or -o with another folder.")
    general = {name: options.pop(name) for name in DATASET_OPTIONS if name in options}
    # sdtrain's models attend with torch's scaled-dot-product attention; sd-scripts' default is its plain one.
    options["sdpa"] = True
    options["dataset_config"] = str(out_dir / "dataset.toml")
    sample = recipe.sample
    if sample.prompts:
        width, height = sample.width or recipe.data.resolution or "", sample.height or recipe.data.resolution or ""
        files["prompts.txt"] = "".join(
            prompt_line(prompt, {"negative_prompt": sample.negative_prompt, "width": width, "height": height, "sample_steps": sample.steps,
                                 "scale": sample.guidance_scale, "seed": sample.seed + index}) + "\n"
            for index, prompt in enumerate(sample.prompts)
        )
        options.update({"sample_prompts": str(out_dir / "prompts.txt"), "sample_sampler": "ddim"})
        if sample.every_steps:
            options["sample_every_n_steps"] = sample.every_steps
    header = [f"# sd-scripts command for the sdtrain recipe {recipe_path} (sdtrain export kohya); run it in the sd-scripts folder."]
    if recipe.model.base in ("tiny", "tiny-sdxl", "toy") or recipe.model.base.startswith("random:"):
        header.append(f"# model.base '{recipe.model.base}' is built into sdtrain: replace it with a model file or folder sd-scripts can load.")
    files["dataset.toml"] = "".join(f"# {note}\n" for note in notes) + dataset_toml(general, subsets)
    files["train.sh"] = "\n".join(header) + "\n" + command_line(script, options)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [write_text(out_dir / name, text) for name, text in files.items()]


def options_markdown() -> str:
    """docs/from-kohya.md's tables, from RULES."""
    mapped = ["| kohya option | recipe key | how |", "| --- | --- | --- |"]
    for rule in RULES:
        if rule.carried:
            names = ", ".join(f"`{_display(name)}`" for name in rule.options)
            mapped.append(f"| {names} | {', '.join(f'`{key.strip()}`' for key in rule.keys.split(',')) if not rule.keys.startswith('(') else rule.keys} | {rule.how} |")
    reasons: dict[str, list[str]] = {}
    for rule in RULES:
        if not rule.carried:
            reasons.setdefault(rule.how, []).extend(rule.options)
    dropped_rows = ["| kohya options | why not |", "| --- | --- |"]
    dropped_rows += [f"| {', '.join(f'`{_display(name)}`' for name in names)} | {why} |" for why, names in reasons.items()]
    return "\n".join(mapped) + "\n\n### Not carried over\n\n" + "\n".join(dropped_rows) + "\n"
