"""The toy world: a deterministic world, a judge that can tell its pictures apart, a shipped base model
that `model.base: toy` loads, and fine-tunes that measurably teach its concepts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import REPO
from trainer.errors import UserError
from trainer.toyworld import pretrain, world
from trainer.toyworld.evaluate import EvalSettings, Rate, change_interval, draw_samples, evaluate_concept, load_trained_model
from trainer.toyworld.judge import JudgeTraining, accuracy, judge_pixels, train_judge


def _pixels(pictures):
    return world.to_tensor([p.image for p in pictures])


def test_world_is_deterministic_and_index_addressed():
    first = world.pictures(world.PRETRAIN, 40)
    again = world.pictures(world.PRETRAIN, 20, start=20)
    assert [p.caption for p in first[20:]] == [p.caption for p in again]
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(first[20:], again))
    # Distinct indices and distinct splits draw distinct pictures.
    assert not np.array_equal(np.asarray(first[0].image), np.asarray(first[1].image))
    sls = world.SLS_FROG_CONCEPT
    assert not np.array_equal(np.asarray(world.picture(sls.instances(), 0).image), np.asarray(world.picture(sls.held_out(), 0).image))
    assert first[0].image.size == (world.RESOLUTION, world.RESOLUTION)


@pytest.mark.parametrize("concept", world.CONCEPTS.values(), ids=world.CONCEPTS)
def test_shipped_instance_pictures_are_the_worlds(concept):
    folder = REPO / "recipes" / "toy" / concept.name / concept.folder
    assert len(list(folder.glob("*.png"))) == 10
    for index, pic in enumerate(world.pictures(concept.instances(), 10), start=1):
        shipped = np.asarray(Image.open(folder / f"{index:02d}.png").convert("RGB"), dtype=np.int16)
        # Tolerates a Pillow whose resampling rounds differently, not a different drawing.
        assert np.abs(shipped - np.asarray(pic.image, dtype=np.int16)).mean() < 1.0
        assert (folder / f"{index:02d}.txt").read_text().strip() == concept.prompt


def test_pretraining_world_never_shows_the_concepts_but_shows_their_parts():
    pictures = world.pictures(world.PRETRAIN, 1000)
    kinds = {p.kind for p in pictures}
    assert world.SLS_FROG not in kinds and world.FROG in kinds and set(world.SHAPES) <= kinds
    assert any(p.caption.startswith("an orange") for p in pictures)
    assert {p.caption for p in pictures} <= set(world.world_prompts())
    # "vex triangle": purple things and triangles, never a purple triangle, never the word.
    pairs = {(p.colour, p.kind) for p in pictures}
    assert world.HELD_OUT_PAIR not in pairs
    assert ("purple", "circle") in pairs and ("red", "triangle") in pairs
    assert not any("vex" in p.caption or "sls" in p.caption for p in pictures)
    # The judge does see the pair: it must be able to say "purple triangle".
    judged = {(p.colour, p.kind) for p in world.pictures(world.JUDGE_TRAIN, 1000)}
    assert world.HELD_OUT_PAIR in judged


def test_shipped_judge_beats_chance_by_a_wide_margin():
    judge, _ = pretrain.load_judge()
    # Indices past the build's test set: pictures neither its training nor its reported test saw.
    pictures = world.pictures(world.JUDGE_TEST, 400, start=10_000)
    result = accuracy(judge, _pixels(pictures), pictures)
    assert result.kind > 0.9 and result.colour > 0.9  # chance: 1/6 each
    assert result.sls_recall > 0.9 and result.sls_false_alarm < 0.05  # decoy frogs are not sls frogs


@pytest.mark.statistical
def test_a_briefly_trained_judge_beats_chance():
    pictures = world.pictures(world.JUDGE_TRAIN, 1500)
    judge = train_judge(_pixels(pictures), pictures, JudgeTraining(steps=60, batch_size=64), log=lambda _: None)
    test = world.pictures(world.JUDGE_TEST, 300, start=20_000)
    result = accuracy(judge, _pixels(test), test)
    assert result.kind > 0.5 and result.colour > 0.5


def test_shipped_weights_are_what_this_code_builds():
    # A change to the world, the architectures or the settings changes the version: the shipped files must follow.
    from trainer.formats.safetensors_file import read_metadata

    for name in (pretrain.BASE_FILE, pretrain.JUDGE_FILE):
        assert read_metadata(pretrain.SHIPPED_WEIGHTS / name)["version"] == pretrain.version()


def test_model_base_toy_loads_the_shipped_base():
    from trainer.models.loading import load_base_model

    model = load_base_model("toy")
    assert model.name == pretrain.BASE_NAME and model.vae_scale_factor == 2
    assert (pretrain.toy_cache_dir() / "base" / "model_index.json").is_file()
    with torch.no_grad():
        latents = model.vae.encode(_pixels(world.pictures(world.SLS_FROG_CONCEPT.held_out(), 2))).latent_dist.mean
    assert latents.shape == (2, 4, pretrain.LATENT_SIZE, pretrain.LATENT_SIZE)


def test_missing_toy_base_tells_how_to_build_it(tmp_path, monkeypatch):
    from trainer.models.loading import load_base_model

    monkeypatch.setenv("SDTRAIN_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(pretrain, "SHIPPED_WEIGHTS", tmp_path / "no-weights")
    with pytest.raises(UserError, match="sdtrain toyworld build"):
        load_base_model("toy")


def test_wilson_and_newcombe_intervals():
    low, high = Rate(0, 10).interval()
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    assert Rate(5, 10).interval() == pytest.approx((0.2366, 0.7634), abs=1e-4)
    difference, low, high = change_interval(Rate(9, 10), Rate(1, 10))
    assert difference == pytest.approx(0.8) and 0 < low < 0.8 < high <= 1


def test_eval_refuses_a_run_on_another_base(tmp_path):
    (tmp_path / "recipe.yaml").write_text("method: lora\nmodel:\n  base: tiny\noutput:\n  name: x\n")
    with pytest.raises(UserError, match="not on 'toy'"):
        evaluate_concept(tmp_path)


@pytest.mark.statistical
def test_lora_on_the_toy_base_teaches_sls_frog(tmp_path):
    from trainer.loop import train
    from trainer.recipe import load_recipe

    recipe = load_recipe(
        REPO / "recipes" / "toy" / "sls_frog_lora.yaml",
        [f"data.dir={REPO / 'recipes' / 'toy' / 'sls_frog'}", f"output.dir={tmp_path / 'run'}"],
    )
    train(recipe, show_progress=False)
    report = evaluate_concept(tmp_path / "run", settings=EvalSettings(samples_per_prompt=24, steps=12, drift_prompts=("an orange square",)))
    difference, low, _ = change_interval(report.trained.concept, report.base.concept)
    assert low > 0, report.markdown()
    assert report.trained.concept_distance.value < report.base.concept_distance.value
    assert all(path.is_file() for path in report.files)
    assert "concept fidelity" in (tmp_path / "run" / "concept_eval" / "report.md").read_text()


def _train_toy(recipe_name: str, output, *overrides: str):
    from trainer.loop import train
    from trainer.recipe import load_recipe

    recipe = load_recipe(
        REPO / "recipes" / "toy" / recipe_name,
        [f"data.dir={REPO / 'recipes' / 'toy' / 'sls_frog'}", f"output.dir={output}", "train.max_steps=2", *overrides],
    )
    train(recipe, show_progress=False)


QUICK_EVAL = EvalSettings(samples_per_prompt=2, steps=4, drift_prompts=("an orange square",))
QUICK_BENCH_METHODS = ("textual_inversion",)
QUICK_SEEDS = (1, 2)


def test_eval_concept_reads_textual_inversion_in_every_format(tmp_path):
    from trainer.toyworld.evaluate import TrainedModel

    _train_toy("sls_frog_ti.yaml", tmp_path / "run", "output.formats=[a1111,a1111_pt,diffusers]")
    report = evaluate_concept(tmp_path / "run", settings=QUICK_EVAL)
    # The embedding is asked for by its own word, which the base does not know.
    assert "Textual Inversion" in report.artifact and '"a sls_frog"' in report.artifact
    assert report.trained.concept.count == 2 and (tmp_path / "run" / "concept_eval" / "grid.png").is_file()
    for artifact in ("sls_frog.safetensors", "sls_frog.pt", "sls_frog_diffusers/learned_embeds.safetensors"):
        trained = load_trained_model(tmp_path / "run" / artifact, pretrain.toy_base_dir())
        assert isinstance(trained, TrainedModel) and trained.concept_prompt == "a sls_frog"
        # The word and its second vector are known words now, and the pipeline expands the word to both.
        assert {"sls_frog", "sls_frog_1"} <= set(trained.model.text_encoders[0].tokenizer.get_vocab())


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory) -> tuple[Path, str]:
    """`sdtrain toyworld bench` of Textual Inversion on both concepts with two training seeds, 2 steps each,
    quickly evaluated: its output folder and its tables."""
    from trainer.toyworld.bench import toyworld_bench

    root = tmp_path_factory.mktemp("toy_bench")
    return root, toyworld_bench(root, QUICK_EVAL, methods=list(QUICK_BENCH_METHODS), log=lambda _: None, overrides=("train.max_steps=2",), seeds=QUICK_SEEDS)


def test_eval_concept_reads_a_hypernetwork_as_pt_and_safetensors(tmp_path):
    run = tmp_path / "run"
    _train_toy("sls_frog_hypernetwork.yaml", run)
    from_folder = evaluate_concept(run, tmp_path / "folder_eval", settings=QUICK_EVAL)
    from_pickle = evaluate_concept(run / "sls_frog_toy.pt", tmp_path / "pt_eval", settings=QUICK_EVAL)
    assert "hypernetwork" in from_folder.artifact and from_folder.artifact.endswith("sls_frog_toy.safetensors)")
    # The two files hold the same weights: the trained model draws the same pictures from either.
    assert from_folder.as_dict()["trained"] == from_pickle.as_dict()["trained"]
    model = load_trained_model(run, pretrain.toy_base_dir()).model
    assert hasattr(model.unet, "hypernetwork")


def test_bench_has_a_table_per_concept_with_one_row_per_run_pooling_its_seeds(quick_bench):
    from trainer.toyworld.bench import bench_runs

    root, table = quick_bench
    runs = bench_runs(root, list(QUICK_BENCH_METHODS), overrides=("train.max_steps=2",), seeds=QUICK_SEEDS)
    assert len(runs) == len(world.CONCEPTS) * len(QUICK_SEEDS) and (root / "bench.md").read_text().strip() == table
    for concept in world.CONCEPTS.values():
        section = table.split(f"### {concept.prompt}\n", 1)[1].split("###", 1)[0]
        rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| ") and not line.startswith("| run ")]
        assert [row[0].lstrip("| ") for row in rows] == ["base", f"{concept.name}_ti"]
        assert rows[1][3] == str(len(QUICK_SEEDS))  # the seeds column: both seeds pooled into one row
        for seed in QUICK_SEEDS:
            # Each seed trained its own run; the evaluation knew which concept from the run's recipe.
            run = root / f"{concept.name}_ti" / f"seed{seed}"
            report = evaluate_concept(run, root / "re-evaluated" / f"{concept.name}-{seed}", settings=QUICK_EVAL)
            assert report.concept == concept and f'"a {concept.name}"' in report.artifact


def test_bench_runs_prior_preservation_both_ways_where_it_applies(tmp_path):
    from trainer.toyworld.bench import bench_runs

    runs = {(run.name, run.seed): run for run in bench_runs(tmp_path, seeds=(1, 2))}
    names = {name for name, _ in runs}
    for concept in world.CONCEPTS:
        assert {f"{concept}_{method}{variant}" for method in ("dreambooth", "lora", "lycoris", "hypernetwork")
                for variant in (" + prior", " (no prior)")} <= names
        assert runs[(f"{concept}_ti", 1)].prior is None and f"{concept}_ti + prior" not in names
    assert {seed for _, seed in runs} == {1, 2}
    output_dirs = {override for run in runs.values() for override in run.overrides if override.startswith("output.dir=")}
    assert len(output_dirs) == len(runs)  # every run and seed has its own output folder
    vex = runs[("vex_triangle_lora + prior", 2)]
    assert "train.seed=2" in vex.overrides and any("caption: 'a triangle'" in o and "vex_triangle" in o for o in vex.overrides)


@pytest.mark.statistical
def test_prior_preservation_keeps_a_frog_a_frog(tmp_path):
    # Two DreamBooth runs on the toy base (about a minute each on 2 cores): the DreamBooth paper's second claim.
    from trainer.loop import train
    from trainer.recipe import load_recipe

    judge, _ = pretrain.load_judge()
    frog_rates = {}
    for prior in (True, False):
        output = tmp_path / f"prior-{prior}"
        recipe = load_recipe(
            REPO / "recipes" / "toy" / "sls_frog_dreambooth.yaml",
            [f"data.dir={REPO / 'recipes' / 'toy' / 'sls_frog'}", f"output.dir={output}",
             f"dreambooth.class_dir={tmp_path / 'class'}", f"dreambooth.prior_preservation={str(prior).lower()}"],
        )
        train(recipe, show_progress=False)
        model = load_trained_model(output, pretrain.toy_base_dir()).model
        samples = draw_samples(model, [world.CLASS_PROMPT], EvalSettings(samples_per_prompt=24, steps=12))
        frog_rates[prior] = Rate(judge_pixels(judge, samples[world.CLASS_PROMPT]).kinds.count(world.FROG), 24)
    _, low, _ = change_interval(frog_rates[True], frog_rates[False])
    assert low > 0, frog_rates


@pytest.mark.statistical
def test_textual_inversion_teaches_a_concept_the_base_can_draw(tmp_path):
    # "vex triangle" is a purple triangle: the pretraining world shows purple things and triangles, never the
    # pair, and the base draws it when asked "a purple triangle". An embedding can point there; TI trains only
    # the word's vectors, so every other prompt draws the very same pictures as before.
    from trainer.loop import train
    from trainer.recipe import load_recipe

    concept = world.VEX_TRIANGLE_CONCEPT
    recipe = load_recipe(
        REPO / "recipes" / "toy" / "vex_triangle_ti.yaml",
        [f"data.dir={REPO / 'recipes' / 'toy' / concept.name}", f"output.dir={tmp_path / 'run'}"],
    )
    train(recipe, show_progress=False)
    report = evaluate_concept(tmp_path / "run", settings=EvalSettings(samples_per_prompt=24, steps=12, drift_prompts=("a yellow triangle",)))
    assert report.concept == concept and '"a vex_triangle"' in report.artifact
    _, low, _ = change_interval(report.trained.concept, report.base.concept)
    assert low > 0, report.markdown()
    assert report.trained.drift == report.base.drift and report.trained.preservation == report.base.preservation
