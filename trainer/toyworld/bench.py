"""``sdtrain toyworld bench``: every toy recipe trained and evaluated, in one table per concept.

Each recipe in ``recipes/toy/`` (named ``<concept>_<method>.yaml``, its data in ``recipes/toy/<concept>``)
is trained as it is and, where prior preservation applies, both with and without it: DreamBooth through
its own ``dreambooth.prior_preservation`` key, LoRA, LyCORIS and the hypernetwork through a
regularisation subset (``data.subsets``, ``is_reg: true``) of the same class pictures, captioned with the
concept's class prompt ("a frog", "a triangle"). The class pictures are drawn once per concept, by the
toy base, before any run, so every prior-preservation run trains on the same ones and no run's time
includes drawing them. Every run is repeated for each training seed (``train.seed``); every artifact is
measured by ``evaluate_concept`` with the same settings (the base's pictures are drawn once and shared).
A row pools its seeds' pictures (the interval then covers picture sampling; the spread of the per-seed
rates, min..max, shows the training seed's share).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from trainer.atomic import write_text
from trainer.errors import UserError
from trainer.examples import example_path
from trainer.recipe import Recipe, load_recipe
from trainer.toyworld import world
from trainer.toyworld.evaluate import (
    ConceptReport, EvalSettings, Mean, ModelScores, Rate, change_text, concept_of_recipe, draw_base_samples, evaluate_concept,
)

TOY_RECIPES = example_path("recipes", "toy")
# Three training seeds per row: the spread they give is part of the answer.
SEEDS = (42, 43, 44)
# Methods that take prior preservation as a regularisation subset of the data. Not Textual Inversion: its
# captions are prompt templates with the placeholder, which would turn "a frog" into "a sls_frog".
PRIOR_BY_REG_SUBSET = ("lora", "lycoris", "hypernetwork")


@dataclass(frozen=True)
class BenchRun:
    name: str  # the table's row label (the same for every seed)
    concept: world.Concept
    recipe: Path
    overrides: tuple[str, ...]
    prior: bool | None  # trained with the class pictures; None where prior preservation does not apply
    seed: int


@dataclass
class BenchResult:
    run: BenchRun
    method: str
    steps: int
    train_seconds: float
    eval_seconds: float
    report: ConceptReport


def _concept(path: Path) -> world.Concept:
    concept = concept_of_recipe(path)
    if concept is None:
        raise UserError(f"The toy recipe '{path}' trains on a data.dir that is none of {', '.join(f'recipes/toy/{name}' for name in world.CONCEPTS)}.")
    return concept


def _load(path: Path, overrides: list[str] | tuple[str, ...]) -> Recipe:
    # The recipes name their data relative to the repository root; the bench runs from anywhere.
    return load_recipe(path, [f"data.dir={TOY_RECIPES / _concept(path).name}", *overrides])


def _class_dir(output_root: Path, concept: world.Concept) -> Path:
    return output_root / "class_images" / concept.name


def bench_runs(
    output_root: Path,
    methods: list[str] | None = None,
    overrides: tuple[str, ...] = (),
    seeds: tuple[int, ...] = SEEDS,
    concepts: list[str] | None = None,
    priors: tuple[bool, ...] = (True, False),
) -> list[BenchRun]:
    """The runs of every toy recipe whose method is in ``methods`` and concept in ``concepts`` (default: all),
    with (True in ``priors``) and without (False) prior preservation where it applies, once per seed, each
    with ``overrides`` (key=value). A method or concept no toy recipe has is refused."""
    recipes = [(path, _load(path, []).method, _concept(path)) for path in sorted(TOY_RECIPES.glob("*.yaml"))]
    for name in concepts or []:
        world.concept_named(name)
    known = {method for _, method, _ in recipes}
    unknown = sorted(set(methods or []) - known)
    if unknown:
        raise UserError(
            f"No toy recipe in '{TOY_RECIPES}' uses the method(s) {', '.join(unknown)}; they are: {', '.join(sorted(known))}. "
            "(Recipe overrides such as train.lr=1e-3 go before --methods, or after `--`.)"
        )
    runs = []
    for path, method, concept in recipes:
        if (methods is not None and method not in methods) or (concepts is not None and concept.name not in concepts):
            continue
        class_dir = _class_dir(output_root, concept)
        # prior -> the overrides that switch it on or off
        if method == "dreambooth":
            variants = {True: (f"dreambooth.class_dir={class_dir}", "dreambooth.prior_preservation=true"), False: ("dreambooth.prior_preservation=false",)}
        elif method in PRIOR_BY_REG_SUBSET:
            variants = {False: (), True: (f"data.subsets=[{{dir: '{class_dir}', caption: '{concept.class_prompt}', is_reg: true}}]",)}
        else:
            variants = {None: ()}
        for prior, variant in variants.items():
            if prior is not None and prior not in priors:
                continue
            label, folder = {True: (" + prior", "_prior"), False: (" (no prior)", "_no_prior"), None: ("", "")}[prior]
            for seed in seeds:
                output_dir = output_root / f"{path.stem}{folder}" / f"seed{seed}"
                settings = (*overrides, *variant, f"train.seed={seed}", f"output.dir={output_dir}", "output.tensorboard=false")
                runs.append(BenchRun(f"{path.stem}{label}", concept, path, settings, prior, seed))
    return runs


def draw_class_images(output_root: Path, concept: world.Concept) -> None:
    """The toy base's class pictures, drawn as the concept's DreamBooth recipe draws them, into ``output_root/class_images/<concept>``."""
    import torch

    from trainer.methods.dreambooth.class_images import ensure_class_images
    from trainer.methods.dreambooth.method import DreamBoothMethod
    from trainer.models.loading import load_base_model

    recipe = _load(TOY_RECIPES / f"{concept.name}_dreambooth.yaml", [f"dreambooth.class_dir={_class_dir(output_root, concept)}"])
    model = load_base_model(recipe.model.base)
    ensure_class_images(model, DreamBoothMethod(recipe, model).class_image_request(), torch.device("cpu"))


def _pooled(rates: list[Rate]) -> Rate:
    return Rate(sum(r.hits for r in rates), sum(r.count for r in rates))


def _spread(rates: list[Rate]) -> str:
    values = [r.value for r in rates]
    return f"{min(values):.2f}..{max(values):.2f}" if len(values) > 1 else ""


def _cells(scores: list[ModelScores], base: ModelScores | None) -> list[str]:
    """A row's measures, its seeds' scores pooled; changes against ``base`` (none for the base's own row)."""
    concept, preservation, drift = (_pooled([getattr(s, key) for s in scores]) for key in ("concept", "preservation", "drift"))
    return [
        concept.text(), _spread([s.concept for s in scores]), change_text(concept, base.concept) if base else "",
        Mean(tuple(d for s in scores for d in s.concept_distance.values)).text(),
        preservation.text(), change_text(preservation, base.preservation) if base else "",
        drift.text(), change_text(drift, base.drift) if base else "",
        _pooled([s.drift_leaks for s in scores]).text(),
    ]


def markdown_table(results: list[BenchResult]) -> str:
    """Per concept: one row for the base and one per run (its seeds pooled), with 95 % intervals and mean wall times."""
    tables = []
    for concept in dict.fromkeys(result.run.concept for result in results):
        rows_of = {}
        for result in results:
            if result.run.concept == concept:
                rows_of.setdefault(result.run.name, []).append(result)
        name = concept.prompt.split(" ", 1)[1]
        header = [
            f"| run | method | steps | seeds | train s | eval s | \"{concept.prompt}\" -> {name} | seeds' spread | change | NN distance "
            f"| \"{concept.class_prompt}\" -> {concept.class_kind} | change | shapes right (pooled) | change | shapes -> {name} or {concept.class_kind} |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        base = next(iter(rows_of.values()))[0].report.base
        rows = ["| " + " | ".join(["base", "", "", "", "", "", *_cells([base], None)]) + " |"]
        for label, group in rows_of.items():
            first = group[0]
            timing = [first.method, str(first.steps), str(len(group)),
                      f"{sum(r.train_seconds for r in group) / len(group):.0f}", f"{sum(r.eval_seconds for r in group) / len(group):.0f}"]
            rows.append("| " + " | ".join([label, *timing, *_cells([r.report.trained for r in group], base)]) + " |")
        tables.append("\n".join([f"### {concept.prompt}", "", *header, *rows]))
    return "\n\n".join(tables)


def toyworld_bench(
    output_root: Path,
    settings: EvalSettings = EvalSettings(),
    methods: list[str] | None = None,
    log: Callable[[str], None] = print,
    overrides: tuple[str, ...] = (),
    seeds: tuple[int, ...] = SEEDS,
    concepts: list[str] | None = None,
    priors: tuple[bool, ...] = (True, False),
) -> str:
    """Train and evaluate every toy recipe (± prior preservation where it applies, once per seed); return the tables.

    ``settings`` of every evaluation (pictures per prompt, sampling steps, drift prompts); ``methods``
    and ``concepts`` limit the runs, ``priors`` to those with (True) or without (False) prior preservation; ``overrides`` (recipe key=value) apply to every run, e.g.
    ``train.max_steps=2`` for a quick check or ``train.lr=1e-3`` to try a setting. The tables are also written to
    ``output_root/bench.md``; each run's report to ``<run>/concept_eval``.
    """
    from trainer.loop import train

    output_root = Path(output_root)
    runs = bench_runs(output_root, methods, tuple(overrides), seeds, concepts, priors)
    used = list(dict.fromkeys(run.concept for run in runs))
    for concept in dict.fromkeys(run.concept for run in runs if run.prior):
        started = time.perf_counter()
        draw_class_images(output_root, concept)
        log(f"class images of \"{concept.class_prompt}\" ready in {time.perf_counter() - started:.0f} s")
    base_samples = draw_base_samples(settings, concepts=used)
    results = []
    for run in runs:
        log(f"training {run.name}, seed {run.seed}")
        recipe = _load(run.recipe, run.overrides)
        started = time.perf_counter()
        # A bench run again into the same --out replaces its runs; the earlier ones are moved aside, not deleted.
        train(recipe, show_progress=False, overwrite=True)
        trained = time.perf_counter()
        report = evaluate_concept(recipe.output.dir, settings=settings, base_samples=base_samples, concept=run.concept)
        results.append(BenchResult(run, recipe.method, recipe.train.max_steps, trained - started, time.perf_counter() - trained, report))
        log(f"{run.name}, seed {run.seed}: {run.concept.prompt} {report.trained.concept.text()}, "
            f"{run.concept.class_prompt} {report.trained.preservation.text()}, shapes {report.trained.drift.text()}")
    table = markdown_table(results)
    write_text(output_root / "bench.md", table + "\n")
    return table
