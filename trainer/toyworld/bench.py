"""``sdtrain toyworld bench``: every toy recipe trained and evaluated, in one table.

Each recipe in ``recipes/toy/`` is trained as it is and, where prior preservation applies, both with and
without it: DreamBooth through its own ``dreambooth.prior_preservation`` key, LoRA and LyCORIS through a
regularisation subset (``data.subsets``, ``is_reg: true``) of the same class pictures, captioned "a frog".
The class pictures are drawn once, by the toy base, before any run, so every prior-preservation run
trains on the same ones and no run's time includes drawing them. Every artifact is then measured by
``evaluate_concept`` with the same settings (the base's pictures are drawn once and shared).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from trainer.atomic import write_text
from trainer.examples import example_path
from trainer.recipe import Recipe, load_recipe
from trainer.toyworld import world
from trainer.toyworld.evaluate import ConceptReport, EvalSettings, ModelScores, change_interval, draw_base_samples, evaluate_concept

TOY_RECIPES = example_path("recipes", "toy")
INSTANCE_DIR = TOY_RECIPES / "sls_frog"
DREAMBOOTH_RECIPE = TOY_RECIPES / "sls_frog_dreambooth.yaml"
# Methods that take prior preservation as a regularisation subset of the data. Not Textual Inversion: its
# captions are prompt templates with the placeholder, which would turn "a frog" into "a sls_frog".
PRIOR_BY_REG_SUBSET = ("lora", "lycoris")


@dataclass(frozen=True)
class BenchRun:
    name: str  # the table's row label
    recipe: Path
    overrides: tuple[str, ...]
    prior: bool | None  # trained with the class pictures; None where prior preservation does not apply


@dataclass
class BenchResult:
    run: BenchRun
    method: str
    steps: int
    train_seconds: float
    eval_seconds: float
    report: ConceptReport


def _load(path: Path, overrides: list[str] | tuple[str, ...]) -> Recipe:
    # The recipes name their data relative to the repository root; the bench runs from anywhere.
    return load_recipe(path, [f"data.dir={INSTANCE_DIR}", *overrides])


def bench_runs(output_root: Path, methods: list[str] | None = None, train_steps: int | None = None) -> list[BenchRun]:
    """The runs of every toy recipe whose method is in ``methods`` (default: all), with and without prior preservation where it applies."""
    class_dir = output_root / "class_images"
    runs = []
    for path in sorted(TOY_RECIPES.glob("*.yaml")):
        method = _load(path, []).method
        if methods is not None and method not in methods:
            continue
        common = (f"train.max_steps={train_steps}",) if train_steps else ()
        # prior -> the overrides that switch it on or off
        if method == "dreambooth":
            variants = {True: (f"dreambooth.class_dir={class_dir}", "dreambooth.prior_preservation=true"), False: ("dreambooth.prior_preservation=false",)}
        elif method in PRIOR_BY_REG_SUBSET:
            variants = {False: (), True: (f"data.subsets=[{{dir: '{class_dir}', caption: '{world.CLASS_PROMPT}', is_reg: true}}]",)}
        else:
            variants = {None: ()}
        for prior, overrides in variants.items():
            label, folder = {True: (" + prior", "_prior"), False: (" (no prior)", "_no_prior"), None: ("", "")}[prior]
            output_dir = output_root / f"{path.stem}{folder}"
            runs.append(BenchRun(f"{path.stem}{label}", path, (*common, *overrides, f"output.dir={output_dir}", "output.tensorboard=false"), prior))
    return runs


def draw_class_images(output_root: Path) -> None:
    """The toy base's "a frog" pictures, drawn as the DreamBooth recipe draws them, into ``output_root/class_images``."""
    import torch

    from trainer.methods.dreambooth.class_images import ensure_class_images
    from trainer.methods.dreambooth.method import DreamBoothMethod
    from trainer.models.loading import load_base_model

    recipe = _load(DREAMBOOTH_RECIPE, [f"dreambooth.class_dir={output_root / 'class_images'}"])
    model = load_base_model(recipe.model.base)
    ensure_class_images(model, DreamBoothMethod(recipe, model).class_image_request(), torch.device("cpu"))


def markdown_table(results: list[BenchResult]) -> str:
    """One row for the base and one per run: fidelity, preservation and drift with 95 % intervals, and wall times."""
    header = [
        '| run | method | steps | train s | eval s | "a sls frog" -> sls frog | change | NN distance | "a frog" -> frog | change | shapes right (pooled) | change | shapes -> frog |',
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def change(after, before) -> str:
        difference, low, high = change_interval(after, before)
        return f"{difference:+.2f} [{low:+.2f}, {high:+.2f}]"

    def cells(scores: ModelScores, base: ModelScores | None) -> list[str]:
        return [
            scores.concept.text(), change(scores.concept, base.concept) if base else "",
            scores.concept_distance.text(),
            scores.preservation.text(), change(scores.preservation, base.preservation) if base else "",
            scores.drift.text(), change(scores.drift, base.drift) if base else "",
            scores.drift_frogs.text(),
        ]

    base = results[0].report.base
    rows = ["| " + " | ".join(["base", "", "", "", "", *cells(base, None)]) + " |"]
    for result in results:
        timing = [result.method, str(result.steps), f"{result.train_seconds:.0f}", f"{result.eval_seconds:.0f}"]
        rows.append("| " + " | ".join([result.run.name, *timing, *cells(result.report.trained, base)]) + " |")
    return "\n".join([*header, *rows])


def toyworld_bench(
    output_root: Path,
    settings: EvalSettings = EvalSettings(),
    methods: list[str] | None = None,
    log: Callable[[str], None] = print,
    train_steps: int | None = None,
) -> str:
    """Train and evaluate every toy recipe (± prior preservation where it applies); return one markdown table.

    ``settings`` of every evaluation (pictures per prompt, sampling steps, drift prompts); ``methods``
    limits the runs to those methods; ``train_steps`` replaces each recipe's ``train.max_steps`` (for a
    quick check; the table then measures little). The table is also written to
    ``output_root/bench.md``; each run's report to ``<run>/concept_eval``.
    """
    from trainer.loop import train

    output_root = Path(output_root)
    runs = bench_runs(output_root, methods, train_steps)
    if any(run.prior for run in runs):
        started = time.perf_counter()
        draw_class_images(output_root)
        log(f"class images ready in {time.perf_counter() - started:.0f} s")
    base_samples = draw_base_samples(settings)
    results = []
    for run in runs:
        log(f"training {run.name}")
        recipe = _load(run.recipe, run.overrides)
        started = time.perf_counter()
        # A bench run again into the same --out replaces its runs; the earlier ones are moved aside, not deleted.
        train(recipe, show_progress=False, overwrite=True)
        trained = time.perf_counter()
        report = evaluate_concept(recipe.output.dir, settings=settings, base_samples=base_samples)
        results.append(BenchResult(run, recipe.method, recipe.train.max_steps, trained - started, time.perf_counter() - trained, report))
        log(f"{run.name}: sls frog {report.trained.concept.text()}, frog {report.trained.preservation.text()}")
    table = markdown_table(results)
    write_text(output_root / "bench.md", table + "\n")
    return table
