"""Resume is exact: a run stopped at step k and resumed ends with the same weights as one never stopped.

The runs use the tag dataset with shuffling, tag dropout and flips, gradient accumulation, a cosine
schedule and LoRA dropout, so every source of randomness a resume must restore is exercised.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, fast_overrides
from trainer.checkpoint import resolve_checkpoint
from trainer.loop import TrainingDiverged, train
from trainer.recipe import load_recipe

RECIPE = REPO / "recipes" / "tags_finetune_lora.yaml"


def _overrides(out):
    return fast_overrides(
        out,
        **{
            "data.dir": str(REPO / "datasets" / "tagged_example"),
            "train.max_steps": 12,
            "train.batch_size": 2,
            "train.gradient_accumulation_steps": 2,
            "train.lr_scheduler": "cosine",
            "train.save_every_steps": 4,
            "train.keep_checkpoints": 10,
            "lora.dropout": 0.1,
            "lora.rank": 4,
            "output.formats": "[kohya]",
        },
    )


def _final_weights(out):
    return load_file(resolve_checkpoint(out, "latest") / "trainable.safetensors")


def _assert_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    train(load_recipe(RECIPE, _overrides(out)), show_progress=False)
    return out


def test_resumed_run_equals_uninterrupted(uninterrupted, tmp_path):
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(uninterrupted / "checkpoints" / "step-00000004", out / "checkpoints" / "step-00000004")
    result = train(load_recipe(RECIPE, _overrides(out)), resume="latest", show_progress=False)
    _assert_identical(_final_weights(out), _final_weights(uninterrupted))
    _assert_identical(load_file(result.artifacts[0]), load_file(uninterrupted / "tagged_lora.safetensors"))
    # Training really moved the weights, so the equality above is not trivially true.
    start = load_file(uninterrupted / "checkpoints" / "step-00000004" / "trainable.safetensors")
    assert any(not torch.equal(start[k], v) for k, v in _final_weights(out).items())


def test_latest_skips_incomplete_checkpoints(uninterrupted, tmp_path):
    out = tmp_path / "partial"
    shutil.copytree(uninterrupted / "checkpoints" / "step-00000004", out / "checkpoints" / "step-00000004")
    # What a crash leaves: a staged folder never renamed, and a folder without its state.json.
    (out / "checkpoints" / ".step-00000008.abc.partial").mkdir()
    (out / "checkpoints" / "step-00000012").mkdir()
    assert resolve_checkpoint(out, "latest").name == "step-00000004"


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(tmp_path):
    # An absurd learning rate blows the LoRA weights up after the first update.
    recipe = load_recipe(REPO / "recipes" / "sls_frog_lora.yaml", fast_overrides(tmp_path, **{"train.lr": 1e30, "train.max_grad_norm": 0, "train.min_snr_gamma": "null", "train.save_every_steps": 1, "train.max_steps": 20}))
    with pytest.raises(TrainingDiverged, match=r"diverged at step \d+: the loss is (nan|inf).*step-0000000\d"):
        train(recipe, show_progress=False)
    last = resolve_checkpoint(tmp_path, "latest")
    assert all(torch.isfinite(t).all() for t in load_file(last / "trainable.safetensors").values())
    assert not (tmp_path / "sls_frog.safetensors").exists()


def test_optimizer_state_with_nested_tensors_resumes_exactly(tmp_path):
    """8-bit AdamW keeps each parameter's quantisation state in a dict of tensors: through a checkpoint's
    safetensors + JSON it comes back whole, and the resumed steps equal the uninterrupted ones."""
    import json

    from safetensors.torch import save_file

    from trainer.checkpoint import _flatten_optimizer, _unflatten_optimizer

    bnb = pytest.importorskip("bitsandbytes")
    grads = [torch.randn(64, 64, generator=torch.Generator().manual_seed(seed)) for seed in range(3)]

    def optimizer_over(start):
        param = torch.nn.Parameter(start.clone())
        return param, bnb.optim.AdamW8bit([param], lr=1e-2)

    start = torch.randn(64, 64, generator=torch.Generator().manual_seed(9))
    param, optimizer = optimizer_over(start)
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()
    first, first_optimizer = optimizer_over(start)
    first.grad = grads[0].clone()
    first_optimizer.step()
    tensors, plain = _flatten_optimizer(first_optimizer.state_dict())
    assert any("/" in key for key in tensors)  # the nested dict's tensors are there
    save_file(tensors, tmp_path / "optimizer.safetensors")
    resumed, resumed_optimizer = optimizer_over(first.detach())
    resumed_optimizer.load_state_dict(_unflatten_optimizer(load_file(tmp_path / "optimizer.safetensors"), json.loads(json.dumps(plain))))
    for grad in grads[1:]:
        resumed.grad = grad.clone()
        resumed_optimizer.step()
    assert torch.equal(resumed, param)
