"""``sdtrain eval concept``: did training teach a concept ("sls frog", "vex triangle"), and what did it cost?

An artifact (a kohya-named LoRA or LyCORIS file, a full checkpoint as one file or a diffusers folder, a Textual
Inversion embedding, a hypernetwork, or a training output folder holding one) is put on the toy base. Base and trained model then draw the same N
pictures per prompt, picture i from seed ``seed + i``, and the judge reads them:

* concept fidelity: "a sls frog" judged an sls frog ("a vex triangle": a purple triangle), and the
  nearest-neighbour distance (judge embedding, 1 - cosine) of each picture to 200 held-out pictures of it;
* class preservation: "a frog" still judged a frog ("a triangle" a triangle);
* drift: the shape prompts still get their shape and colour right (and do not turn into the concept or
  its class).

Which concept a run taught is read from its recipe (the instance folder ``recipes/toy/<concept>``);
for a bare artifact it is said with ``concept=`` (default "sls frog").

Each rate has a 95 % Wilson interval (pictures from distinct seeds are independent draws), each change
a 95 % Newcombe interval, each mean distance a 95 % normal interval. The judge's own accuracy on real
and VAE-reconstructed pictures is printed beside the scores: no score is better than its judge.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from PIL import Image, ImageDraw
from safetensors import safe_open

from trainer.atomic import write_file, write_text
from trainer.errors import UserError
from trainer.formats import a1111_hypernetwork, kohya_lora, lycoris
from trainer.formats import textual_inversion as ti_format
from trainer.models.base_model import BaseModel
from trainer.models.loading import load_base_model
from trainer.toyworld import world
from trainer.toyworld.judge import Judge, JudgeAccuracy, accuracy_from_metadata, judge_pixels
from trainer.toyworld.pretrain import load_judge, toy_base_dir

HELD_OUT_COUNT = 200
Z95 = 1.959964
DRIFT_PROMPTS = ("a red circle", "a blue square", "a yellow triangle", "a purple star", "a green circle", "an orange square")


@dataclass(frozen=True)
class EvalSettings:
    samples_per_prompt: int = 40
    seed: int = 1000
    steps: int = 20
    guidance_scale: float = 3.0
    drift_prompts: tuple[str, ...] = DRIFT_PROMPTS


# --- statistics ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rate:
    hits: int
    count: int

    @property
    def value(self) -> float:
        return self.hits / self.count if self.count else float("nan")

    def interval(self) -> tuple[float, float]:
        """Wilson score interval, 95 %: sound at 0 and 1 and for small counts, unlike p +- 1.96 sd."""
        n, p = self.count, self.value
        centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
        half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
        return max(0.0, centre - half), min(1.0, centre + half)

    def text(self) -> str:
        low, high = self.interval()
        return f"{self.value:.2f} [{low:.2f}, {high:.2f}]"


def change_interval(after: Rate, before: Rate) -> tuple[float, float, float]:
    """after - before with Newcombe's 95 % interval (method 10, from the two Wilson intervals)."""
    (l1, u1), (l2, u2) = after.interval(), before.interval()
    p1, p2 = after.value, before.value
    difference = p1 - p2
    return difference, difference - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), difference + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def change_text(after: Rate, before: Rate) -> str:
    """"+0.80 [+0.68, +0.86]": the change and its Newcombe interval, as the reports print it."""
    difference, low, high = change_interval(after, before)
    return f"{difference:+.2f} [{low:+.2f}, {high:+.2f}]"


@dataclass(frozen=True)
class Mean:
    values: tuple[float, ...]

    @property
    def value(self) -> float:
        return sum(self.values) / len(self.values)

    def interval(self) -> tuple[float, float]:
        n = len(self.values)
        spread = math.sqrt(sum((v - self.value) ** 2 for v in self.values) / max(1, n - 1))
        half = Z95 * spread / math.sqrt(n)
        return self.value - half, self.value + half

    def text(self) -> str:
        low, high = self.interval()
        return f"{self.value:.3f} [{low:.3f}, {high:.3f}]"


# --- artifacts -----------------------------------------------------------------------------------


def _safetensors_keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except Exception as err:  # safetensors raises several types for a file that is not one
        raise UserError(f"'{path}' is not a readable .safetensors file ({err}). Pass an artifact that sdtrain wrote.") from None


def apply_network(model: BaseModel, path: Path) -> None:
    """Merge a kohya-named LoRA or LyCORIS file into the model's weights, as the UIs apply it."""
    from safetensors.torch import load_file

    unmatched = lycoris.apply_to_model(load_file(path), model)
    if unmatched:
        raise UserError(
            f"The network '{path}' has {len(unmatched)} layers the toy base does not have (e.g. {unmatched[0]}): it was "
            "trained on another base model. Train it with model.base: toy (recipes/toy/)."
        )


def _artifact_names(recipe: dict) -> list[str]:
    """The file and folder names a run's artifact can have, in the order they are tried."""
    if recipe.get("method") == "textual_inversion":
        # Embeddings are named after the placeholder (the UIs take the prompt word from the file name).
        placeholder = recipe.get("textual_inversion", {}).get("placeholder", "")
        return [f"{placeholder}.safetensors", f"{placeholder}_diffusers/{ti_format.DIFFUSERS_FILE_NAME}", f"{placeholder}.pt"]
    name = recipe.get("output", {}).get("name", "model")
    # Hypernetworks: the safetensors twin first, so no pickle is read when there is a choice.
    return [f"{name}.safetensors", f"{name}_diffusers", f"{name}.pt"]


def _artifact_of_output_dir(directory: Path) -> Path:
    recipe_path = directory / "recipe.yaml"
    if not recipe_path.is_file():
        raise UserError(
            f"'{directory}' is neither a diffusers model folder (model_index.json) nor a training output folder "
            "(recipe.yaml). Pass the output.dir of a run, or the artifact file itself."
        )
    recipe = yaml.safe_load(recipe_path.read_text(encoding="utf-8"))
    base = recipe.get("model", {}).get("base")
    if base != "toy":
        raise UserError(
            f"The run in '{directory}' trained on model.base '{base}', not on 'toy'. `sdtrain eval concept` measures what "
            "a run taught the toy base; train with a recipe from recipes/toy/."
        )
    names = _artifact_names(recipe)
    for name in names:
        if (directory / name).exists():
            return directory / name
    raise UserError(f"The run in '{directory}' has no artifact ({', '.join(names)}) yet. Let it finish, or pass the artifact.")


def concept_prompt_for_word(word: str) -> str:
    """The concept's prompt ("a sls frog") as an embedding's word asks for it: "a sls_frog"."""
    return f"a {word}"


def concept_of_recipe(recipe_path: Path) -> world.Concept | None:
    """The toy concept a recipe (a toy recipe, or a run's recipe.yaml) trains on: the one whose
    ``recipes/toy/<name>`` folder its data.dir is; None for other data."""
    data_dir = (yaml.safe_load(Path(recipe_path).read_text(encoding="utf-8")) or {}).get("data", {}).get("dir") or ""
    return world.CONCEPTS.get(Path(str(data_dir)).name)


@dataclass
class TrainedModel:
    model: BaseModel
    description: str  # what kind of artifact it was, for the report
    # How this model is asked for the concept instead of the world's prompt: "a <placeholder>" for an embedding.
    concept_prompt: str | None = None


def apply_embedding(model: BaseModel, path: Path) -> str:
    """Add an embedding's word to the tokenizer and text encoder, as diffusers' ``load_textual_inversion`` does.

    The word is the one the file names (diffusers key, A1111 ``.pt`` name) or, as in AUTOMATIC1111 and
    ComfyUI, the file's name. Its vectors become the tokens ``word``, ``word_1``, ...; the sampling
    pipeline expands the word to all of them. Returns the word.
    """
    from trainer.methods.textual_inversion.method import placeholder_tokens

    embedding = ti_format.read_embedding(path)
    word = embedding.token or path.stem
    for te in model.text_encoders:
        vectors = embedding.for_encoder(te.spec.key, len(model.text_encoders), path)
        width = te.model.get_input_embeddings().weight.shape[1]
        if vectors.shape[1] != width:
            raise UserError(
                f"The embedding '{path}' has {vectors.shape[1]}-wide vectors, but the toy base's text encoder is {width} wide: "
                "it was trained on another base model. Train it with model.base: toy (recipes/toy/sls_frog_ti.yaml)."
            )
        tokens = placeholder_tokens(word, vectors.shape[0])
        if te.tokenizer.add_tokens(tokens) != len(tokens):
            raise UserError(f"The embedding's word '{word}' ('{path}') is a word the toy base already knows; rename the file to a made-up word.")
        # The new rows are overwritten below: no need for transformers to initialise them from the table's statistics.
        te.model.resize_token_embeddings(len(te.tokenizer), mean_resizing=False)
        table = te.model.get_input_embeddings().weight
        with torch.no_grad():
            table[te.tokenizer.convert_tokens_to_ids(tokens)] = vectors.to(table.dtype)
    return word


def _is_embedding(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return len(_safetensors_keys(path)) == 1
    # An A1111 embedding .pt holds "string_to_param"; a hypernetwork .pt holds context widths.
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a safe pickle: the hypernetwork reader says why, in a UserError
        return False
    return isinstance(content, dict) and "string_to_param" in content


def load_trained_model(target: Path, base_dir: Path) -> TrainedModel:
    """The toy base with ``target`` applied, what kind of artifact it was, and how it is asked for the concept."""
    from trainer.methods.hypernetwork.module import load_hypernetwork

    target = Path(target)
    if target.is_dir() and not (target / "model_index.json").is_file():
        target = _artifact_of_output_dir(target)
    if target.is_dir():
        return TrainedModel(load_base_model(str(target)), f"full model (diffusers folder {target})")
    if not target.is_file():
        raise UserError(f"'{target}' does not exist. Pass a training output folder or an artifact file.")
    if target.suffix not in (".safetensors", ".pt"):
        raise UserError(f"'{target}' is neither a .safetensors nor a .pt file; `sdtrain eval concept` reads the artifacts sdtrain writes.")
    if _is_embedding(target):
        model = load_base_model(str(base_dir))
        word = apply_embedding(model, target)
        prompt = concept_prompt_for_word(word)
        return TrainedModel(model, f"Textual Inversion embedding '{word}' ({target}), asked for as \"{prompt}\"", prompt)
    if a1111_hypernetwork.is_hypernetwork_file(target):
        model = load_base_model(str(base_dir))
        load_hypernetwork(model.unet, target, strength=1.0)
        return TrainedModel(model, f"hypernetwork at strength 1 ({target})")
    keys = _safetensors_keys(target)
    if any(key.startswith((kohya_lora.UNET_PREFIX, kohya_lora.TEXT_ENCODER_PREFIX, lycoris.GENERIC_PREFIX)) for key in keys):
        model = load_base_model(str(base_dir))
        apply_network(model, target)
        return TrainedModel(model, f"LoRA / LyCORIS (kohya-named file {target})")
    if any(key.startswith("model.diffusion_model.") for key in keys):
        # The file holds weights only; the toy base's folder says what architecture they fill.
        return TrainedModel(load_base_model(str(target), config=str(base_dir)), f"full model (single file {target})")
    raise UserError(
        f"'{target}' is none of a LoRA / LyCORIS file (lora_unet_* keys), a full checkpoint (model.diffusion_model.* keys), "
        "an embedding (one tensor) or a hypernetwork (an sdtrain safetensors twin); `sdtrain eval concept` cannot put it on the toy base."
    )


# --- sampling and judging ------------------------------------------------------------------------


@torch.no_grad()
def draw_samples(model: BaseModel, prompts: list[str], settings: EvalSettings, wording: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """``samples_per_prompt`` pictures per prompt in [-1, 1]; picture i of every prompt comes from seed + i.

    ``wording`` maps a prompt to the words this model is asked with instead (an embedding's placeholder);
    the pictures stay keyed by the prompt.
    """
    from trainer.sampling import sampling_pipeline

    pipe = sampling_pipeline(model, torch.device("cpu"))
    for part in model.parts().values():
        # Full models are saved in fp16; CPU sampling needs fp32 throughout.
        part.float().eval()
    samples = {}
    count = settings.samples_per_prompt
    for prompt in prompts:
        generators = [torch.Generator("cpu").manual_seed(settings.seed + i) for i in range(count)]
        images = pipe(
            [(wording or {}).get(prompt, prompt)] * count,
            height=world.RESOLUTION,
            width=world.RESOLUTION,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            generator=generators,
            output_type="pt",
        ).images
        samples[prompt] = images.float() * 2.0 - 1.0
    return samples


@dataclass
class ModelScores:
    concept: Rate
    concept_distance: Mean
    preservation: Rate
    drift_prompts: dict[str, Rate]
    drift: Rate  # every drift prompt's pictures pooled: shape and colour both right
    drift_leaks: Rate  # drift-prompt pictures the judge calls the concept, or its class where they asked for another kind


def score(judge: Judge, samples: dict[str, torch.Tensor], held_out: torch.Tensor, settings: EvalSettings, concept: world.Concept) -> ModelScores:
    asked = judge_pixels(judge, samples[concept.prompt])
    preservation = judge_pixels(judge, samples[concept.class_prompt])
    distances = 1.0 - (asked.embeddings @ held_out.T).max(dim=1).values
    per_prompt, leaked = {}, 0
    for prompt in settings.drift_prompts:
        verdicts = judge_pixels(judge, samples[prompt])
        colour, shape = _parse_shape_prompt(prompt)
        per_prompt[prompt] = Rate(sum(k == shape and c == colour for k, c in zip(verdicts.kinds, verdicts.colours)), len(verdicts.kinds))
        # Turned into the concept, or into its class where the prompt asks for another kind (a shape drawn as a frog).
        leaked += sum(concept.is_it(k, c) or (k in (concept.class_kind, concept.kind) and k != shape) for k, c in zip(verdicts.kinds, verdicts.colours))
    pooled = sum(r.count for r in per_prompt.values())
    return ModelScores(
        concept=Rate(sum(concept.is_it(k, c) for k, c in zip(asked.kinds, asked.colours)), len(asked.kinds)),
        concept_distance=Mean(tuple(distances.tolist())),
        preservation=Rate(preservation.kinds.count(concept.class_kind), len(preservation.kinds)),
        drift_prompts=per_prompt,
        drift=Rate(sum(r.hits for r in per_prompt.values()), pooled),
        drift_leaks=Rate(leaked, pooled),
    )


def _parse_shape_prompt(prompt: str) -> tuple[str, str]:
    words = prompt.split()
    if len(words) != 3 or words[1] not in world.COLOURS or words[2] not in world.SHAPES:
        raise UserError(f"Drift prompt '{prompt}' is not of the form 'a <colour> <shape>' with a colour of {list(world.COLOURS)} and a shape of {list(world.SHAPES)}.")
    return words[1], words[2]


def held_out_embeddings(judge: Judge, concept: world.Concept) -> tuple[torch.Tensor, Mean]:
    """Judge embeddings of the concept's held-out pictures, and their own leave-one-out nearest-neighbour
    distance (what a model that draws new ones as well as the world does would score)."""
    pixels = world.to_tensor([p.image for p in world.pictures(concept.held_out(), HELD_OUT_COUNT)])
    embeddings = judge_pixels(judge, pixels).embeddings
    similarity = embeddings @ embeddings.T
    similarity.fill_diagonal_(-1.0)
    return embeddings, Mean(tuple((1.0 - similarity.max(dim=1).values).tolist()))


# --- report --------------------------------------------------------------------------------------


@dataclass
class ConceptReport:
    artifact: str
    concept: world.Concept
    settings: EvalSettings
    base: ModelScores
    trained: ModelScores
    held_out_distance: Mean
    judge_real: JudgeAccuracy
    judge_reconstructed: JudgeAccuracy
    files: list[Path] = field(default_factory=list)

    def markdown(self) -> str:
        s, base, trained, concept = self.settings, self.base, self.trained, self.concept
        name = concept.prompt.split(" ", 1)[1]

        def row(measure: str, prompt: str, before: Rate, after: Rate) -> str:
            return f"| {measure} | {prompt} | {before.text()} | {after.text()} | {change_text(after, before)} |"

        lines = [
            "# Concept evaluation on the toy world",
            "",
            f"Artifact: {self.artifact}",
            "",
            f"{s.samples_per_prompt} pictures per prompt (seeds {s.seed}..{s.seed + s.samples_per_prompt - 1}), DDIM {s.steps} steps, "
            f"CFG {s.guidance_scale}. Rates with 95 % Wilson intervals; changes with 95 % Newcombe intervals.",
            "",
            "| measure | prompt | base | trained | change |",
            "|---|---|---|---|---|",
            row(f"concept fidelity (judged {name})", concept.prompt, base.concept, trained.concept),
            row(f"class preservation (judged {concept.class_kind})", concept.class_prompt, base.preservation, trained.preservation),
            row("drift: shape and colour right", "all drift prompts", base.drift, trained.drift),
            row(f"drift: turned into the concept or a {concept.class_kind}", "all drift prompts", base.drift_leaks, trained.drift_leaks),
            *(row("drift: shape and colour right", prompt, base.drift_prompts[prompt], trained.drift_prompts[prompt]) for prompt in s.drift_prompts),
            "",
            f"Nearest-neighbour distance of \"{concept.prompt}\" pictures to {HELD_OUT_COUNT} held-out pictures of the concept "
            "(judge embedding, 1 - cosine; lower is closer, 95 % interval of the mean):",
            "",
            f"- base: {base.concept_distance.text()}",
            f"- trained: {trained.concept_distance.text()}",
            f"- held-out pictures to each other (the floor): {self.held_out_distance.text()}",
            "",
            "Judge accuracy on test pictures of the world (incl. sls frogs and decoy frogs):",
            "",
            f"- real: {self.judge_real.line()}",
            f"- VAE-reconstructed: {self.judge_reconstructed.line()}",
            "",
        ]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        def model(scores: ModelScores) -> dict:
            return {
                "concept": scores.concept.value,
                "concept_distance": scores.concept_distance.value,
                "preservation": scores.preservation.value,
                "drift": scores.drift.value,
                "drift_leaks": scores.drift_leaks.value,
                "drift_prompts": {p: r.value for p, r in scores.drift_prompts.items()},
                "count": scores.concept.count,
            }

        return {"artifact": self.artifact, "concept": self.concept.name, "base": model(self.base), "trained": model(self.trained), "held_out_distance": self.held_out_distance.value}


def image_grid(rows: list[tuple[str, torch.Tensor]], columns: int = 10, scale: int = 2) -> Image.Image:
    """One labelled row of pictures per (label, pixels), pictures upscaled without smoothing."""
    cell, label_width = world.RESOLUTION * scale, 210
    grid = Image.new("RGB", (label_width + columns * cell, len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, pixels) in enumerate(rows):
        draw.text((4, r * cell + cell // 2 - 6), label, fill=(0, 0, 0))
        array = ((pixels[:columns].clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        for c, picture in enumerate(array):
            grid.paste(Image.fromarray(picture).resize((cell, cell), Image.Resampling.NEAREST), (label_width + c * cell, r * cell))
    return grid


def evaluation_prompts(settings: EvalSettings, concepts: list[world.Concept]) -> list[str]:
    prompts = [prompt for concept in concepts for prompt in (concept.prompt, concept.class_prompt)]
    return list(dict.fromkeys([*prompts, *settings.drift_prompts]))


def draw_base_samples(settings: EvalSettings, base_dir: Path | None = None, concepts: list[world.Concept] | None = None) -> dict[str, torch.Tensor]:
    """The toy base's pictures for every evaluation prompt of ``concepts`` (default: all); the same for every
    artifact evaluated with ``settings``."""
    prompts = evaluation_prompts(settings, concepts or list(world.CONCEPTS.values()))
    return draw_samples(load_base_model(str(base_dir or toy_base_dir())), prompts, settings)


def evaluate_concept(
    target: Path | str,
    output_dir: Path | str | None = None,
    settings: EvalSettings = EvalSettings(),
    base_dir: Path | None = None,
    base_samples: dict[str, torch.Tensor] | None = None,
    concept: world.Concept | None = None,
) -> ConceptReport:
    """Measure what the artifact (or training output folder) ``target`` taught the toy base.

    ``concept``: which concept it was taught; default: the one the run's recipe trained on, else "sls frog".

    The base is asked the world's prompts; a Textual Inversion is asked for the concept by its own
    word ("a sls_frog"), which the base does not know. ``base_samples`` (from :func:`draw_base_samples`
    with the same settings) saves drawing the base's pictures again when several artifacts are evaluated.
    Writes ``report.md``, ``scores.json`` and ``grid.png`` to ``output_dir`` (default:
    ``<target folder>/concept_eval``) and returns the report.
    """
    target = Path(target)
    base_dir = Path(base_dir) if base_dir else toy_base_dir()
    run_recipe = target / "recipe.yaml"
    concept = concept or (concept_of_recipe(run_recipe) if run_recipe.is_file() else None) or world.SLS_FROG_CONCEPT
    trained = load_trained_model(target, base_dir)
    judge, metadata = load_judge()
    judge_real, judge_reconstructed = accuracy_from_metadata(metadata)
    held_out, held_out_distance = held_out_embeddings(judge, concept)
    prompts = evaluation_prompts(settings, [concept])
    if base_samples is None:
        base_samples = draw_base_samples(settings, base_dir, [concept])
    trained_samples = draw_samples(trained.model, prompts, settings, wording={concept.prompt: trained.concept_prompt or concept.prompt})
    report = ConceptReport(
        artifact=trained.description,
        concept=concept,
        settings=settings,
        base=score(judge, base_samples, held_out, settings, concept),
        trained=score(judge, trained_samples, held_out, settings, concept),
        held_out_distance=held_out_distance,
        judge_real=judge_real,
        judge_reconstructed=judge_reconstructed,
    )
    directory = Path(output_dir) if output_dir else (target if target.is_dir() else target.parent) / "concept_eval"
    grid = image_grid([row for prompt in prompts for row in ((f"base: {prompt}", base_samples[prompt]), (f"trained: {prompt}", trained_samples[prompt]))])
    report.files = [
        write_text(directory / "report.md", report.markdown()),
        write_text(directory / "scores.json", json.dumps(report.as_dict(), indent=2) + "\n"),
        write_file(directory / "grid.png", lambda tmp: grid.save(tmp, format="PNG")),
    ]
    return report
