"""``sdtrain bench``: steps per second and peak memory of real training runs.

Each configuration (model x latent cache x gradient checkpointing) trains in its own Python process,
so its peak memory is its own: the process's peak resident set size on CPU, the peak of
``torch.cuda.max_memory_allocated`` on CUDA. The process runs the ordinary ``trainer.loop.train`` on a
recipe (by default ``recipes/sls_frog_lora.yaml``, a rank-8 LoRA) whose data is replaced by one image
of ``datasets/sls_frog`` repeated ``batch_size`` times: every epoch is then the same single batch, so
with the cache on, it is encoded before step 1 (trainer.warm_start.encode_latents_ahead) and every step reads
cached latents, the steady state of a real run. Sampling, TensorBoard and periodic checkpoints are
off; the time of each optimizer step comes from ``TrainResult.step_seconds``. With ``--processes N``
the configuration runs as N processes (trainer.distributed), each with a batch of ``batch_size``; the
main process's step times and memory are reported.

Beside the steady state, each row shows how soon the command gets going: the time from launching the
process to the end of optimizer step 1 (imports, model loading, latent encoding, the step) and to the
LoRA written. And how close each step comes to the machine's limit: the last warm-up step runs under
torch's FlopCounterMode (trainer.flops.StepFlops), and after training the same process times a large
matmul on the same device and threads, in the dtype the step's products computed in (fp32, or bf16/fp16
under mixed precision: a GPU's bf16 peak is many times its fp32 one); the step's FLOPs over its mean
time, divided by that matmul's rate, is the fraction of the matmul ceiling the step achieves (its MFU,
measured against what this machine delivers rather than a data sheet).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from trainer.errors import UserError
from trainer.examples import example_path

# The folder that holds the ``trainer`` package: the source checkout, or site-packages.
PACKAGE_PARENT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = example_path("recipes", "sls_frog_lora.yaml")
BENCH_IMAGE = example_path("datasets", "sls_frog", "10_sls frog", "01.png")
COLUMNS = (
    "model", "resolution", "processes", "batch", "cache", "grad ckpt", "steps/s", "s/step", "peak memory",
    "first step", "end to end", "GFLOP/step", "of ceiling",
)
# The matmul that measures the ceiling: large enough that its rate is the machine's, not the call overhead's
# (a 2048-square bf16 product takes tens of microseconds on a current GPU, about a launch's overhead).
CEILING_MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}
CEILING_REPEATS = 3
# Buckets come in steps of 64 px: other resolutions would train at a smaller size than the table says.
RESOLUTION_STEP = 64
_FAILURE_LINES = 5


@dataclass
class Configuration:
    model: str  # any model.base: tiny, random:sd1, a diffusers folder, a .safetensors file
    recipe: str
    dataset: str
    output_dir: str
    resolution: int
    batch_size: int
    cache_latents: bool
    gradient_checkpointing: bool
    warmup_steps: int
    timed_steps: int
    processes: int = 1
    # time.time() when the process (the launcher's, with several) was started; the time to first step and
    # end to end count from there. None: from when measure() is called.
    launched_at: float | None = None

    def overrides(self) -> list[str]:
        values = {
            "model.base": self.model,
            "data.dir": self.dataset,
            "data.subsets": "[]",
            "data.resolution": self.resolution,
            "data.buckets.min_side": RESOLUTION_STEP,
            "data.buckets.max_side": self.resolution,
            "data.buckets.step": RESOLUTION_STEP,
            "data.cache_latents": "memory" if self.cache_latents else "none",
            "train.batch_size": self.batch_size,
            "train.gradient_accumulation_steps": 1,
            "train.max_steps": self.warmup_steps + self.timed_steps,
            "train.gradient_checkpointing": self.gradient_checkpointing,
            "train.save_every_steps": 0,
            "sample.every_steps": 0,
            "sample.prompts": "[]",
            "output.tensorboard": False,
            "output.dir": self.output_dir,
        }
        return [f"{key}={value}" for key, value in values.items()]


@dataclass
class Measurement:
    seconds_per_step: float
    peak_memory_bytes: int
    memory_kind: str  # "RSS" (CPU) or "CUDA" (torch.cuda.max_memory_allocated)
    device: str
    first_step_seconds: float | None = None  # launch to the end of optimizer step 1
    end_to_end_seconds: float | None = None  # launch to the artifacts written
    step_flops: int | None = None  # of the last warm-up step; None without warm-up
    ceiling_flops_per_second: float | None = None  # a large matmul's rate on the same threads, in ceiling_dtype
    ceiling_dtype: str | None = None  # the dtype the step's products computed in: fp32, bf16 or fp16

    @property
    def ceiling_fraction(self) -> float | None:
        if not self.step_flops or not self.ceiling_flops_per_second:
            return None
        return self.step_flops / self.seconds_per_step / self.ceiling_flops_per_second


def _device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"CUDA: {torch.cuda.get_device_name()}"
    return f"CPU: {os.cpu_count()} cores, torch threads: {torch.get_num_threads()}"


def _peak_memory() -> tuple[int, str]:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "CUDA"
    import resource  # Unix only; imported here so `sdtrain --help` works everywhere

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux counts ru_maxrss in KiB, macOS in bytes.
    return (peak if sys.platform == "darwin" else peak * 1024), "RSS"


def matmul_flops_per_second(dtype: str = "fp32", repeats: int = CEILING_REPEATS) -> float:
    """The best rate of a square ``dtype`` matmul (2 n³ FLOPs) on the training device and threads."""
    import torch

    from trainer.formats.safetensors_file import DTYPES

    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = CEILING_MATMUL_SIZE[device]
    a, b = (torch.randn(size, size, device=device, dtype=DTYPES[dtype]) for _ in range(2))
    best = float("inf")
    for _ in range(repeats + 1):  # the first call pays for allocation and kernel selection
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def measure(config: Configuration) -> Measurement:
    """Train one configuration in this process; the step time is the mean over the timed steps."""
    launched = config.launched_at or time.time()
    from trainer.loop import train
    from trainer.recipe import load_recipe

    recipe = load_recipe(config.recipe, config.overrides())
    result = train(recipe, show_progress=False, count_flops_of_step=config.warmup_steps or None)
    finished = time.time()
    timed = result.step_seconds[config.warmup_steps:]
    peak, kind = _peak_memory()
    return Measurement(
        sum(timed) / len(timed), peak, kind, _device_name(),
        first_step_seconds=result.first_step_ended - launched if result.first_step_ended else None,
        end_to_end_seconds=finished - launched, step_flops=result.step_flops,
        ceiling_flops_per_second=matmul_flops_per_second(result.compute_dtype), ceiling_dtype=result.compute_dtype,
    )


def _measure_in_subprocess(config: Configuration, result_path: Path) -> Measurement | str:
    """The Measurement, or why the process failed (its last lines of output)."""
    # The child imports this very package, and stays in the caller's folder so relative model paths work.
    from trainer.distributed import launcher_command

    python_path = os.pathsep.join(filter(None, [str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")]))
    argv = ["--one", json.dumps(asdict(config) | {"launched_at": time.time()}), str(result_path)]
    command, env = launcher_command(config.processes, "trainer.bench", argv) if config.processes > 1 else ([sys.executable, "-m", "trainer.bench", *argv], dict(os.environ))
    env.update({"PYTHONPATH": python_path, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    process = subprocess.run(command, capture_output=True, text=True, env=env)
    if process.returncode == 0:
        return Measurement(**json.loads(result_path.read_text(encoding="utf-8")))
    lines = (process.stderr or process.stdout).strip().splitlines()
    if process.returncode < 0:
        lines.append(f"killed by signal {-process.returncode} (SIGKILL usually means out of memory)")
    return "\n".join(lines[-_FAILURE_LINES:]) or f"exit status {process.returncode}"


def _bench_dataset(directory: Path, batch_size: int) -> Path:
    """A kohya folder holding one image (and its caption) with ``batch_size`` repeats: one (global) batch per epoch."""
    if not BENCH_IMAGE.is_file():
        raise UserError(
            f"sdtrain bench trains on '{BENCH_IMAGE}', which is missing: this copy of sdtrain lacks its example datasets. "
            "Reinstall sdtrain from a wheel or a source checkout (both carry datasets/)."
        )
    subset = directory / f"{batch_size}_sls frog"
    subset.mkdir(parents=True)
    for source in (BENCH_IMAGE, BENCH_IMAGE.with_suffix(".txt")):
        shutil.copy2(source, subset / source.name)
    return directory


def _on_off(flag: bool) -> str:
    return "on" if flag else "off"


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


def _optional(value: float | None, template: str) -> str:
    return "-" if value is None else template.format(value)


def _ceiling_share(fraction: float | None, dtype: str) -> str:
    """Whole percent, or one significant digit below 1 % (a toy model's step on a fast machine) rather than "0"."""
    if fraction is None:
        return "-"
    percent = 100 * fraction
    shown = f"{percent:.0f}" if percent >= 1 or percent == 0 else f"{percent:.1g}"
    return f"{shown} % ({dtype})"


def _cells(outcome: Measurement) -> tuple[str, ...]:
    return (
        f"{1 / outcome.seconds_per_step:.3f}", f"{outcome.seconds_per_step:.3f}", f"{_gib(outcome.peak_memory_bytes)} {outcome.memory_kind}",
        _optional(outcome.first_step_seconds, "{:.1f} s"), _optional(outcome.end_to_end_seconds, "{:.1f} s"),
        _optional(outcome.step_flops and outcome.step_flops / 1e9, "{:.1f}"),
        _ceiling_share(outcome.ceiling_fraction, outcome.ceiling_dtype),
    )


def _markdown_table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in [COLUMNS, *rows]) for i in range(len(COLUMNS))]

    def line(cells) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths)) + " |"

    return "\n".join([line(COLUMNS), line("-" * width for width in widths), *(line(row) for row in rows)])


def _ceiling_rates(ceilings: set[tuple[str | None, float | None]]) -> str:
    """'fp32: 190.5 GFLOP/s; bf16: 350.2-361.0 GFLOP/s': each dtype's measured rates, the range over the configurations."""
    by_dtype: dict[str, list[float]] = {}
    for dtype, rate in sorted(ceilings, key=lambda pair: (pair[0] or "", pair[1] or 0.0)):
        if dtype and rate:
            by_dtype.setdefault(dtype, []).append(rate / 1e9)
    if not by_dtype:
        return "not measured"
    return "; ".join(
        f"{dtype}: {rates[0]:.1f} GFLOP/s" if len(rates) == 1 else f"{dtype}: {rates[0]:.1f}-{rates[-1]:.1f} GFLOP/s"
        for dtype, rates in by_dtype.items()
    )


def _describe(cells: tuple[str, ...]) -> str:
    return "  ".join(f"{name}: {cell}" for name, cell in zip(COLUMNS, cells))


def run_bench(
    models: list[str],
    steps: int,
    resolution: int,
    *,
    warmup: int = 1,
    batch_size: int | None = None,
    cache: tuple[bool, ...] = (False, True),
    gradient_checkpointing: tuple[bool, ...] = (False, True),
    recipe: Path | str = DEFAULT_RECIPE,
    processes: tuple[int, ...] = (1,),
    log=lambda message: print(message, file=sys.stderr, flush=True),
) -> str:
    """Train every configuration for ``warmup + steps`` steps and return the table (markdown) with a header.

    ``log`` receives one line per configuration as it finishes (SD1.5-size runs on a CPU take minutes).
    """
    if steps < 1 or warmup < 0 or (batch_size is not None and batch_size < 1) or min(processes) < 1:
        raise UserError(
            f"sdtrain bench needs --steps >= 1, --warmup >= 0, --batch-size >= 1 and --processes >= 1 "
            f"(got {steps}, {warmup}, {batch_size} and {' '.join(map(str, processes))})."
        )
    if resolution < RESOLUTION_STEP or resolution % RESOLUTION_STEP:
        raise UserError(f"sdtrain bench --resolution {resolution}: use a multiple of {RESOLUTION_STEP} (e.g. 256 or 512).")
    from trainer.recipe import load_recipe

    recipe = Path(recipe).resolve()
    # Read here too, so a broken recipe is one error instead of one failure per configuration.
    batch_size = batch_size or load_recipe(recipe).train.batch_size
    rows: list[tuple[str, ...]] = []
    failures: list[str] = []
    devices: set[str] = set()
    ceilings: set[tuple[str | None, float | None]] = set()
    with tempfile.TemporaryDirectory(prefix="sdtrain-bench-") as tmp:
        work = Path(tmp)
        datasets = {count: _bench_dataset(work / f"data-{count}", batch_size * count) for count in processes}
        plan = [(model, n, c, g) for model in models for n in processes for c in cache for g in gradient_checkpointing]
        for index, (model, count, cached, checkpointed) in enumerate(plan, start=1):
            config = Configuration(
                model=model, recipe=str(recipe), dataset=str(datasets[count]), output_dir=str(work / f"run-{index}"),
                resolution=resolution, batch_size=batch_size, cache_latents=cached, gradient_checkpointing=checkpointed,
                warmup_steps=warmup, timed_steps=steps, processes=count,
            )
            outcome = _measure_in_subprocess(config, work / f"result-{index}.json")
            cells = (model, f"{resolution}x{resolution}", str(count), str(batch_size), _on_off(cached), _on_off(checkpointed))
            if isinstance(outcome, Measurement):
                devices.add(outcome.device)
                ceilings.add((outcome.ceiling_dtype, outcome.ceiling_flops_per_second))
                row = cells + _cells(outcome)
            else:
                failures.append(f"{_describe(cells)}:\n{outcome}")
                row = cells + ("failed",) + ("-",) * (len(COLUMNS) - len(cells) - 1)
            rows.append(row)
            log(f"[{index}/{len(plan)}] {_describe(row)}")
    header = [
        f"sdtrain bench: {recipe.name}, {warmup} warm-up + {steps} timed steps per configuration, "
        f"device: {'; '.join(sorted(devices)) or 'none (every configuration failed)'}",
        "peak memory: RSS = peak resident memory of the whole process (CPU); CUDA = torch.cuda.max_memory_allocated; "
        "batch: per process; with several processes, the main process's time and memory",
        "first step / end to end: from launching the process to the end of optimizer step 1 / to the artifacts written; "
        "GFLOP/step: FlopCounterMode over the last warm-up step (matmuls, convolutions, attention; forward and backward); "
        "of ceiling: GFLOP/step / s/step over the rate of a large square matmul (CPU: "
        f"{CEILING_MATMUL_SIZE['cpu']}, CUDA: {CEILING_MATMUL_SIZE['cuda']}) that the same process measured in the dtype the "
        f"step's products computed in, named in the cell ({_ceiling_rates(ceilings)})",
        "",
    ]
    text = "\n".join(header) + _markdown_table(rows)
    if failures:
        text += "\n\nFailed configurations:\n" + "\n\n".join(failures)
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``sdtrain bench`` (and ``python -m trainer.bench``)."""
    parser.add_argument("--models", nargs="+", default=["tiny", "random:sd1"], metavar="BASE",
                        help="model.base values to measure: tiny, tiny-sdxl, random:sd1 or random:sdxl (SD1.5's or SDXL's size, random weights), a diffusers folder, a .safetensors file (default: tiny random:sd1)")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per configuration (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first; the last one's FLOPs are counted (default 1; 0: no FLOP columns)")
    parser.add_argument("--resolution", type=int, default=256, help="training resolution in px, a multiple of 64 (default 256)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the recipe's train.batch_size")
    parser.add_argument("--cache", choices=("on", "off", "both"), default="both", help="latent caching (default both)")
    parser.add_argument("--grad-ckpt", choices=("on", "off", "both"), default="both", help="gradient checkpointing (default both)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1], metavar="N",
                        help="train each configuration with N processes (trainer.distributed); several values: one row each (default 1)")
    parser.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="recipe to time; its data section is replaced (default recipes/sls_frog_lora.yaml)")


def _choice(value: str) -> tuple[bool, ...]:
    return {"off": (False,), "on": (True,), "both": (False, True)}[value]


def bench_from_args(args: argparse.Namespace) -> str:
    return run_bench(
        args.models, args.steps, args.resolution, warmup=args.warmup, batch_size=args.batch_size,
        cache=_choice(args.cache), gradient_checkpointing=_choice(args.grad_ckpt), recipe=args.recipe, processes=tuple(args.processes),
    )


def _run_one(spec: str, result_path: Path) -> int:
    """The child process: measure one configuration and write the Measurement as JSON."""
    from trainer.atomic import write_text

    try:
        measurement = measure(Configuration(**json.loads(spec)))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    if int(os.environ.get("RANK", "0")) == 0:
        write_text(result_path, json.dumps(asdict(measurement)))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--one"]:
        return _run_one(argv[1], Path(argv[2]))
    parser = argparse.ArgumentParser(prog="python -m trainer.bench", description="Steps per second and peak memory of LoRA training.")
    add_arguments(parser)
    try:
        print(bench_from_args(parser.parse_args(argv)))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
