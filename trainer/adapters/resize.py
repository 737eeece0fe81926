"""``sdtrain lora resize``: a LoRA, LoCon or DoRA file at a lower rank, the best approximation there is.

Each module's change dW = alpha / r * up @ down is cut by SVD to the rank the rule picks (a fixed
rank, or per module from its singular values: docs/tools.md#choosing-the-rank), keeping alpha / rank,
so at the full rank the output applies exactly what the input does. A DoRA module keeps its
magnitude vector and has its direction's change resized.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.adapters.files import Module, check_output, floating_dtype, network_dims, read_adapter, save_adapter
from trainer.adapters.lowrank import RankRule, Truncation, dense_delta, has_kernel, is_factored_lora, product_svd, truncate, truncate_dense, weight_shape
from trainer.errors import UserError
from trainer.formats import lycoris


@dataclass
class ModuleResize:
    name: str
    old_rank: int
    new_rank: int
    kept_fro_share: float  # ||kept change|| / ||change||


@dataclass
class ResizeReport:
    output: Path
    modules: list[ModuleResize]

    def text(self) -> str:
        width = max(len(m.name) for m in self.modules)
        lines = [f"{'module'.ljust(width)}  rank      kept (Frobenius)"]
        lines += [f"{m.name.ljust(width)}  {m.old_rank:>3} -> {m.new_rank:<3}  {100 * m.kept_fro_share:6.2f}%" for m in self.modules]
        shares = [m.kept_fro_share for m in self.modules]
        lines.append(
            f"{len(self.modules)} modules; kept share of each module's change: mean {100 * sum(shares) / len(shares):.2f}%, lowest {100 * min(shares):.2f}%"
        )
        lines.append(f"Wrote {self.output}")
        return "\n".join(lines)


def resize_module(module: Module, rule: RankRule) -> tuple[Module, Truncation]:
    """The module at the rank ``rule`` picks (never above its own), with the same alpha / rank."""
    old_rank = module["lora_down.weight"].shape[0]
    scale = lycoris.scale_of(module)
    rule = dataclasses.replace(rule, rank=min(rule.rank or old_rank, old_rank))
    unscaled = {suffix: value for suffix, value in module.items() if suffix not in ("alpha", "dora_scale")}
    if is_factored_lora(unscaled):
        down, up = unscaled["lora_down.weight"].float(), unscaled["lora_up.weight"].float()
        shape = torch.Size((up.shape[0], *down.shape[1:]))
        cut = truncate(*product_svd(up.flatten(1), down.flatten(1)), shape, rule)
    else:  # a Tucker core: the (unscaled) change in full
        cut = truncate_dense(dense_delta(unscaled), rule)
    resized = {"lora_down.weight": cut.down, "lora_up.weight": cut.up, "alpha": scale * cut.rank}
    if "dora_scale" in module:
        resized["dora_scale"] = module["dora_scale"]
    return resized, cut


def resize(src: Path, dst: Path, rule: RankRule, conv_rank: int | None = None, dtype: torch.dtype | None = None, overwrite: bool = False) -> ResizeReport:
    """Write ``src`` resized to ``dst``; ``conv_rank`` is the rank (or the cap) of 3x3 convolutions (default: the rule's)."""
    check_output(dst, overwrite)
    adapter = read_adapter(src, "Input")
    modules = adapter.modules
    other = {name: lycoris.algo_of(m) for name, m in modules.items() if lycoris.algo_of(m) != lycoris.LOCON}
    if other:
        name, algo = next(iter(other.items()))
        raise UserError(
            f"Input '{src}' has {len(other)} modules that are no LoRA/LoCon/DoRA (e.g. '{name}': {algo or 'unknown'}); resize cuts "
            "lora_down/lora_up ranks. To turn any adapter into a LoRA of a chosen rank, use 'sdtrain lora merge FILE --rank R --out OUT'."
        )
    conv_rule = rule if conv_rank is None else dataclasses.replace(rule, rank=conv_rank)
    resized, report = {}, []
    for name, module in modules.items():
        resized[name], cut = resize_module(module, conv_rule if has_kernel(weight_shape(module)) else rule)
        report.append(ModuleResize(name, module["lora_down.weight"].shape[0], cut.rank, cut.kept_fro_share))
    metadata = dict(adapter.metadata)
    metadata.update(network_dims(resized))
    old = sorted({m.old_rank for m in report})
    how = describe_rule(rule, conv_rank)
    comment = metadata.get("ss_training_comment", "")
    metadata["ss_training_comment"] = f"resized by sdtrain from rank {'/'.join(map(str, old))} ({how})" + (f"; {comment}" if comment and comment != "None" else "")
    save_adapter(dst, resized, metadata, dtype or floating_dtype(adapter.tensors))
    return ResizeReport(Path(dst), report)


def describe_rule(rule: RankRule, conv_rank: int | None = None) -> str:
    parts = [f"{key.replace('_', '-')} {value:g}" for key, value in dataclasses.asdict(rule).items() if value is not None and key != "rank"]
    if rule.rank is not None:
        parts.append(f"{'max ' if rule.dynamic else ''}rank {rule.rank}")
    if conv_rank is not None:
        parts.append(f"conv rank {conv_rank}")
    return ", ".join(parts)
