"""``sdtrain bench``: runs every configuration in its own process and prints a readable table.

No timing assertions: the numbers depend on the machine and its load. What is checked is what a user
relies on: each configuration trains what its row says, its numbers are the measured times of its own
timed steps (warm-up excluded), failures are reported in the table instead of aborting the run, and the
benchmark model has SD1.5's real size.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from tests.conftest import trains_in_bf16
from trainer import bench
from trainer.bench import Configuration, Measurement, main, measure, run_bench
from trainer.errors import UserError
from trainer.loop import TrainResult

COLUMNS = [
    "model", "resolution", "processes", "batch", "cache", "grad ckpt", "steps/s", "s/step", "peak memory",
    "first step", "end to end", "GFLOP/step", "of ceiling",
]


def _rows(table: str) -> list[list[str]]:
    lines = [line for line in table.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_bench_measures_each_configuration_in_its_own_process_and_reports_failures(capsys):
    timed_steps = 2
    started = time.perf_counter()
    argv = [
        "--models", "tiny", "random:sd9", "--steps", str(timed_steps), "--warmup", "1", "--resolution", "64", "--cache", "on", "--grad-ckpt", "on",
        "--processes", "1", "2",
    ]
    code = main(argv)
    elapsed = time.perf_counter() - started
    assert code == 0  # a failing configuration does not abort the others
    captured = capsys.readouterr()
    header, separator, tiny, tiny_two, unknown, unknown_two = _rows(captured.out)
    assert header == COLUMNS and set("".join(separator)) == {"-"}
    assert tiny[:6] == ["tiny", "64x64", "1", "2", "on", "on"]  # 2: the recipe's batch size
    assert tiny_two[:6] == ["tiny", "64x64", "2", "2", "on", "on"]  # two processes of batch 2 each
    for row in (tiny, tiny_two):
        # The timed steps ran inside this command, so together they took more than nothing and less than all of it.
        assert 0 < float(row[7]) * timed_steps < elapsed
        amount, unit, kind = row[8].split()
        assert float(amount) > 0.1 and unit == "GiB" and kind in ("RSS", "CUDA")
        # Launch to step 1 comes before launch to the LoRA written, and both happened inside this command.
        first_step, end_to_end = (float(cell.removesuffix(" s")) for cell in row[9:11])
        assert 0 < first_step < end_to_end < elapsed
        # A UNet step multiplies matrices; the ceiling fraction is a percentage of a rate measured in the step's
        # dtype, fp32 for this recipe (train.mixed_precision: auto) on a CPU.
        percent, dtype = row[12].split(" % ")
        assert float(row[11]) > 0 and float(percent) > 0 and dtype == ("(bf16)" if torch.cuda.is_available() else "(fp32)")
    assert "device: " in captured.out
    assert [row[0] for row in (unknown, unknown_two)] == ["random:sd9"] * 2 and unknown[6:] == unknown_two[6:] == ["failed"] + ["-"] * 6
    # The child's error says what would have worked.
    assert "random:sd1" in captured.out.split("Failed configurations:")[1]
    # Progress goes to stderr, one line per configuration as it finishes.
    assert all(captured.err.count(f"[{index}/4]") == 1 for index in range(1, 5))


def test_a_configuration_trains_its_settings_and_times_only_the_steps_after_warm_up(tmp_path, monkeypatch):
    trained = []

    launched = time.time() - 100.0

    def fake_train(recipe, show_progress, count_flops_of_step):
        trained.append((recipe, count_flops_of_step))
        return TrainResult(
            output_dir=Path(recipe.output.dir), artifacts=[], step_seconds=[30.0, 0.5, 1.5, 1.0], first_step_ended=launched + 40.0, step_flops=5 * 10**9,
            compute_dtype="bf16",
        )

    monkeypatch.setattr("trainer.loop.train", fake_train)
    # The ceiling is timed in the dtype the steps computed in: bf16's rate here, fp32's would be another.
    monkeypatch.setattr(bench, "matmul_flops_per_second", lambda dtype: {"bf16": 10e9, "fp32": 1e9}[dtype])
    config = Configuration(
        model="tiny", recipe=str(bench.DEFAULT_RECIPE), dataset=str(tmp_path / "data"), output_dir=str(tmp_path / "run"),
        resolution=128, batch_size=3, cache_latents=True, gradient_checkpointing=True, warmup_steps=1, timed_steps=3, launched_at=launched,
    )
    measurement = measure(config)
    assert measurement.seconds_per_step == pytest.approx(1.0)  # the mean of 0.5, 1.5 and 1.0: not the warm-up's 30 s
    # Counted from the launch, not from when training began; the end after all 100 s that passed since.
    assert measurement.first_step_seconds == pytest.approx(40.0) and measurement.end_to_end_seconds >= 100.0
    # The FLOPs of the (untimed) warm-up step at the timed steps' pace: 5 GFLOP per 1.0 s of a 10 GFLOP/s ceiling.
    assert measurement.ceiling_fraction == pytest.approx(0.5) and measurement.ceiling_dtype == "bf16"
    ((recipe, counted_step),) = trained
    assert counted_step == 1
    assert (recipe.model.base, recipe.data.dir, recipe.data.subsets, recipe.output.dir) == ("tiny", config.dataset, [], config.output_dir)
    assert (recipe.data.resolution, recipe.data.buckets.max_side, recipe.train.batch_size, recipe.train.max_steps) == (128, 128, 3, 4)
    assert recipe.data.cache_latents == "memory" and recipe.train.gradient_checkpointing
    # Nothing but training steps: no samples, checkpoints or logs inside the timed run.
    assert (recipe.sample.every_steps, recipe.train.save_every_steps, recipe.output.tensorboard) == (0, 0, False)


def test_each_row_shows_its_own_configurations_measurement(monkeypatch):
    gib = 2**30
    outcomes = {  # (cache, gradient checkpointing) -> what its process reported
        (False, False): Measurement(0.25, 3 * gib, "RSS", "CPU: test"),
        (False, True): "RuntimeError: not enough memory",
        (True, False): Measurement(0.5, gib, "RSS", "CPU: test"),
        (True, True): Measurement(2.0, gib // 2, "RSS", "CPU: test", 9.5, 61.25, 3 * 10**9, 6e9, "bf16"),
    }
    monkeypatch.setattr(bench, "_measure_in_subprocess", lambda config, path: outcomes[config.cache_latents, config.gradient_checkpointing])
    table = run_bench(["tiny"], steps=3, resolution=64, log=lambda _: None)
    header, _, *rows = _rows(table)
    assert header == COLUMNS
    assert {(row[4], row[5]): row[6:] for row in rows} == {
        ("off", "off"): ["4.000", "0.250", "3.00 GiB RSS", "-", "-", "-", "-"],  # nothing but the step time measured
        ("off", "on"): ["failed"] + ["-"] * 6,
        ("on", "off"): ["2.000", "0.500", "1.00 GiB RSS", "-", "-", "-", "-"],
        # 3 GFLOP in 2 s of a 6 GFLOP/s ceiling: 25 %.
        ("on", "on"): ["0.500", "2.000", "0.50 GiB RSS", "9.5 s", "61.2 s", "3.0", "25 % (bf16)"],
    }
    failures = table.split("Failed configurations:\n")[1]
    assert "cache: off  grad ckpt: on" in failures and "RuntimeError: not enough memory" in failures
    assert "device: CPU: test" in table and "1 warm-up + 3 timed steps" in table and "bf16: 6.0 GFLOP/s" in table


@trains_in_bf16
def test_a_bf16_run_is_measured_against_a_bf16_matmul(tmp_path):
    # Under bf16 mixed precision the step's products run in bf16, whose peak differs from fp32's (several
    # times over on a GPU): its share of the ceiling is taken against a bf16 matmul timed in its process.
    recipe = tmp_path / "bf16.yaml"
    text = bench.DEFAULT_RECIPE.read_text(encoding="utf-8")
    recipe.write_text(text.replace("mixed_precision: auto", "mixed_precision: bf16", 1), encoding="utf-8")
    table = run_bench(["tiny"], steps=1, resolution=64, cache=(True,), gradient_checkpointing=(False,), recipe=recipe, log=lambda _: None)
    _, _, row = _rows(table)
    percent, dtype = row[12].split(" % ")
    assert float(percent) > 0 and dtype == "(bf16)"
    assert "bf16: " in table and "fp32: " not in table


def test_resolution_must_be_a_bucket_size():
    with pytest.raises(UserError, match="multiple of 64"):
        run_bench(["tiny"], steps=1, resolution=100)


def test_random_sd1_has_the_real_sd15_architecture():
    from accelerate import init_empty_weights

    from trainer.models.loading import load_base_model

    # Parameters on the meta device: the architecture without allocating its 1.07 billion weights.
    with init_empty_weights():
        model = load_base_model("random:sd1")
    assert tuple(model.unet.config.block_out_channels) == (320, 640, 1280, 1280)
    assert model.unet.config.cross_attention_dim == 768
    assert sum(p.numel() for p in model.unet.parameters()) == pytest.approx(859.5e6, rel=0.001)
    (text_encoder,) = model.text_encoders
    text = text_encoder.model.config
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size) == (768, 12, 49408)  # CLIP ViT-L/14
    assert text_encoder.tokenizer("a frog").input_ids[:2] == [49406, 320]  # the real CLIP BPE
    assert model.family.name == "sd1" and model.name == "sdtrain-random-sd1"


def test_random_sdxl_has_the_real_sdxl_architecture():
    from accelerate import init_empty_weights

    from trainer.models.loading import load_base_model

    with init_empty_weights():
        model = load_base_model("random:sdxl")
    assert model.family.name == "sdxl" and model.unet.config.cross_attention_dim == 2048
    # SDXL 1.0's UNet: 2,567,463,684 parameters; CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 (with its projection).
    assert sum(p.numel() for p in model.unet.parameters()) == 2_567_463_684
    widths = [(te.model.config.hidden_size, te.model.config.num_hidden_layers) for te in model.text_encoders]
    assert widths == [(768, 12), (1280, 32)]
    assert model.text_encoders[1].model.text_projection.weight.shape == (1280, 1280)
    assert model.text_encoders[1].tokenizer.pad_token == "!" and model.vae.config.scaling_factor == 0.13025
