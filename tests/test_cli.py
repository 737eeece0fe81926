"""The command line as a user meets it: base models, inspection, and bad input in one clear paragraph."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from PIL import Image

from tests.conftest import REPO, draw, fast_overrides
from trainer.cli import main

RECIPE = str(REPO / "recipes" / "sls_frog_lora.yaml")


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _load_pipeline(folder, **kwargs):
    """``from_pretrained(folder, **kwargs)`` as diffusers' docs load a folder; every part must come out in one dtype."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, **kwargs)
    assert len({pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype}) == 1
    return pipe


def test_tiny_base_folder_trains_as_a_diffusers_base(tmp_path, capsys):
    code, out, _ = _run(capsys, "base", "tiny", str(tmp_path / "tiny"))
    assert code == 0 and (tmp_path / "tiny" / "model_index.json").is_file()
    assert not list((tmp_path / "tiny").glob("*/*.fp16.*"))  # float32 only: no variant asked for
    draw(_load_pipeline(tmp_path / "tiny"))
    code, out, err = _run(capsys, "train", RECIPE, *fast_overrides(tmp_path / "out", **{"model.base": str(tmp_path / "tiny"), "train.max_steps": 2}), "--quiet")
    assert code == 0, err
    assert (tmp_path / "out" / "sls_frog.safetensors").is_file()


def test_the_sdtrain_process_trains_and_turns_bad_input_into_one_paragraph(tmp_path):
    # `python -m trainer.cli` starts as the console script does (trainer.cli.entry, which imports the
    # training libraries with the garbage collector off): the exit code and messages are main's.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def sdtrain(*argv, python_options=()):
        return subprocess.run([sys.executable, *python_options, "-m", "trainer.cli", *argv], cwd=tmp_path, env=env, capture_output=True, text=True)

    done = sdtrain("train", RECIPE, *fast_overrides(tmp_path / "out", **{"train.max_steps": 1}), "--quiet")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "sls_frog.safetensors").is_file()
    refused = sdtrain("train", str(tmp_path / "missing.yaml"))
    assert refused.returncode == 2
    assert "missing.yaml" in refused.stderr and "Traceback" not in refused.stderr
    # A mistyped recipe key or a bad value is reported before the training libraries are imported (seconds
    # of every start).
    for override, named in (("lora.rnak=4", "'lora.rank'"), ("train.optimizer=sgd", "'train.optimizer'")):
        mistaken = sdtrain("train", RECIPE, override, python_options=("-X", "importtime"))
        assert mistaken.returncode == 2 and named in mistaken.stderr
        imported = {line.rsplit("|", 1)[1].strip() for line in mistaken.stderr.splitlines() if line.startswith("import time:")}
        assert "omegaconf" in imported and not imported & {"torch", "diffusers", "transformers"}


def test_data_inspect_lists_subsets_and_tags(capsys):
    code, out, _ = _run(capsys, "data", "inspect", str(REPO / "datasets" / "tagged_example"), "--resolution", "128")
    assert code == 0
    assert "5_tagged" in out and "sls frog (6)" in out


@pytest.mark.parametrize(
    "setup, overrides, expected",
    [
        ("none", {"data.dir": "{tmp}/missing"}, "missing"),
        ("empty", {"data.dir": "{tmp}/empty"}, "empty"),
        ("corrupt", {"data.dir": "{tmp}/corrupt"}, "broken.png"),
        ("small", {"data.dir": "{tmp}/small"}, "tiny.png"),
        ("badbase", {"model.base": "{tmp}/model.safetensors"}, "model.safetensors"),
        ("none", {"model.base": "{tmp}/nowhere"}, "model.base"),
        ("none", {"train.optimizer": "sgd"}, "train.optimizer"),
    ],
)
def test_bad_input_is_one_paragraph_exit_2(tmp_path, capsys, setup, overrides, expected):
    if setup == "empty":
        (tmp_path / "empty" / "10_frog").mkdir(parents=True)
    if setup == "corrupt":
        (tmp_path / "corrupt" / "10_frog").mkdir(parents=True)
        (tmp_path / "corrupt" / "10_frog" / "broken.png").write_bytes(b"\x89PNG not really")
    if setup == "small":
        (tmp_path / "small" / "10_frog").mkdir(parents=True)
        Image.new("RGB", (20, 20), "green").save(tmp_path / "small" / "10_frog" / "tiny.png")
    if setup == "badbase":
        (tmp_path / "model.safetensors").write_text("this is not a checkpoint")
    values = {key: value.format(tmp=tmp_path) if isinstance(value, str) else value for key, value in overrides.items()}
    code, _, err = _run(capsys, "train", RECIPE, *fast_overrides(tmp_path / "out", **{"train.max_steps": 1, **values}), "--quiet")
    assert code == 2
    assert expected in err and "Traceback" not in err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_convert_hypernetwork_and_model_both_ways(tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    from trainer.formats.a1111_hypernetwork import read_hypernetwork

    # A trained hypernetwork .pt -> safetensors -> .pt keeps every tensor.
    code, _, err = _run(capsys, "train", str(REPO / "recipes" / "sls_frog_hypernetwork.yaml"), *fast_overrides(tmp_path / "hn", **{"train.max_steps": 1, "output.formats": "[a1111]"}), "--quiet")
    assert code == 0, err
    (pt,) = (tmp_path / "hn").glob("*.pt")
    assert _run(capsys, "convert", str(pt), str(tmp_path / "hn.safetensors"))[0] == 0
    assert _run(capsys, "convert", str(tmp_path / "hn.safetensors"), str(tmp_path / "back.pt"))[0] == 0
    original, back = read_hypernetwork(pt), read_hypernetwork(tmp_path / "back.pt")
    assert original.layers.keys() == back.layers.keys()
    # A model: diffusers folder -> single file -> diffusers folder, which keeps float32 main files and adds the fp16 variant.
    assert _run(capsys, "base", "tiny", str(tmp_path / "tiny"))[0] == 0
    assert _run(capsys, "convert", str(tmp_path / "tiny"), str(tmp_path / "tiny.safetensors"), "--dtype", "fp32")[0] == 0
    assert "model.diffusion_model.input_blocks.0.0.weight" in load_file(tmp_path / "tiny.safetensors")
    code, _, err = _run(capsys, "convert", str(tmp_path / "tiny.safetensors"), str(tmp_path / "again"), "--config", str(tmp_path / "tiny"), "--dtype", "fp16")
    assert code == 0, err
    a = load_file(tmp_path / "tiny" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "again" / "unet" / "diffusion_pytorch_model.safetensors")
    half = load_file(tmp_path / "again" / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    assert a.keys() == b.keys() == half.keys()
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k].half(), half[k]) for k in a)
    plain = _load_pipeline(tmp_path / "again")
    assert plain.text_encoder.dtype == torch.float32
    draw(plain)
    variant = _load_pipeline(tmp_path / "again", variant="fp16", torch_dtype=torch.float16)
    assert variant.text_encoder.dtype == torch.float16
    draw(variant)


def test_eval_concept_writes_report_for_a_toy_lora(tmp_path, capsys):
    code, _, err = _run(capsys, "train", str(REPO / "recipes" / "toy" / "sls_frog_lora.yaml"), f"output.dir={tmp_path / 'toy'}", "train.max_steps=3", "sample.every_steps=0", "sample.prompts=[]", "output.tensorboard=false", "--quiet")
    assert code == 0, err
    code, out, err = _run(capsys, "eval", "concept", str(tmp_path / "toy"), "--samples", "2")
    assert code == 0, err
    assert "concept fidelity" in out and "class preservation" in out
    assert {p.name for p in (tmp_path / "toy" / "concept_eval").iterdir()} == {"report.md", "scores.json", "grid.png"}
