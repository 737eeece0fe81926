"""``sdtrain``: the command line. Bad input ends in one clear paragraph and exit status 2."""

from __future__ import annotations

import argparse
import gc
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from trainer.errors import UserError
from trainer.formats import DTYPE_NAMES


def _train(args: argparse.Namespace) -> int:
    from trainer.recipe import load_recipe, recipe_to_yaml

    recipe = load_recipe(args.recipe, args.overrides)
    if args.print_config:
        print(recipe_to_yaml(recipe), end="")
        return 0
    if args.processes < 1:
        raise UserError(f"--processes is {args.processes}; it must be at least 1.")
    if args.processes > 1 and "WORLD_SIZE" not in os.environ:
        from trainer.distributed import launch

        return launch(args.processes, _without_processes(args.argv))
    # Only now, with the recipe read and checked: a mistake in it is reported in well under a second,
    # not after the seconds the training libraries take to import (docs/benchmarks.md, "Start and exit").
    with _collector_paused(args.freeze_imports):
        from trainer.loop import train

    train(recipe, resume=args.resume, show_progress=not args.quiet, overwrite=args.overwrite, allow_data_change=args.allow_data_change)
    return 0


def _without_processes(argv: list[str]) -> list[str]:
    """The command line each launched process runs: this one without --processes (or --processes=N)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--processes":
            skip = True
        elif not arg.startswith("--processes="):
            kept.append(arg)
    return kept


def _base(args: argparse.Namespace) -> int:
    from trainer.models.export import save_diffusers_folder
    from trainer.models.loading import builtin_base_names, load_base_model

    if args.name not in builtin_base_names():
        raise UserError(f"'sdtrain base {args.name}': there is no built-in model of that name; use one of {', '.join(builtin_base_names())}.")
    save_diffusers_folder(load_base_model(args.name), Path(args.directory))
    print(f"Wrote the built-in {args.name} model as a diffusers folder to {args.directory}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from trainer.data.inspect import inspect_data

    inspection = inspect_data(args.target, resolution=args.resolution)
    # Flushed: the refusal goes to stderr and must come after the whole report, also when both are piped.
    print(inspection.report, flush=True)
    if inspection.refusal:
        raise UserError(inspection.refusal)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from trainer.formats.a1111_hypernetwork import convert_hypernetwork, is_hypernetwork_file

    src, dst = Path(args.src), Path(args.dst)
    if is_hypernetwork_file(src):
        written = convert_hypernetwork(src, dst)
    else:
        from trainer.convert import convert_checkpoint

        written = convert_checkpoint(src, dst, args.dtype, config=Path(args.config) if args.config else None)
    print(f"Wrote {written}")
    return 0


def _toyworld_build(args: argparse.Namespace) -> int:
    from trainer.toyworld.pretrain import build

    snapshots = Path(args.snapshots) if args.snapshots else None
    print(f"Wrote the toy world to {build(Path(args.directory) if args.directory else None, snapshot_dir=snapshots)}")
    return 0


def _toyworld_bench(args: argparse.Namespace) -> int:
    from trainer.toyworld.bench import SEEDS, toyworld_bench
    from trainer.toyworld.evaluate import EvalSettings

    print(toyworld_bench(Path(args.out), EvalSettings(samples_per_prompt=args.samples), methods=args.methods,
                         seeds=tuple(args.seeds or SEEDS), concepts=args.concepts, overrides=tuple(args.overrides),
                         priors={"both": (True, False), "with": (True,), "without": (False,)}[args.prior]))
    return 0


def _eval_concept(args: argparse.Namespace) -> int:
    from trainer.toyworld.evaluate import EvalSettings, evaluate_concept
    from trainer.toyworld.world import concept_named

    concept = concept_named(args.concept) if args.concept else None
    report = evaluate_concept(args.target, args.out, EvalSettings(samples_per_prompt=args.samples, seed=args.seed), concept=concept)
    print(report.markdown())
    for path in report.files:
        print(f"Wrote {path}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from trainer.bench import bench_from_args

    print(bench_from_args(args))
    return 0


def _import_kohya(args: argparse.Namespace) -> int:
    from trainer.kohya_import import import_kohya

    written = import_kohya([Path(p) for p in args.files], Path(args.output) if args.output else None, overwrite=args.overwrite, script=args.script)
    print(f"Wrote {written}; not carried over options are listed at its top. Train it with: sdtrain train {written}")
    return 0


def _export_kohya(args: argparse.Namespace) -> int:
    from trainer.kohya_import import export_kohya

    for path in export_kohya(Path(args.recipe), Path(args.output), overwrite=args.overwrite):
        print(f"Wrote {path}")
    return 0


def _ui(args: argparse.Namespace) -> int:
    try:
        from trainer.ui.server import serve
    except ImportError as err:
        raise UserError(f"`sdtrain ui` needs the ui extra ({err.name} is missing): pip install -e \".[ui]\" (or pip install \"sdtrain[ui]\").") from None
    serve(Path(args.root), host=args.host, port=args.port)
    return 0


def _add_kohya_commands(commands, common: argparse.ArgumentParser) -> None:
    """``sdtrain import kohya FILE...`` and ``sdtrain export kohya RECIPE`` (docs/from-kohya.md)."""
    importing = commands.add_parser("import", help="turn another trainer's settings into a recipe")
    kohya_in = importing.add_subparsers(dest="import_command", required=True).add_parser(
        "kohya", parents=[common], help="a kohya_ss .json, sd-scripts .toml (config or dataset) or saved command line -> a commented recipe")
    kohya_in.add_argument("files", nargs="+", help="kohya files; a dataset TOML named by dataset_config is read too")
    kohya_in.add_argument("-o", "--output", help="the recipe to write (default: <first file's name>.yaml here)")
    kohya_in.add_argument("--script", help="the sd-scripts script the files are for, when they do not say (e.g. sdxl_train_network.py)")
    kohya_in.add_argument("--overwrite", action="store_true", help="replace the recipe file if it exists")
    kohya_in.set_defaults(run=_import_kohya)
    exporting = commands.add_parser("export", help="write a recipe as another trainer's settings")
    kohya_out = exporting.add_subparsers(dest="export_command", required=True).add_parser(
        "kohya", parents=[common], help="a dataset TOML and an sd-scripts command line for the same run")
    kohya_out.add_argument("recipe", help="a YAML recipe")
    kohya_out.add_argument("-o", "--output", default="kohya_export", help="folder for dataset.toml, train.sh, prompts.txt (default kohya_export)")
    kohya_out.add_argument("--overwrite", action="store_true", help="replace those files if they exist")
    kohya_out.set_defaults(run=_export_kohya)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    parser = argparse.ArgumentParser(prog="sdtrain", description="Fine-tune Stable Diffusion models from YAML recipes, offline.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", parents=[common], help="train from a recipe", description="Train from a YAML recipe; key=value arguments override recipe keys.")
    train.add_argument("recipe", help="path of a YAML recipe, e.g. recipes/sls_frog_lora.yaml")
    train.add_argument("overrides", nargs="*", help="recipe overrides such as train.max_steps=50 output.dir=/tmp/x")
    train.add_argument("--resume", metavar="CHECKPOINT", help="'latest' or a checkpoint folder under {output.dir}/checkpoints")
    train.add_argument(
        "--overwrite", action="store_true", help="output.dir holds an earlier run: move its files into <output.dir>.replaced-<date>-<time> and train anew"
    )
    train.add_argument("--allow-data-change", action="store_true", help="with --resume: continue although the training data changed since the checkpoint")
    train.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument(
        "--processes", type=int, default=1, metavar="N",
        help="train with N processes on this machine (one per GPU; on CPU they share the cores), the same result as one (docs/distributed.md)",
    )
    train.set_defaults(run=_train)

    base = commands.add_parser("base", parents=[common], help="write a built-in base model as a diffusers folder")
    base.add_argument("name", help="'tiny' (SD1), 'tiny-sdxl' or 'toy'")
    base.add_argument("directory", help="a new or empty folder")
    base.set_defaults(run=_base)

    data = commands.add_parser("data", help="look at a dataset before training")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    inspect = data_commands.add_parser("inspect", parents=[common], help="images, repeats, captions, buckets, tag frequencies and problems")
    inspect.add_argument("target", help="a data folder, a .parquet/.arrow file or save_to_disk folder, or a recipe")
    inspect.add_argument("--resolution", type=int, help="training resolution to check buckets against (default: the recipe's, or 512 for a folder)")
    inspect.set_defaults(run=_inspect)
    convert = commands.add_parser(
        "convert",
        parents=[common],
        help="convert a model or hypernetwork between formats",
        description="A model between a diffusers folder and a single-file .safetensors (the destination's suffix decides), "
        "or a hypernetwork between AUTOMATIC1111's .pt and sdtrain's .safetensors.",
    )
    convert.add_argument("src", help="diffusers folder, single-file .safetensors/.ckpt, or hypernetwork .pt/.safetensors")
    convert.add_argument("dst", help="a .safetensors file or a folder (models); .safetensors or .pt (hypernetworks)")
    convert.add_argument("--dtype", default="fp16", choices=DTYPE_NAMES, help="model weights' precision (default fp16)")
    convert.add_argument("--config", help="for a single-file source of another shape than SD1.5/SD2.1: its diffusers config folder")
    convert.set_defaults(run=_convert)

    toyworld = commands.add_parser("toyworld", help="the toy world: a base model that knows shapes and frogs")
    toyworld_commands = toyworld.add_subparsers(dest="toyworld_command", required=True)
    build = toyworld_commands.add_parser("build", parents=[common], help="draw the world and pretrain the toy base and its judge (~30 min on 2 CPU cores)")
    build.add_argument("directory", nargs="?", help="a new or empty folder to write it to (default: the per-user cache that model.base: toy reads)")
    build.add_argument("--snapshots", help="a folder for the base every 1,000 UNet steps (what a shorter build would ship)")
    build.set_defaults(run=_toyworld_build)
    toy_bench = toyworld_commands.add_parser("bench", parents=[common], help="train every toy recipe (± prior preservation) and evaluate each: one table")
    toy_bench.add_argument("--out", default="output/toyworld_bench", help="where runs and the table go (default output/toyworld_bench)")
    toy_bench.add_argument("--samples", type=int, default=40, help="images per prompt in each evaluation (default 40)")
    toy_bench.add_argument("--seeds", type=int, nargs="+", help="training seeds; each run once per seed (default 42 43 44)")
    toy_bench.add_argument("--methods", nargs="+", help="only these methods (default: all)")
    toy_bench.add_argument("--concepts", nargs="+", help="only these concepts, e.g. sls_frog vex_triangle (default: all)")
    toy_bench.add_argument("--prior", choices=("both", "with", "without"), default="both",
                           help="runs with prior preservation, without, or both where it applies (default both)")
    toy_bench.add_argument("overrides", nargs="*", metavar="key=value", help="recipe keys for every run, e.g. train.lr=1e-3 train.max_steps=200")
    toy_bench.set_defaults(run=_toyworld_bench)

    evaluate = commands.add_parser("eval", help="measure what training taught")
    eval_commands = evaluate.add_subparsers(dest="eval_command", required=True)
    concept = eval_commands.add_parser("concept", parents=[common], help="concept fidelity, class preservation and drift of a toy-base artifact")
    concept.add_argument("target", help="an artifact (LoRA/LyCORIS file, DreamBooth folder or file) or a training output folder")
    concept.add_argument("--out", help="report folder (default: <target folder>/concept_eval)")
    concept.add_argument("--samples", type=int, default=40, help="images per prompt (default 40)")
    concept.add_argument("--seed", type=int, default=1000, help="first seed (default 1000)")
    concept.add_argument("--concept", help="the concept it was taught (default: from the run's recipe, else sls_frog)")
    concept.set_defaults(run=_eval_concept)

    _add_kohya_commands(commands, common)
    lora = commands.add_parser("lora", help="adapter tools: inspect, resize, extract, merge (docs/tools.md)")
    from trainer.adapters.commands import add_lora_commands

    add_lora_commands(lora, common)

    ui = commands.add_parser("ui", parents=[common], help="the web app: data, recipes, runs in a browser (docs/ui.md)")
    ui.add_argument("--root", default=".", help="the folder the UI works in: datasets, recipes/ and output/ under it (default: here)")
    ui.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other needs the printed token)")
    ui.set_defaults(run=_ui)

    from trainer.bench import add_arguments

    bench = commands.add_parser("bench", parents=[common], help="steps/s and peak memory of LoRA training, one table")
    add_arguments(bench)
    bench.set_defaults(run=_bench)
    return parser


def _quiet_libraries() -> None:
    """Library chatter (deprecations, optional backends) buries the messages that matter to a user.

    Through the libraries' own environment variables, read as they are imported, so that no command
    imports diffusers (seconds: it brings torch) to quiet it; a level the user set is kept. Where a
    library is already imported (tests, a forked server) its level is set directly.
    """
    import warnings

    for library, variable in (("diffusers", "DIFFUSERS_VERBOSITY"), ("transformers", "TRANSFORMERS_VERBOSITY")):
        os.environ.setdefault(variable, "error")
        logging_module = sys.modules.get(f"{library}.utils.logging")
        if logging_module is not None:
            logging_module.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)


def _offline() -> None:
    """Nothing may reach for the network: the toolkit is offline-first. Set before the libraries are
    imported (huggingface_hub reads these as it loads)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main(argv: list[str] | None = None, freeze_imports: bool = False) -> int:
    """Run one command. ``freeze_imports`` (the sdtrain process, ``entry``) imports the training
    libraries with the garbage collector paused and freezes what they made (``_collector_paused``)."""
    _offline()
    args = _parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.freeze_imports = freeze_imports
    if not args.debug:
        _quiet_libraries()
    try:
        return args.run(args)
    except UserError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


@contextmanager
def _collector_paused(freeze: bool):
    """With ``freeze``, the garbage collector is kept off the objects made inside: importing torch,
    diffusers and transformers makes about 500,000 objects, none of them garbage, which the collector
    walked each time their number grew by a quarter (7 times: 1.7 s of the 6.8 s ``train`` spent
    importing). It is paused while they are made, and they are frozen out of its view after. A frozen
    object is never collected, so freezing belongs to a process that ends with the command (``entry``),
    not to tests calling ``main`` (docs/benchmarks.md, "Start and exit")."""
    if not freeze:
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def entry() -> int:
    """The ``sdtrain`` process (the console script, ``python -m trainer.cli``): ``main`` with the training
    libraries' objects kept from the garbage collector (``_collector_paused``) and everything frozen before
    the exit, which would otherwise walk them once more (1.4 s after an SD1.5-size run)."""
    code = main(freeze_imports=True)
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(entry())
