"""The CUDA paths the CPU test suite cannot reach, in one short script for a lent GPU (docs/benchmarks.md).

    python bench/gpu_checks.py            # prints one line per check and a summary; exit 1 if any failed

Each check trains a few steps on a built-in tiny model under a mixed precision and says what it saw:
bf16 and fp16 (gradient scaling) LoRA, a bf16 resume against the uninterrupted run (reported as the
largest difference: CUDA kernels may sum in another order between runs), fp16 DreamBooth with the VAE in
fp32 drawing a sample, 8-bit AdamW, Textual Inversion, a hypernetwork, LoHa, SDXL LoRA and the
validation loss.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.checkpoint import resolve_checkpoint  # noqa: E402
from trainer.loop import train  # noqa: E402
from trainer.recipe import load_recipe  # noqa: E402

FAST = {
    "data.dir": str(REPO / "datasets" / "sls_frog"), "data.resolution": 64, "data.buckets.min_side": 64, "data.buckets.max_side": 128,
    "sample.every_steps": 0, "sample.prompts": "[]", "output.tensorboard": False, "train.lr_warmup_steps": 0, "train.max_steps": 4,
}


def _train(recipe: str, out: Path, resume=None, **values):
    overrides = [f"{key}={value}" for key, value in {**FAST, "output.dir": str(out), **values}.items()]
    return train(load_recipe(REPO / "recipes" / recipe, overrides), resume=resume, show_progress=False)


def _trained(out: Path) -> dict[str, torch.Tensor]:
    return load_file(resolve_checkpoint(out, "latest") / "trainable.safetensors")


def _changed(result, out: Path) -> str:
    assert np.isfinite(result.final_loss), f"loss {result.final_loss}"
    tensors = _trained(out)
    assert all(torch.isfinite(t).all() for t in tensors.values()), "non-finite trained tensors"
    return f"final loss {result.final_loss:.4f}, {len(tensors)} trained tensors, {np.mean(result.step_seconds[1:] or result.step_seconds) * 1000:.0f} ms/step"


def lora_bf16(tmp: Path) -> str:
    return _changed(_train("sls_frog_lora.yaml", tmp, **{"train.mixed_precision": "bf16"}), tmp)


def lora_fp16(tmp: Path) -> str:
    return _changed(_train("sls_frog_lora.yaml", tmp, **{"train.mixed_precision": "fp16", "lora.text_encoder": True}), tmp)


def _resume(tmp: Path, **values) -> str:
    settings = {"train.max_steps": 6, "train.save_every_steps": 3, "train.keep_checkpoints": 0, **values}
    _train("sls_frog_lora.yaml", tmp / "full", **settings)
    shutil.copytree(tmp / "full" / "checkpoints" / "step-00000003", tmp / "resumed" / "checkpoints" / "step-00000003")
    _train("sls_frog_lora.yaml", tmp / "resumed", resume="latest", **settings)
    a, b = _trained(tmp / "full"), _trained(tmp / "resumed")
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    scale = max(float(a[k].float().abs().max()) for k in a)
    return f"resumed vs uninterrupted: max |difference| {worst:.3g} (weights up to {scale:.3g}){' - bit-identical' if worst == 0 else ''}"


def resume_bf16(tmp: Path) -> str:
    return _resume(tmp, **{"train.mixed_precision": "bf16"})


def resume_adamw8bit(tmp: Path) -> str:
    return _resume(tmp, **{"train.mixed_precision": "bf16", "train.optimizer": "adamw8bit"})


def dreambooth_fp16_vae_fp32_sample(tmp: Path) -> str:
    result = _train(
        "sls_frog_dreambooth.yaml", tmp, **{
            "train.mixed_precision": "fp16", "model.vae_fp32": True, "dreambooth.prior_preservation": False, "dreambooth.ema": False,
            "sample.prompts": "[sls frog]", "sample.steps": 4, "output.formats": "[single_file]",
        },
    )
    (sample,) = result.samples
    pixels = np.asarray(Image.open(sample), dtype=np.float32)
    assert pixels.std() > 1.0, "the sample is one flat colour (a NaN decode shows as black)"
    return _changed(result, tmp) + f"; sample pixel std {pixels.std():.1f}"


def adamw8bit(tmp: Path) -> str:
    return _changed(_train("sls_frog_lora.yaml", tmp, **{"train.mixed_precision": "bf16", "train.optimizer": "adamw8bit"}), tmp)


def textual_inversion_bf16(tmp: Path) -> str:
    return _changed(_train("sls_frog_ti.yaml", tmp, **{"train.mixed_precision": "bf16"}), tmp)


def hypernetwork_bf16(tmp: Path) -> str:
    return _changed(_train("sls_frog_hypernetwork.yaml", tmp, **{"train.mixed_precision": "bf16"}), tmp)


def loha_bf16(tmp: Path) -> str:
    return _changed(_train("lycoris_loha.yaml", tmp, **{"train.mixed_precision": "bf16"}), tmp)


def sdxl_lora_bf16(tmp: Path) -> str:
    return _changed(_train("sdxl/sls_frog_lora.yaml", tmp, **{"train.mixed_precision": "bf16"}), tmp)


def validation_bf16(tmp: Path) -> str:
    result = _train("sls_frog_lora.yaml", tmp, **{"train.mixed_precision": "bf16", "validation.split": 0.2, "validation.every_steps": 2})
    rows = (tmp / "validation.csv").read_text(encoding="utf-8").splitlines()
    return _changed(result, tmp) + f"; validation rows {len(rows) - 1}: {rows[-1][:60]}"


CHECKS = [lora_bf16, lora_fp16, resume_bf16, dreambooth_fp16_vae_fp32_sample, adamw8bit, resume_adamw8bit, textual_inversion_bf16, hypernetwork_bf16, loha_bf16,
          sdxl_lora_bf16, validation_bf16]


def main(argv: list[str]) -> int:
    """Each check in a process of its own: accelerate keeps one mixed precision per process."""
    if argv[:1] == ["--one"]:
        check = next(check for check in CHECKS if check.__name__ == argv[1])
        with tempfile.TemporaryDirectory() as tmp:
            print("ok: " + check(Path(tmp)))
        return 0
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}", flush=True)
    failed = 0
    for check in CHECKS:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, "--one", check.__name__], capture_output=True, text=True)
        lines = done.stdout.strip().splitlines()
        if done.returncode == 0 and lines and lines[-1].startswith("ok: "):
            outcome = lines[-1]
        else:
            failed += 1
            outcome = "FAILED:\n" + "\n".join(done.stderr.strip().splitlines()[-8:])
        print(f"{check.__name__:34s} {time.perf_counter() - started:6.1f}s  {outcome}", flush=True)
    print(f"{len(CHECKS) - failed} of {len(CHECKS)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
