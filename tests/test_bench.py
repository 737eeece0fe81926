"""``sdtrain bench``: runs every configuration in its own process and prints a readable table.

No timing assertions: the numbers depend on the machine and its load. What is checked is what a user
relies on: one row per configuration with the settings it ran, plausible numbers, failures reported
in the table instead of aborting the run, and the benchmark model having SD1.5's real size.
"""

from __future__ import annotations

import pytest

from trainer.bench import COLUMNS, main, run_bench
from trainer.errors import UserError


def _rows(table: str) -> list[list[str]]:
    lines = [line for line in table.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_bench_prints_one_row_per_configuration(capsys):
    code = main(["--models", "tiny", "--steps", "1", "--warmup", "1", "--resolution", "64", "--grad-ckpt", "on"])
    assert code == 0
    captured = capsys.readouterr()
    header, separator, *rows = _rows(captured.out)
    assert tuple(header) == COLUMNS
    assert set("".join(separator)) == {"-"}
    assert [(row[0], row[1], row[3], row[4]) for row in rows] == [("tiny", "64x64", "off", "on"), ("tiny", "64x64", "on", "on")]
    for row in rows:
        assert row[2] == "2"  # the recipe's batch size
        steps_per_second, seconds_per_step = float(row[5]), float(row[6])
        # Both printed to 3 decimals, each off by at most h = 0.0005: (1/s + e1)(s + e2) - 1 = e2/s + e1 s + e1 e2,
        # within h (r + s) + 3 h^2 of 1 in the printed r and s, on a fast machine as on a slow one (a flat 1%
        # fails below 0.05 s per step). A rate printed from another measurement than the time misses by far more.
        h = 0.0005
        assert steps_per_second > 0 and abs(steps_per_second * seconds_per_step - 1) <= h * (steps_per_second + seconds_per_step) + 3 * h * h
        amount, unit, kind = row[7].split()
        assert float(amount) > 0.1 and unit == "GiB" and kind in ("RSS", "CUDA")
    assert "device: " in captured.out
    # Progress goes to stderr, one line per configuration as it finishes.
    assert captured.err.count("[1/2]") == 1 and captured.err.count("[2/2]") == 1


def test_failed_configuration_is_reported_in_the_table():
    table = run_bench(["random:sd9"], steps=1, resolution=64, cache=(True,), gradient_checkpointing=(False,), log=lambda _: None)
    (row,) = _rows(table)[2:]
    assert row[0] == "random:sd9" and row[5] == "failed"
    # The child's error says what would have worked.
    assert "Failed configurations" in table and "random:sd1" in table


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
    text = model.text_encoder.config
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size) == (768, 12, 49408)  # CLIP ViT-L/14
    assert model.tokenizer("a frog").input_ids[:2] == [49406, 320]  # the real CLIP BPE
    assert model.version == "sd_v1" and model.name == "sdtrain-random-sd1"
