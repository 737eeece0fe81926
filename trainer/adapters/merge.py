"""``sdtrain lora merge``: adapters baked into a base model, or several adapters made into one.

Into a model: each file is applied at its ratio, one after the other, exactly as AUTOMATIC1111 and
ComfyUI apply a stack of adapters (trainer/formats/lycoris.py, every LyCORIS type), and the result is
written as a whole model. Into one adapter: the weighted changes are summed exactly, then either cut
to a rank by SVD (``svd``: the best approximation of the sum at that rank, the sum itself at full
rank) or, for LoRA/LoCon inputs, joined along the rank (``concat``: exactly the sum, rank = the sum of
the ranks). docs/tools.md#merge.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.adapters.extract import load_model
from trainer.adapters.files import AdapterFile, Module, check_output, floating_dtype, guess_family, network_dims, read_adapter, save_adapter
from trainer.adapters.lowrank import RankRule, dense_delta, depends_on_base, factors, has_kernel, is_factored_lora, product_svd, truncate, weight_shape
from trainer.adapters.resize import describe_rule
from trainer.errors import UserError
from trainer.formats import lycoris
from trainer.formats.safetensors_file import DTYPES, iso_now

SVD, CONCAT = "svd", "concat"


@dataclass
class Weighted:
    adapter: AdapterFile
    ratio: float

    def __str__(self) -> str:
        return f"{self.adapter.path.name} x {self.ratio:g}"


def read_weighted(paths: list[Path], ratios: list[float] | None) -> list[Weighted]:
    if ratios and len(ratios) != len(paths):
        raise UserError(f"--ratios has {len(ratios)} values for {len(paths)} adapters; give one ratio per adapter, in the same order (or none: 1 each).")
    inputs = [Weighted(read_adapter(path, "Adapter"), ratio) for path, ratio in zip(paths, ratios or [1.0] * len(paths))]
    families = {w.adapter.path.name: guess_family(w.adapter.modules, w.adapter.metadata) for w in inputs}
    kinds = {"SDXL" if family == "SDXL" else "SD1/SD2" for family in families.values()}
    if len(kinds) > 1 or {"SD1", "SD2"} <= set(families.values()):
        listed = ", ".join(f"{name} ({family})" for name, family in families.items())
        raise UserError(f"The adapters were made for different model families: {listed}. Merge only adapters of one family.")
    return inputs


# --- several adapters into one ---------------------------------------------------------------------


@dataclass
class MergeReport:
    outputs: list[Path]
    lines: list[str]

    def text(self) -> str:
        return "\n".join([*self.lines, *(f"Wrote {out}" for out in self.outputs)])


def _modules_by_name(inputs: list[Weighted]) -> dict[str, list[tuple[Weighted, Module]]]:
    by_name: dict[str, list[tuple[Weighted, Module]]] = {}
    for weighted in inputs:
        for name, module in weighted.adapter.modules.items():
            if lycoris.algo_of(module) is None:
                raise UserError(f"Module '{name}' of '{weighted.adapter.path}' has the tensors {sorted(module)}, of no algorithm sdtrain knows; it cannot be merged.")
            if depends_on_base(module):
                kind = "DoRA" if "dora_scale" in module else "(IA)^3"
                raise UserError(
                    f"'{weighted.adapter.path}' is {kind} (module '{name}'): its change depends on the base model's weights, so it cannot be "
                    "summed with other adapters on its own. Merge it into a model instead: 'sdtrain lora merge FILE --base MODEL --out OUT'."
                )
            by_name.setdefault(name, []).append((weighted, module))
    for name, terms in by_name.items():
        shapes = {tuple(weight_shape(module)) for _, module in terms}
        if len(shapes) > 1:
            files = ", ".join(f"{w.adapter.path.name} {tuple(weight_shape(m))}" for w, m in terms)
            raise UserError(f"The adapters disagree on the shape of module '{name}': {files}. They were made for different base models.")
    return by_name


def _sum_svd(terms: list[tuple[Weighted, Module]], rule: RankRule):
    """The weighted sum of the modules' changes, cut to ``rule``'s rank: from the joined factors when all are
    LoRA/LoCon (the same sum, never formed), else from the dense sum."""
    shape = weight_shape(terms[0][1])
    if all(is_factored_lora(module) for _, module in terms):
        pairs = [factors(module, weighted.ratio) for weighted, module in terms]
        u, s, vh = product_svd(torch.cat([up for up, _ in pairs], 1), torch.cat([down for _, down in pairs], 0))
    else:
        dense = sum(dense_delta(module, weighted.ratio) for weighted, module in terms)
        u, s, vh = torch.linalg.svd(dense.flatten(1), full_matrices=False)
    return truncate(u, s, vh, shape, rule)


def _concat(terms: list[tuple[Weighted, Module]]) -> Module:
    """The modules joined along the rank: up = [r1 u1 | r2 u2 ...] (alpha / rank folded in), down = [d1; d2 ...]; alpha = rank."""
    pairs = [factors(module, weighted.ratio) for weighted, module in terms]
    shape = weight_shape(terms[0][1])
    up, down = torch.cat([u for u, _ in pairs], 1), torch.cat([d for _, d in pairs], 0)
    rank = down.shape[0]
    return {"lora_down.weight": down.reshape(rank, *shape[1:]), "lora_up.weight": up.reshape(shape[0], rank, *[1] * (len(shape) - 2)), "alpha": float(rank)}


def _merge_concat(by_name: dict[str, list[tuple[Weighted, Module]]]) -> tuple[dict[str, Module], str]:
    for name, terms in by_name.items():
        for weighted, module in terms:
            if not is_factored_lora(module):
                kind = "a LoCon with a Tucker core" if lycoris.algo_of(module) == lycoris.LOCON else lycoris.algo_of(module)
                raise UserError(
                    f"--mode concat joins LoRA/LoCon factors along the rank; module '{name}' of '{weighted.adapter.path}' is {kind}. "
                    "Use --mode svd (the default) with --rank."
                )
    return {name: _concat(terms) for name, terms in by_name.items()}, "concatenated along the rank (exact)"


def _merge_svd(by_name: dict[str, list[tuple[Weighted, Module]]], rule: RankRule, conv_rank: int | None) -> tuple[dict[str, Module], str]:
    conv_rule = rule if conv_rank is None else dataclasses.replace(rule, rank=conv_rank)
    merged, shares = {}, []
    for name, terms in by_name.items():
        cut = _sum_svd(terms, conv_rule if has_kernel(weight_shape(terms[0][1])) else rule)
        merged[name] = cut.module()
        shares.append(cut.kept_fro_share)
    kept = f"kept share of each module's sum: mean {100 * sum(shares) / len(shares):.2f}%, lowest {100 * min(shares):.2f}%"
    return merged, f"summed, then cut by SVD ({describe_rule(rule, conv_rank)}); {kept}"


def merge_adapters(
    paths: list[Path], out: Path, ratios: list[float] | None = None, *, mode: str = SVD, rule: RankRule | None = None, conv_rank: int | None = None,
    dtype: torch.dtype | None = None, overwrite: bool = False,
) -> MergeReport:
    """One kohya LoRA file from several adapters (LoRA, LoCon, LoHa, LoKr, full), each weighted by its ratio."""
    if mode == CONCAT and (rule is not None or conv_rank is not None):
        raise UserError("--mode concat keeps every rank (the result's rank is the sum of the inputs'); leave out --rank/--conv-rank and the dynamic rules, or use --mode svd.")
    if mode == SVD and rule is None:
        raise UserError("Merging adapters into one with --mode svd needs the rank to keep: add --rank R (or a dynamic rule such as --sv-fro 0.99).")
    check_output(out, overwrite)
    inputs = read_weighted(paths, ratios)
    by_name = _modules_by_name(inputs)
    merged, how = _merge_concat(by_name) if mode == CONCAT else _merge_svd(by_name, rule, conv_rank)
    metadata = merged_adapter_metadata(inputs, Path(out), merged, how)
    save_adapter(out, merged, metadata, dtype or floating_dtype(inputs[0].adapter.tensors))
    return MergeReport([Path(out)], [f"Merged {', '.join(map(str, inputs))}: {len(merged)} modules, {how}."])


def merged_adapter_metadata(inputs: list[Weighted], out: Path, modules: dict[str, Module], how: str) -> dict[str, str]:
    """kohya's network keys for the merged LoRA, the base-model keys every input agrees on, and ModelSpec."""
    metadata = {"ss_network_module": "networks.lora", **network_dims(modules), "ss_output_name": out.stem}
    for key in ("ss_base_model_version", "ss_v2", "ss_sd_model_name", "modelspec.implementation", "modelspec.resolution", "modelspec.prediction_type"):
        values = {w.adapter.metadata.get(key) for w in inputs}
        if len(values) == 1 and None not in values:
            metadata[key] = values.pop()
    architectures = {w.adapter.metadata.get("modelspec.architecture", "").split("/")[0] for w in inputs}
    if len(architectures) == 1 and (architecture := architectures.pop()):
        metadata.update({"modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": f"{architecture}/lora", "modelspec.title": out.stem, "modelspec.date": iso_now()})
    metadata["ss_training_comment"] = f"merged by sdtrain from {', '.join(map(str, inputs))}: {how}"
    return metadata


# --- adapters into a base model ----------------------------------------------------------------------


def check_model_outputs(outs: list[Path], overwrite: bool) -> None:
    if not outs:
        raise UserError("Merging into a model needs --out: a .safetensors file (single-file checkpoint), a folder (diffusers), or one of each.")
    for out in outs:
        check_output(out, overwrite)


def merge_into_model(
    paths: list[Path], base: str, outs: list[Path], ratios: list[float] | None = None, *, config: str | None = None, dtype: str | None = None,
    overwrite: bool = False,
) -> MergeReport:
    """Apply the adapters to the base model (as the UIs do, in the given order) and write the whole model to each of ``outs``:
    a single file in ``dtype`` (default fp16, what the UIs share), a diffusers folder in float32 (plus ``dtype`` as its variant)."""
    from trainer.models.export import save_diffusers_folder, save_single_file

    outs = [Path(out) for out in outs]
    check_model_outputs(outs, overwrite)
    inputs = read_weighted(paths, ratios)
    model = load_model(base, "Base model", config)
    lines = []
    for weighted in inputs:
        modules = weighted.adapter.modules
        unmatched = lycoris.apply_to_model(weighted.adapter.tensors, model, multiplier=weighted.ratio)
        if len(unmatched) == len(modules):
            raise UserError(
                f"None of the {len(modules)} modules of '{weighted.adapter.path}' matches a layer of '{base}' ({model.family.title}); the adapter "
                f"looks made for {guess_family(modules, weighted.adapter.metadata)}. Merge it into the model it was trained on."
            )
        note = f"; {len(unmatched)} modules match no layer and were skipped, as a UI skips them (e.g. '{unmatched[0]}')" if unmatched else ""
        lines.append(f"Applied {weighted}: {len(modules) - len(unmatched)} modules{note}.")
    merged_from = json.dumps([{"file": w.adapter.path.name, "ratio": w.ratio, "sshs_model_hash": w.adapter.metadata.get("sshs_model_hash", "")} for w in inputs])
    for out in outs:
        if out.suffix.lower() == ".safetensors":
            save_single_file(model, out, dtype=DTYPES[dtype or "fp16"], metadata={"sdtrain_merged_adapters": merged_from, "modelspec.description": f"{model.name} + {', '.join(map(str, inputs))}"})
        else:
            save_diffusers_folder(model, out, save_dtype=dtype or "fp32", replace=overwrite)
    return MergeReport(outs, lines)
