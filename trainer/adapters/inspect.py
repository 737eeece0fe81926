"""``sdtrain lora inspect``: what an adapter file holds, for which model, and what is wrong with it.

Reported: the format (kohya LoRA, LoCon, LoHa, LoKr, DoRA, (IA)^3, full), the model family, the modules
per part with their ranks and alphas, the dtypes, the training metadata (kohya's ``ss_*``, ModelSpec,
the trigger words from ``ss_tag_frequency``), whether ``sshs_model_hash`` matches the tensors, and
problems: modules that change nothing (an all-zero ``lora_up``), NaN/Inf values, keys no UI loads,
and what each UI cannot apply (trainer/formats/lycoris.py).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trainer.adapters.files import Module, guess_family, is_peft_layout, part_of, read_adapter, read_tensors
from trainer.adapters.lowrank import has_kernel, weight_shape
from trainer.formats import lycoris
from trainer.formats.safetensors_file import data_section

ALGO_NAMES = {lycoris.LOCON: "LoRA", lycoris.LOHA: "LoHa", lycoris.LOKR: "LoKr", lycoris.IA3: "(IA)^3", lycoris.FULL: "full"}
SHOWN_METADATA = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version", "ss_sd_model_name", "ss_output_name", "ss_steps", "ss_training_comment")


def module_kind(module: Module) -> str:
    """'LoRA', 'LoCon' (a LoRA with a 3x3 kernel or Tucker core), 'LoHa', 'LoKr', '(IA)^3', 'full', with ' + DoRA' when it carries a magnitude."""
    algo = lycoris.algo_of(module)
    if algo is None:
        return "unknown"
    kind = ALGO_NAMES[algo]
    if algo == lycoris.LOCON and has_kernel(weight_shape(module)):
        kind = "LoCon"
    return f"{kind} + DoRA" if "dora_scale" in module else kind


def file_format(kinds: set[str]) -> str:
    """The file's format as users name it: LoCon when any module is a LoCon, DoRA when any carries a magnitude."""
    if any("DoRA" in k for k in kinds):
        return "DoRA"
    if kinds <= {"LoRA", "LoCon"}:
        return "LoCon" if "LoCon" in kinds else "LoRA"
    return " + ".join(sorted(kinds))


@dataclass
class PartSummary:
    modules: int
    ranks: dict[str, int]  # rank -> number of modules ("-" for modules without a rank)
    alphas: list[float]


@dataclass
class Inspection:
    file: str
    format: str
    family: str
    parts: dict[str, PartSummary]
    dtypes: list[str]
    metadata: dict[str, str]
    trigger_words: list[str]
    hash_check: str  # "matches", "differs (stored …, computed …)", "not stored"
    problems: list[str] = field(default_factory=list)
    ui_notes: list[str] = field(default_factory=list)

    def json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def text(self) -> str:
        lines = [f"{self.file}", f"  format: {self.format}", f"  family: {self.family}", f"  dtype: {', '.join(self.dtypes)}"]
        for part, summary in self.parts.items():
            ranks = ", ".join(f"{rank} x{count}" for rank, count in summary.ranks.items())
            alphas = ", ".join(f"{a:g}" for a in summary.alphas) or "-"
            lines.append(f"  {part}: {summary.modules} modules; rank {ranks}; alpha {alphas}")
        lines += [f"  {key}: {value}" for key, value in self.metadata.items()]
        if self.trigger_words:
            lines.append(f"  trigger words (most frequent tags): {', '.join(self.trigger_words)}")
        lines.append(f"  sshs_model_hash: {self.hash_check}")
        lines += [f"  problem: {p}" for p in self.problems] or ["  problems: none found"]
        lines += [f"  note: {n}" for n in self.ui_notes]
        return "\n".join(lines)


def _hash_check(path: Path, metadata: dict[str, str]) -> str:
    stored = metadata.get("sshs_model_hash")
    if not stored:
        return "not stored"
    computed = hashlib.sha256(data_section(path.read_bytes())).hexdigest()
    return "matches" if computed == stored else f"differs: stored {stored[:12]}…, computed {computed[:12]}… (the tensors changed after the hash was written)"


def _trigger_words(metadata: dict[str, str], count: int = 8) -> list[str]:
    try:
        frequency = json.loads(metadata.get("ss_tag_frequency", "{}"))
    except ValueError:
        return []
    tags: Counter = Counter()
    for folder in frequency.values() if isinstance(frequency, dict) else []:
        if isinstance(folder, dict):
            tags.update({str(tag).strip(): int(n) for tag, n in folder.items() if isinstance(n, (int, float))})
    return [tag for tag, _ in tags.most_common(count)]


def _problems(modules: dict[str, Module]) -> list[str]:
    problems = []
    zero_up = [n for n, m in modules.items() if "lora_up.weight" in m and not m["lora_up.weight"].any()]
    if zero_up:
        problems.append(f"{len(zero_up)} modules have an all-zero lora_up and change nothing (untrained?), e.g. '{zero_up[0]}'")
    bad = [f"{n}.{s}" for n, m in modules.items() for s, t in m.items() if t.is_floating_point() and not t.isfinite().all()]
    if bad:
        problems.append(f"{len(bad)} tensors hold NaN or Inf; every UI produces a black or noise image with this file, e.g. '{bad[0]}'")
    unknown_part = [n for n in modules if part_of(n) is None]
    if unknown_part:
        problems.append(f"{len(unknown_part)} modules have names no UI loads (not lora_unet_/lora_te_/lora_te1_/lora_te2_), e.g. '{unknown_part[0]}'")
    unknown_algo = [n for n, m in modules.items() if lycoris.algo_of(m) is None]
    if unknown_algo:
        problems.append(f"{len(unknown_algo)} modules hold tensors of no algorithm AUTOMATIC1111 or ComfyUI apply, e.g. '{unknown_algo[0]}': {sorted(modules[unknown_algo[0]])}")
    missing_up = [n for n, m in modules.items() if ("lora_down.weight" in m) != ("lora_up.weight" in m)]
    if missing_up:
        problems.append(f"{len(missing_up)} modules have lora_down without lora_up or the reverse (a truncated file?), e.g. '{missing_up[0]}'")
    te_without_text_model = [n for n in modules if part_of(n) in ("TE", "TE1", "TE2") and "_text_model_" not in n]
    if te_without_text_model:
        problems.append(f"{len(te_without_text_model)} text-encoder modules lack 'text_model' in their names; AUTOMATIC1111 and ComfyUI ignore them, e.g. '{te_without_text_model[0]}'")
    return problems


# The parts of a diffusers/peft file, by the pipeline component its keys start with.
PEFT_PARTS = {"unet": "UNet", "text_encoder": "TE", "text_encoder_2": "TE2"}


def _inspect_peft(path: Path, tensors: dict, metadata: dict[str, str]) -> Inspection:
    """A diffusers/peft LoRA: ranks from ``lora_A`` per part (alphas live in the adapter's config, not the file)."""
    ranks: dict[str, Counter] = {}
    for key, tensor in tensors.items():
        if ".lora_A." in key:
            part = PEFT_PARTS.get(key.split(".")[0], "other")
            ranks.setdefault(part, Counter())[str(tensor.shape[0])] += 1
    if "TE2" in ranks:
        ranks["TE1"] = ranks.pop("TE", Counter())
    zero_b = [key for key, tensor in tensors.items() if ".lora_B." in key and not tensor.any()]
    bad = [key for key, tensor in tensors.items() if tensor.is_floating_point() and not tensor.isfinite().all()]
    problems = [f"{len(zero_b)} modules have an all-zero lora_B and change nothing (untrained?), e.g. '{zero_b[0]}'"] if zero_b else []
    problems += [f"{len(bad)} tensors hold NaN or Inf, e.g. '{bad[0]}'"] if bad else []
    return Inspection(
        file=str(path), format="LoRA (diffusers/peft layout)", family="SDXL" if "TE2" in ranks else guess_family({}, metadata),
        parts={part: PartSummary(sum(c.values()), dict(c), []) for part, c in ranks.items()},
        dtypes=sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}), metadata={k: v for k, v in metadata.items() if k.startswith("modelspec.")},
        trigger_words=_trigger_words(metadata), hash_check=_hash_check(Path(path), metadata), problems=problems,
        ui_notes=["AUTOMATIC1111 and ComfyUI load kohya-named files; this layout is diffusers' load_lora_weights."],
    )


def inspect_adapter(path: Path) -> Inspection:
    tensors, metadata = read_tensors(path, "Adapter")
    if is_peft_layout(tensors):
        return _inspect_peft(path, tensors, metadata)
    adapter = read_adapter(path, "Adapter")
    modules = adapter.modules
    parts: dict[str, list[Module]] = {}
    for name, module in modules.items():
        parts.setdefault(part_of(name) or "other", []).append(module)
    summaries = {}
    for part, members in parts.items():
        ranks = Counter(str(lycoris.rank_of(m)) if lycoris.rank_of(m) is not None else "-" for m in members)
        alphas = sorted({float(m["alpha"]) for m in members if "alpha" in m})
        summaries[part] = PartSummary(len(members), dict(sorted(ranks.items(), key=lambda item: (not item[0].isdigit(), int(item[0]) if item[0].isdigit() else 0))), alphas)
    kinds = {module_kind(m) for m in modules.values() if lycoris.algo_of(m) is not None}
    metadata = {key: adapter.metadata[key] for key in SHOWN_METADATA if key in adapter.metadata}
    metadata.update({key: value for key, value in adapter.metadata.items() if key.startswith("modelspec.")})
    return Inspection(
        file=str(path),
        format=file_format(kinds) if kinds else "unknown",
        family=guess_family(modules, adapter.metadata),
        parts=summaries,
        dtypes=sorted({str(t.dtype).removeprefix("torch.") for key, t in adapter.tensors.items() if not key.endswith((".alpha", ".on_input"))}),
        metadata=metadata,
        trigger_words=_trigger_words(adapter.metadata),
        hash_check=_hash_check(Path(path), adapter.metadata),
        problems=_problems(modules),
        ui_notes=lycoris.compatibility_warnings(adapter.tensors) if all(lycoris.algo_of(m) for m in modules.values()) else [],
    )
