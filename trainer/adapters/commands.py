"""The ``sdtrain lora`` subcommands' arguments and what each runs (trainer/cli.py registers them)."""

from __future__ import annotations

import argparse
from pathlib import Path

from trainer.errors import UserError
from trainer.formats import DTYPE_NAMES


CONFIG_HELP = "for single-file models of another shape than SD1.5/SD2.1/SDXL: the diffusers folder of their architecture"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text}")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a share in (0, 1], got {text}")
    return value


def _ratio(text: str) -> float:
    value = float(text)
    if not value >= 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (the largest singular value over the smallest kept), got {text}")
    return value


def _add_rank_rule(parser: argparse.ArgumentParser, rank_help: str) -> None:
    parser.add_argument("--rank", type=_positive_int, help=rank_help)
    dynamic = parser.add_mutually_exclusive_group()
    dynamic.add_argument("--sv-ratio", type=_ratio, help="per module: keep the singular values at least the largest / X")
    dynamic.add_argument("--sv-fro", type=_share, help="per module: the fewest singular values that keep this share of the change's Frobenius norm")
    dynamic.add_argument("--sv-cumulative", type=_share, help="per module: the fewest singular values whose sum is this share of the sum of all")
    parser.add_argument("--conv-rank", type=_positive_int, help="rank (or cap) of 3x3 convolutions (default: as --rank)")


def _rank_rule(args: argparse.Namespace):
    from trainer.adapters.lowrank import RankRule

    rule = RankRule(rank=args.rank, sv_ratio=args.sv_ratio, sv_fro=args.sv_fro, sv_cumulative=args.sv_cumulative)
    return rule if rule.rank is not None or rule.dynamic else None


def _dtype(args: argparse.Namespace):
    from trainer.formats.safetensors_file import DTYPES

    return DTYPES[args.dtype] if args.dtype else None


def _inspect(args: argparse.Namespace) -> int:
    from trainer.adapters.inspect import inspect_adapter

    for path in args.files:
        inspection = inspect_adapter(Path(path))
        print(inspection.json() if args.json else inspection.text())
    return 0


def _resize(args: argparse.Namespace) -> int:
    from trainer.adapters.resize import resize

    rule = _rank_rule(args)
    if rule is None:
        raise UserError("'sdtrain lora resize' needs the rank to keep: --rank R, or a dynamic rule (--sv-ratio, --sv-fro, --sv-cumulative; --rank then caps it).")
    print(resize(Path(args.src), Path(args.dst), rule, args.conv_rank, _dtype(args), args.overwrite).text())
    return 0


def _extract(args: argparse.Namespace) -> int:
    from trainer.adapters.extract import extract

    report = extract(
        args.tuned, args.base, Path(args.out), args.rank, conv_rank=args.conv_rank, te_threshold=args.te_threshold,
        clamp_quantile=args.clamp_quantile, config=args.config, dtype=_dtype(args), overwrite=args.overwrite,
    )
    print(report.text())
    return 0


def _merge(args: argparse.Namespace) -> int:
    from trainer.adapters.merge import merge_adapters, merge_into_model

    paths = [Path(p) for p in args.adapters]
    if args.base:
        report = merge_into_model(paths, args.base, [Path(o) for o in args.out], args.ratios, config=args.config, dtype=args.dtype, overwrite=args.overwrite)
    else:
        if len(args.out) != 1 or Path(args.out[0]).suffix.lower() != ".safetensors":
            raise UserError("Merging adapters into one writes one .safetensors file: give one --out FILE.safetensors (or --base MODEL to merge them into a model).")
        report = merge_adapters(
            paths, Path(args.out[0]), args.ratios, mode=args.mode, rule=_rank_rule(args), conv_rank=args.conv_rank, dtype=_dtype(args), overwrite=args.overwrite
        )
    print(report.text())
    return 0


def add_lora_commands(lora: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    """The ``inspect``, ``resize``, ``extract`` and ``merge`` subcommands under ``sdtrain lora``."""
    commands = lora.add_subparsers(dest="lora_command", required=True)
    overwrite = argparse.ArgumentParser(add_help=False)
    overwrite.add_argument("--overwrite", action="store_true", help="replace the output if it exists")

    inspect = commands.add_parser("inspect", parents=[common], help="format, family, ranks, metadata, hash check and problems of adapter files")
    inspect.add_argument("files", nargs="+", help="LoRA/LyCORIS .safetensors files")
    inspect.add_argument("--json", action="store_true", help="one JSON object per file, for scripts")
    inspect.set_defaults(run=_inspect)

    resize = commands.add_parser("resize", parents=[common, overwrite], help="a LoRA/LoCon/DoRA at a lower rank (best approximation by SVD)")
    resize.add_argument("src", help="the adapter to resize")
    resize.add_argument("dst", help="the .safetensors file to write")
    _add_rank_rule(resize, "the rank to keep (with a dynamic rule: the largest rank it may pick)")
    resize.add_argument("--dtype", choices=DTYPE_NAMES, help="weights' precision (default: the input's)")
    resize.set_defaults(run=_resize)

    extract = commands.add_parser("extract", parents=[common, overwrite], help="a LoRA from a fine-tuned model and its base")
    extract.add_argument("tuned", help="the fine-tuned model: diffusers folder or single-file checkpoint")
    extract.add_argument("base", help="the model it was trained from")
    extract.add_argument("out", help="the .safetensors file to write")
    extract.add_argument("--rank", type=_positive_int, required=True, help="rank of the linear (and 1x1 conv) modules")
    extract.add_argument("--conv-rank", type=_positive_int, help="also extract the ResNet and sampler convolutions, at this rank")
    extract.add_argument("--te-threshold", type=float, default=0.01, help="include a text encoder only if a weight changed by more than this (default 0.01, kohya's --min_diff)")
    extract.add_argument("--clamp-quantile", type=_share, help="clamp the factors' entries to this quantile of their magnitudes (off by default; kohya uses 0.99)")
    extract.add_argument("--dtype", choices=DTYPE_NAMES, default="fp16", help="weights' precision (default fp16)")
    extract.add_argument("--config", help=CONFIG_HELP)
    extract.set_defaults(run=_extract)

    merge = commands.add_parser(
        "merge", parents=[common, overwrite], help="adapters into a base model (--base), or several adapters into one",
        description="With --base: apply the adapters to the model as the UIs do and write the whole model (a .safetensors --out: "
        "single file; another --out: diffusers folder). Without: one LoRA from all of them, by SVD to --rank (default mode) or "
        "concatenated along the rank (--mode concat, exact).",
    )
    merge.add_argument("adapters", nargs="+", help="LoRA/LyCORIS .safetensors files")
    merge.add_argument("--ratios", type=float, nargs="+", help="one weight per adapter, in order; negative ones subtract (default 1 each)")
    merge.add_argument("--base", help="the model to merge into: built-in name, diffusers folder or single file")
    merge.add_argument("--out", action="append", required=True, help="output: .safetensors file, or (with --base) a folder; with --base it may be given twice")
    merge.add_argument("--config", help=CONFIG_HELP)
    merge.add_argument("--mode", choices=["svd", "concat"], default="svd", help="without --base: svd (sum, then best rank --rank) or concat (exact, rank = sum of ranks)")
    _add_rank_rule(merge, "with --mode svd: the rank of the merged LoRA (with a dynamic rule: its cap)")
    merge.add_argument("--dtype", choices=DTYPE_NAMES, help="weights' precision (default: the first adapter's; for a model fp16 in a single file, float32 in a folder)")
    merge.set_defaults(run=_merge)
