"""``sdtrain lora inspect|resize|extract|merge``: exact math, checked against float64 references and the
UIs' own way of applying adapters (``ui_weight`` in tests/test_lycoris.py, written from AUTOMATIC1111
and ComfyUI independently of trainer/formats/lycoris.py).

Adapters are built here with random tensors on the built-in tiny models (SD1 ``tiny`` and ``tiny-sdxl``),
so every module has a large change and alpha differs from the rank.

SVD tolerances: a Householder-based SVD of an m x n matrix is backward stable, the computed factors
being exact for a matrix within a rounding of each entry per reflection or rotation sweep applied to
it; with min(m, n) reflections on each side and as many sweeps of the iterative phase, ``depth`` is
3 * min(m, n) plus the few products around it (4: the factors' square roots, up @ down, alpha / rank,
the comparison), and ``terms`` the longest vector a reflection spans, max(m, n) (tests/tolerances.py).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tests.test_lycoris import adapted_rounding, ui_updown, ui_weight
from tests.tolerances import FP32, Rounding, assert_close_in_norm
from trainer.adapters.files import save_adapter
from trainer.adapters.lowrank import RankRule
from trainer.adapters.resize import resize
from trainer.cli import main
from trainer.formats import lycoris as lycoris_format
from trainer.formats.safetensors_file import read_metadata
from trainer.methods.lycoris.config import LycorisConfig
from trainer.methods.lycoris.method import PRESETS, add_adapters
from trainer.models.conditioning import ImageGeometry
from trainer.models.export import save_diffusers_folder
from trainer.models.loading import load_base_model


@pytest.fixture(scope="module")
def tiny():
    return load_base_model("tiny")


@pytest.fixture(scope="module")
def tiny_sdxl():
    return load_base_model("tiny-sdxl")


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def svd_rounding(shape, rank: int | None = None) -> Rounding:
    """The rounding of an SVD cut (module docstring); ``rank``: the factored path's small core instead of the whole matrix."""
    shape = (shape[0], math.prod(shape[1:]))
    return Rounding(unit=FP32, terms=max(shape), depth=3 * (rank or min(shape)) + 4)


def delta_of(module: dict, shape) -> torch.Tensor:
    """The module's weight change in float64, rebuilt as the UIs rebuild it (base-independent algorithms)."""
    return ui_updown({k: torch.as_tensor(v).double() for k, v in module.items()}, torch.empty(shape, dtype=torch.float64))


# --- adapters with random tensors ------------------------------------------------------------------


def lycoris_tensors(model, seed: int, std: float = 0.05, **config) -> dict[str, torch.Tensor]:
    """A LyCORIS file's tensors for ``model`` (every UNet layer and the text encoders' attention and MLP),
    each trained tensor drawn from N(0, std^2), DoRA's magnitudes moved by about 10%."""
    cfg = LycorisConfig(preset="full", text_encoder=True, **config)
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for component, part in {"unet": model.unet, **model.text_encoder_modules()}.items():
        patterns = PRESETS["full"]["unet" if component == "unet" else "text_encoder"]
        adapters = add_adapters(copy.deepcopy(part), lambda path, c=component: model.kohya_name(c, path), cfg, patterns)
        for name, adapter in adapters.items():
            with torch.no_grad():
                for key, param in adapter.trained.items():
                    noise = torch.randn(param.shape, generator=generator)
                    param.copy_(param * (1 + 0.1 * noise) if key == "dora_scale" else std * noise)
            modules[name] = adapter.file_tensors()
    return lycoris_format.to_state_dict(modules, torch.float32)


def lora_module(out: int, inner: tuple, rank: int, alpha: float, generator: torch.Generator) -> dict:
    down = torch.randn(rank, *inner, generator=generator)
    up = torch.randn(out, rank, *[1] * (len(inner) - 1), generator=generator) / math.sqrt(rank)
    return {"lora_down.weight": down, "lora_up.weight": up, "alpha": alpha}


def with_spectrum(singular_values: list[float], out: int, inner: int, generator: torch.Generator) -> dict:
    """A LoRA module (alpha = rank) whose change has exactly these singular values (orthonormal factors)."""
    rank = len(singular_values)
    u, _ = torch.linalg.qr(torch.randn(out, rank, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inner, rank, generator=generator, dtype=torch.float64))
    s = torch.tensor(singular_values, dtype=torch.float64)
    return {"lora_down.weight": v.T.float().contiguous(), "lora_up.weight": (u * s).float(), "alpha": float(rank)}


# --- resize ------------------------------------------------------------------------------------------


def test_resize_is_the_best_approximation_and_full_rank_reproduces_the_change(tmp_path, capsys):
    generator = torch.Generator().manual_seed(0)
    modules = {
        "lora_unet_down_blocks_0_attentions_0_proj_in": lora_module(24, (40,), rank=12, alpha=3.0, generator=generator),
        "lora_unet_down_blocks_0_resnets_0_conv1": lora_module(16, (8, 3, 3), rank=6, alpha=6.0, generator=generator),
    }
    src = save_adapter(tmp_path / "in.safetensors", modules, {"ss_network_dim": "12", "ss_training_comment": "mine"}, torch.float32)
    code, out, err = _run(capsys, "lora", "resize", src, tmp_path / "r4.safetensors", "--rank", 4, "--conv-rank", 3)
    assert code == 0, err
    assert "kept (Frobenius)" in out and "lora_unet_down_blocks_0_resnets_0_conv1" in out
    resized = lycoris_format.split_modules(load_file(tmp_path / "r4.safetensors"))
    for name, module in modules.items():
        shape = (module["lora_up.weight"].shape[0], *module["lora_down.weight"].shape[1:])
        delta = delta_of(module, shape)
        s = torch.linalg.svdvals(delta.flatten(1))
        rank = 3 if delta.dim() == 4 else 4
        assert resized[name]["lora_down.weight"].shape[0] == rank
        # alpha / rank is kept: the output is scaled as the input was.
        assert resized[name]["alpha"].item() / rank == pytest.approx(module["alpha"] / module["lora_down.weight"].shape[0])
        error = float((delta_of(resized[name], shape) - delta).norm())
        tail = float(s[rank:].norm())
        # Eckart–Young: no rank-r matrix comes closer than the dropped singular values' root-sum-square, and
        # the SVD cut reaches it. Bound 1e-5 of ||dW|| (svd_rounding); cutting one more or one fewer value
        # moves the error by s[r-1] or s[r], 10-20% of ||dW|| here.
        assert abs(error - tail) <= svd_rounding(shape, module["lora_down.weight"].shape[0]).bound * float(delta.norm())
    meta = read_metadata(tmp_path / "r4.safetensors")
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "1.0"  # 3 / 12 * 4
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "3", "conv_alpha": "3.0"}
    assert meta["ss_training_comment"].startswith("resized by sdtrain from rank 6/12") and meta["ss_training_comment"].endswith("; mine")
    # At the full rank the output applies what the input applies.
    resize(src, tmp_path / "full.safetensors", RankRule(rank=12))
    full = lycoris_format.split_modules(load_file(tmp_path / "full.safetensors"))
    for name, module in modules.items():
        shape = (module["lora_up.weight"].shape[0], *module["lora_down.weight"].shape[1:])
        delta = delta_of(module, shape)
        assert full[name]["lora_down.weight"].shape[0] == module["lora_down.weight"].shape[0]
        assert_close_in_norm(delta_of(full[name], shape), delta, svd_rounding(shape, module["lora_down.weight"].shape[0]), what=name)


# Singular values 8, 4, 2, 1, 0.5, 0.25 (sum 15.75, sum of squares 85.3125), and what each rule keeps by its definition:
# sv-ratio 5: those >= 8 / 5 = 1.6: 8, 4, 2 -> 3 (kohya's resize_lora.py keeps one more, 4);
# sv-fro 0.9: squares' shares 0.750, 0.938 >= 0.81 = 0.9^2 -> 2 (kohya: 3);
# sv-cumulative 0.9: sums' shares 0.508, 0.762, 0.889, 0.952 >= 0.9 -> 4 (kohya: 5); with --rank 3 as a cap -> 3.
@pytest.mark.parametrize(
    "rule, expected",
    [
        (RankRule(sv_ratio=5), 3),
        (RankRule(sv_ratio=8.5), 4),
        (RankRule(sv_fro=0.9), 2),
        (RankRule(sv_cumulative=0.9), 4),
        (RankRule(sv_cumulative=0.9, rank=3), 3),
    ],
)
def test_dynamic_rules_pick_the_rank_their_definition_says(tmp_path, rule, expected):
    generator = torch.Generator().manual_seed(1)
    modules = {
        "lora_unet_mid_block_attentions_0_proj_out": with_spectrum([8, 4, 2, 1, 0.5, 0.25], 10, 12, generator),
        # Two equal values: every rule above keeps both (shares 0.5 and 1; the ratio 1).
        "lora_unet_mid_block_attentions_0_proj_in": with_spectrum([1.0, 1.0], 10, 12, generator),
    }
    src = save_adapter(tmp_path / "in.safetensors", modules, {}, torch.float32)
    report = resize(src, tmp_path / "out.safetensors", rule)
    ranks = {m.name: m.new_rank for m in report.modules}
    assert ranks == {"lora_unet_mid_block_attentions_0_proj_out": expected, "lora_unet_mid_block_attentions_0_proj_in": 2}
    # One rank for all modules is kohya's number; different ones are "Dynamic".
    assert read_metadata(tmp_path / "out.safetensors")["ss_network_dim"] == ("Dynamic" if expected != 2 else "2")
    written = lycoris_format.split_modules(load_file(tmp_path / "out.safetensors"))
    assert {name: m["lora_down.weight"].shape[0] for name, m in written.items()} == ranks
    # A change of zero (an untrained module) keeps one zero rank under every rule.
    assert rule.choose(torch.zeros(6)) == 1


# --- merge into a model --------------------------------------------------------------------------------


def ui_applied(model, files: list[tuple[dict, float]]):
    """``model`` with the files applied as AUTOMATIC1111 and ComfyUI apply a stack of adapters: each in turn,
    to the weights the previous ones left (tests/test_lycoris.py's ui_weight)."""
    model = copy.deepcopy(model)
    for tensors, ratio in files:
        modules = lycoris_format.split_modules(tensors)
        for component, part in {"unet": model.unet, **model.text_encoder_modules()}.items():
            for path, layer in part.named_modules():
                module = modules.get(model.kohya_name(component, path)) if isinstance(layer, (nn.Linear, nn.Conv2d)) else None
                if module is None:
                    continue
                with torch.no_grad():
                    weight, bias = ui_weight(module, layer.weight, layer.bias if layer.bias is not None else torch.zeros(layer.weight.shape[0]), ratio)
                    layer.weight.copy_(weight)
                    if "diff_b" in module and layer.bias is None:
                        layer.bias = nn.Parameter(bias)
                    elif layer.bias is not None:
                        layer.bias.copy_(bias)
    return model


def predictions(model) -> tuple[torch.Tensor, torch.Tensor]:
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        text = model.encode_text(["sls frog on a rock"])
        return text.hidden_states, model.predict(latents, torch.tensor([300]), text, [ImageGeometry.square(64)])


# Every algorithm on SD1; a stack with a negative ratio on SDXL (the two text encoders, SGM UNet names).
# The factors' spread: LoHa and LoKr multiply two products of factors, so theirs is larger for a change of
# a few percent of the weights.
LOW_RANK, PRODUCT = 0.05, 0.3
MERGE_CASES = {
    "lora": ("tiny", [(dict(algo="locon", rank=4, alpha=2.0, conv_rank=0), LOW_RANK, 0.7)]),
    "locon": ("tiny", [(dict(algo="locon", rank=4, alpha=2.0, conv_rank=3, conv_alpha=6.0, use_tucker=True), LOW_RANK, 1.0)]),
    "loha": ("tiny", [(dict(algo="loha", rank=2, alpha=3.0), PRODUCT, 0.8)]),
    "lokr": ("tiny", [(dict(algo="lokr", rank=2, alpha=4.0, factor=4, decompose_both=True), PRODUCT, 1.0)]),
    "dora": ("tiny", [(dict(algo="dora", rank=3, alpha=1.5, conv_rank=2, conv_alpha=5.0), LOW_RANK, 0.6)]),
    "sdxl_lora_minus_loha": ("tiny-sdxl", [(dict(algo="locon", rank=4, alpha=2.0), LOW_RANK, 1.0), (dict(algo="loha", rank=2, alpha=3.0), PRODUCT, -0.5)]),
}


@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_merge_into_model_equals_the_uis_runtime_application(case, tmp_path, capsys, request):
    base_name, specs = MERGE_CASES[case]
    base = request.getfixturevalue("tiny" if base_name == "tiny" else "tiny_sdxl")
    files, paths = [], []
    for index, (config, std, ratio) in enumerate(specs):
        tensors = lycoris_tensors(base, seed=index, std=std, **config)
        paths.append(tmp_path / f"adapter{index}.safetensors")
        save_file(tensors, paths[-1])
        files.append((tensors, ratio))
    ratios = ["--ratios", *[str(ratio) for *_, ratio in specs]]
    code, out, err = _run(capsys, "lora", "merge", *paths, *ratios, "--base", base_name, "--out", tmp_path / "merged", "--dtype", "fp32")
    assert code == 0, err
    merged = load_base_model(str(tmp_path / "merged"))
    expected, unchanged = predictions(ui_applied(base, files)), predictions(base)
    for actual, wanted, before, network, what in zip(predictions(merged), expected, unchanged, (merged.text_encoders[-1].model, merged.unet), ("text states", "UNet prediction")):
        # Both models hold W0 + ratio * dW computed two ways in float32 and then run the same forward pass:
        # the bound of merged-against-adapter models (tests/test_lycoris.py, adapted_rounding), 1e-5 to 1e-4.
        # Leaving an adapter out, or applying it at another ratio, moves the outputs by 1% or more of their norm.
        assert_close_in_norm(actual, wanted, adapted_rounding(network), what=what)
        assert float((wanted - before).norm()) > 0.01 * float(wanted.norm())


def test_merge_into_a_single_file_loads_as_that_model(tiny, tmp_path, capsys):
    tensors = lycoris_tensors(tiny, seed=5, algo="locon", rank=2, alpha=1.0)
    save_file(tensors, tmp_path / "a.safetensors")
    save_diffusers_folder(tiny, tmp_path / "tiny")
    code, out, err = _run(capsys, "lora", "merge", tmp_path / "a.safetensors", "--base", tmp_path / "tiny", "--out", tmp_path / "m.safetensors", "--dtype", "fp32")
    assert code == 0, err
    single = load_base_model(str(tmp_path / "m.safetensors"), config=str(tmp_path / "tiny"))
    reference = ui_applied(tiny, [(tensors, 1.0)])
    for actual, wanted, network in zip(predictions(single), predictions(reference), (single.text_encoders[0].model, single.unet)):
        assert_close_in_norm(actual, wanted, adapted_rounding(network))
    merged_from = json.loads(read_metadata(tmp_path / "m.safetensors")["sdtrain_merged_adapters"])
    assert merged_from == [{"file": "a.safetensors", "ratio": 1.0, "sshs_model_hash": ""}]


# --- several adapters into one ----------------------------------------------------------------------------


def test_merge_adapters_svd_is_the_exact_sum_at_full_rank_and_concat_is_exact(tmp_path, capsys):
    generator = torch.Generator().manual_seed(3)
    linear, conv = "lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_down_blocks_0_resnets_0_conv1"
    a = {linear: lora_module(12, (10,), 3, 1.5, generator), conv: lora_module(8, (6, 3, 3), 2, 4.0, generator)}
    b = {linear: lora_module(12, (10,), 4, 4.0, generator), conv: lora_module(8, (6, 3, 3), 3, 1.0, generator)}
    hada = {"hada_w1_a": torch.randn(12, 2, generator=generator), "hada_w1_b": torch.randn(2, 10, generator=generator),
            "hada_w2_a": torch.randn(12, 2, generator=generator), "hada_w2_b": torch.randn(2, 10, generator=generator), "alpha": 1.0}
    c = {linear: hada}  # a LoHa on one of the layers, nothing on the other
    paths = [save_adapter(tmp_path / f"{n}.safetensors", m, {"ss_base_model_version": "sd_v1"}, torch.float32) for n, m in (("a", a), ("b", b), ("c", c))]
    shapes = {linear: (12, 10), conv: (8, 6, 3, 3)}

    def true_sum(name: str, parts) -> torch.Tensor:
        return sum(ratio * delta_of(m[name], shapes[name]) for m, ratio in parts if name in m)

    code, out, err = _run(capsys, "lora", "merge", *paths, "--ratios", "1", "-0.5", "0.25", "--rank", "64", "--out", tmp_path / "svd.safetensors")
    assert code == 0, err
    merged = lycoris_format.split_modules(load_file(tmp_path / "svd.safetensors"))
    # The rank is capped at what the sum can have: min(out, in * k) with the LoHa in it (linear: 10), the
    # sum of the ranks for LoRAs alone (conv: 2 + 3).
    for name, rank in ((linear, 10), (conv, 5)):
        expected = true_sum(name, [(a, 1.0), (b, -0.5), (c, 0.25)])
        assert merged[name]["lora_down.weight"].shape[0] == rank
        assert_close_in_norm(delta_of(merged[name], shapes[name]), expected, svd_rounding(shapes[name]), what=name)
    assert read_metadata(tmp_path / "svd.safetensors")["ss_base_model_version"] == "sd_v1"
    # At a lower rank: the best approximation of the sum (Eckart–Young), as for resize.
    code, out, err = _run(capsys, "lora", "merge", *paths[:2], "--ratios", "1", "-0.5", "--rank", "2", "--out", tmp_path / "svd2.safetensors")
    assert code == 0, err
    low = lycoris_format.split_modules(load_file(tmp_path / "svd2.safetensors"))
    for name, shape in shapes.items():
        expected = true_sum(name, [(a, 1.0), (b, -0.5)])
        tail = float(torch.linalg.svdvals(expected.flatten(1))[2:].norm())
        assert abs(float((delta_of(low[name], shape) - expected).norm()) - tail) <= svd_rounding(shape).bound * float(expected.norm())
    # Concatenation: ranks add up, and the change is the sum (one rounding each: the ratio folded into up).
    code, out, err = _run(capsys, "lora", "merge", *paths[:2], "--ratios", "1", "-0.5", "--mode", "concat", "--out", tmp_path / "cat.safetensors")
    assert code == 0, err
    cat = lycoris_format.split_modules(load_file(tmp_path / "cat.safetensors"))
    for name, shape in shapes.items():
        assert cat[name]["lora_down.weight"].shape[0] == a[name]["lora_down.weight"].shape[0] + b[name]["lora_down.weight"].shape[0]
        expected = true_sum(name, [(a, 1.0), (b, -0.5)])
        # up @ down sums 7 products after one rounding of each factor: 3 roundings deep, 7 terms.
        assert_close_in_norm(delta_of(cat[name], shape), expected, Rounding(FP32, terms=7, depth=3), scale=float(sum(delta_of(m[name], shape).norm() for m in (a, b))), what=name)
    meta = read_metadata(tmp_path / "cat.safetensors")
    # One linear module of rank 3 + 4 and one convolution of rank 2 + 3: kohya's dim and conv_dim, alpha = rank.
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_network_module"]) == ("7", "7.0", "networks.lora")
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "5", "conv_alpha": "5.0"}
    assert meta["sshs_model_hash"]


# --- extract -------------------------------------------------------------------------------------------


def _first(part: nn.Module, suffix: str) -> str:
    return next(path for path, _ in part.named_modules() if path.endswith(suffix))


@pytest.mark.parametrize("base_name", ["tiny", "tiny-sdxl"])
def test_extract_recovers_a_planted_low_rank_change_and_skips_unchanged_text_encoders(base_name, tmp_path, capsys, request):
    base = request.getfixturevalue("tiny" if base_name == "tiny" else "tiny_sdxl")
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(4)
    # (component, path, rank): two transformer layers at rank 3, a 3x3 ResNet convolution at rank 2, and on
    # SDXL one layer of the second text encoder (the first stays as it was).
    planted = [("unet", _first(base.unet, "attn1.to_q"), 3), ("unet", _first(base.unet, "ff.net.2"), 3), ("unet", _first(base.unet, "resnets.0.conv1"), 2)]
    if base_name == "tiny-sdxl":
        planted.append(("text_encoder_2", _first(base.text_encoders[1].model, "layers.1.mlp.fc1"), 3))
    changes = {}
    for component, path, rank in planted:
        layer = tuned.parts()[component].get_submodule(path)
        shape = layer.weight.shape
        change = torch.randn(shape[0], rank, generator=generator) @ torch.randn(rank, math.prod(shape[1:]), generator=generator)
        change = (0.1 * layer.weight.norm() / change.norm() * change).reshape(shape)
        with torch.no_grad():
            layer.weight += change
        changes[base.kohya_name(component, path)] = (change, layer.weight.detach().clone(), base.parts()[component].get_submodule(path).weight)
    save_diffusers_folder(tuned, tmp_path / "tuned")
    code, out, err = _run(capsys, "lora", "extract", tmp_path / "tuned", base_name, tmp_path / "x.safetensors", "--rank", 3, "--conv-rank", 2, "--dtype", "fp32")
    assert code == 0, err
    modules = lycoris_format.split_modules(load_file(tmp_path / "x.safetensors"))
    # Only what changed: the unchanged layers and text encoders are left out.
    assert set(modules) == set(changes)
    assert "text_encoder: unchanged" in out
    for name, (change, tuned_weight, base_weight) in changes.items():
        extracted = delta_of(modules[name], change.shape)
        # The tuned weight holds W0 + P rounded (relative FP32 per entry), so the layer's true change differs
        # from P by at most FP32 * ||W0 + P||; the rank-r cut lies as close to it again (Eckart–Young) plus the
        # SVD's rounding of the whole matrix (svd_rounding), relative to ||W0|| + ||P||. Bound about 1e-4 of
        # that; a rank too low or a component lost moves the result by a third of ||P||, 3% of it.
        scale = float(base_weight.norm() + change.norm())
        assert_close_in_norm(extracted, change, svd_rounding(change.shape), scale=scale, what=name)
        assert modules[name]["lora_down.weight"].shape[0] == (2 if change.dim() == 4 and change.shape[2:] != (1, 1) else 3)
    meta = read_metadata(tmp_path / "x.safetensors")
    architecture = "stable-diffusion-v1/lora" if base_name == "tiny" else "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.architecture"] == architecture and meta["ss_network_dim"] == "3"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2.0"}
    # inspect reads it as an adapter of that family, with a hash that matches its tensors.
    code, out, err = _run(capsys, "lora", "inspect", "--json", tmp_path / "x.safetensors")
    report = json.loads(out)
    assert report["family"] == ("SD1" if base_name == "tiny" else "SDXL") and report["hash_check"] == "matches"


def test_extract_clamping_reports_the_error_it_adds(tiny, tmp_path, capsys):
    tuned = copy.deepcopy(tiny)
    path = _first(tiny.unet, "attn2.to_k")
    with torch.no_grad():
        layer = tuned.unet.get_submodule(path)
        layer.weight += 0.05 * torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(6))
    save_diffusers_folder(tuned, tmp_path / "tuned")
    code, out, err = _run(capsys, "lora", "extract", tmp_path / "tuned", "tiny", tmp_path / "x.safetensors", "--rank", 4, "--clamp-quantile", 0.9)
    assert code == 0, err
    assert "Clamping at the 0.9 quantile added an error of" in out
    module = lycoris_format.split_modules(load_file(tmp_path / "x.safetensors"))[tiny.kohya_name("unet", path)]
    # Clamped: at least a tenth of the factors' entries sit at the same largest magnitude.
    entries = torch.cat([module["lora_up.weight"].flatten(), module["lora_down.weight"].flatten()]).abs().float()
    assert (entries == entries.max()).float().mean() >= 0.1 - 1 / len(entries)


# --- inspect ---------------------------------------------------------------------------------------------


def test_inspect_reports_format_family_ranks_metadata_hash_and_problems(tiny, tiny_sdxl, tmp_path, capsys):
    generator = torch.Generator().manual_seed(7)
    modules = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": lora_module(32, (32,), 4, 2.0, generator),
        "lora_unet_down_blocks_0_resnets_0_conv1": lora_module(32, (32, 3, 3), 2, 1.0, generator),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": lora_module(64, (64,), 4, 2.0, generator),
        "lora_te_text_model_encoder_layers_0_mlp_fc1": lora_module(256, (64,), 4, 2.0, generator),
    }
    modules["lora_te_text_model_encoder_layers_0_mlp_fc1"]["lora_up.weight"].zero_()
    metadata = {"ss_base_model_version": "sd_v1", "ss_network_dim": "4", "ss_tag_frequency": json.dumps({"10_sls frog": {"sls frog": 12, "crown": 3, "pond": 7}})}
    path = save_adapter(tmp_path / "a.safetensors", modules, metadata, torch.float16)
    code, out, err = _run(capsys, "lora", "inspect", "--json", path)
    assert code == 0, err
    report = json.loads(out)
    assert (report["format"], report["family"], report["dtypes"]) == ("LoCon", "SD1", ["float16"])
    assert report["parts"]["UNet"] == {"modules": 2, "ranks": {"2": 1, "4": 1}, "alphas": [1.0, 2.0]}
    assert report["parts"]["TE"]["modules"] == 2
    assert report["trigger_words"][:3] == ["sls frog", "pond", "crown"]
    assert report["hash_check"] == "matches"
    assert any("all-zero lora_up" in p and "mlp_fc1" in p for p in report["problems"])
    assert not any("NaN" in p for p in report["problems"])
    # A NaN, and tensors changed after the hash was written (the stored hash kept).
    tensors = load_file(path)
    tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"][0, 0, 0, 0] = float("nan")
    # A text-encoder name without text_model (what transformers 5's module tree gives): no UI matches it.
    tensors.update({f"lora_te_encoder_layers_0_self_attn_q_proj.{k}": torch.as_tensor(v) for k, v in lora_module(64, (64,), 4, 2.0, generator).items()})
    save_file(tensors, tmp_path / "b.safetensors", metadata=read_metadata(path))
    code, out, err = _run(capsys, "lora", "inspect", tmp_path / "b.safetensors")
    assert code == 0, err
    assert "NaN or Inf" in out and "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in out
    assert "sshs_model_hash: differs" in out
    assert "lack 'text_model'" in out and "lora_te_encoder_layers_0_self_attn_q_proj" in out
    # SDXL: told by its two text encoders' names, parts TE1 and TE2; a LoHa is a LoHa.
    save_file(lycoris_tensors(tiny_sdxl, seed=8, algo="loha", rank=2, alpha=1.0), tmp_path / "xl.safetensors")
    report = json.loads(_run(capsys, "lora", "inspect", "--json", tmp_path / "xl.safetensors")[1])
    assert (report["format"], report["family"], report["hash_check"]) == ("LoHa", "SDXL", "not stored")
    assert set(report["parts"]) == {"UNet", "TE1", "TE2"}
    assert any(note.startswith("diffusers:") for note in report["ui_notes"])
    # diffusers' own layout (peft names under the pipeline's parts) is told apart and read too.
    peft = {"unet.mid_block.attentions.0.proj_in.lora_A.weight": torch.ones(2, 8), "unet.mid_block.attentions.0.proj_in.lora_B.weight": torch.zeros(8, 2)}
    save_file(peft, tmp_path / "peft.safetensors")
    report = json.loads(_run(capsys, "lora", "inspect", "--json", tmp_path / "peft.safetensors")[1])
    assert report["format"] == "LoRA (diffusers/peft layout)" and report["parts"]["UNet"]["ranks"] == {"2": 1}
    assert any("all-zero lora_B" in p for p in report["problems"])


# --- bad input -----------------------------------------------------------------------------------------------


def _lora_file(path, generator_seed: int = 0, **extra_modules):
    generator = torch.Generator().manual_seed(generator_seed)
    return save_adapter(path, {"lora_unet_mid_block_attentions_0_proj_in": lora_module(8, (8,), 2, 1.0, generator), **extra_modules}, {}, torch.float32)


@pytest.mark.parametrize(
    "setup, argv, expected",
    [
        ("none", ["inspect", "{tmp}/missing.safetensors"], "'{tmp}/missing.safetensors' does not exist"),
        ("pickle", ["inspect", "{tmp}/lora.pt"], "not a .safetensors file"),
        ("peft", ["resize", "{tmp}/peft.safetensors", "{tmp}/out.safetensors", "--rank", "1"], "diffusers/peft layout"),
        ("model", ["inspect", "{tmp}/model.safetensors"], "a whole model checkpoint"),
        ("broken", ["inspect", "{tmp}/broken.safetensors"], "cannot be read as a safetensors file"),
        ("lora", ["resize", "{tmp}/a.safetensors", "{tmp}/a.safetensors", "--rank", "1"], "add --overwrite"),
        ("lora", ["resize", "{tmp}/a.safetensors", "{tmp}/out.safetensors"], "needs the rank to keep"),
        ("lora", ["merge", "{tmp}/a.safetensors", "--out", "{tmp}/a.safetensors", "--rank", "1"], "add --overwrite"),
        ("lora", ["merge", "{tmp}/a.safetensors", "--out", "{tmp}/out.safetensors"], "needs the rank to keep"),
        ("lora", ["merge", "{tmp}/a.safetensors", "--mode", "concat", "--rank", "2", "--out", "{tmp}/o.safetensors"], "--mode concat keeps every rank"),
        ("lora", ["merge", "{tmp}/a.safetensors", "--ratios", "1", "2", "--out", "{tmp}/o.safetensors", "--rank", "1"], "2 values for 1 adapters"),
        ("loha", ["merge", "{tmp}/loha.safetensors", "--mode", "concat", "--out", "{tmp}/o.safetensors"], "Use --mode svd"),
        ("loha", ["resize", "{tmp}/loha.safetensors", "{tmp}/o.safetensors", "--rank", "1"], "no LoRA/LoCon/DoRA"),
        ("dora", ["merge", "{tmp}/dora.safetensors", "--out", "{tmp}/o.safetensors", "--rank", "1"], "Merge it into a model instead"),
        ("families", ["merge", "{tmp}/a.safetensors", "{tmp}/xl.safetensors", "--out", "{tmp}/o.safetensors", "--rank", "1"], "different model families"),
        ("families", ["merge", "{tmp}/xl.safetensors", "--base", "tiny", "--out", "{tmp}/m"], "looks made for SDXL"),
        ("lora", ["extract", "{tmp}/nowhere", "tiny", "{tmp}/x.safetensors", "--rank", "2"], "Tuned model '{tmp}/nowhere' does not exist"),
        ("lora", ["extract", "tiny", "tiny", "{tmp}/x.safetensors", "--rank", "2"], "nothing to extract"),
    ],
)
def test_bad_input_is_one_clear_paragraph_exit_2(setup, argv, expected, tmp_path, capsys):
    generator = torch.Generator().manual_seed(9)
    if setup == "pickle":
        torch.save({"x": torch.zeros(1)}, tmp_path / "lora.pt")
    if setup == "peft":
        save_file({"unet.mid_block.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 8)}, tmp_path / "peft.safetensors")
    if setup == "model":
        save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, tmp_path / "model.safetensors")
    if setup == "broken":
        (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    if setup in ("lora", "families"):
        _lora_file(tmp_path / "a.safetensors")
    if setup == "families":
        save_adapter(tmp_path / "xl.safetensors", {"lora_te2_text_model_encoder_layers_0_mlp_fc1": lora_module(8, (8,), 2, 1.0, generator)}, {}, torch.float32)
    if setup == "loha":
        hada = {"hada_w1_a": torch.ones(4, 2), "hada_w1_b": torch.ones(2, 4), "hada_w2_a": torch.ones(4, 2), "hada_w2_b": torch.ones(2, 4), "alpha": 1.0}
        save_adapter(tmp_path / "loha.safetensors", {"lora_unet_mid_block_attentions_0_proj_in": hada}, {}, torch.float32)
    if setup == "dora":
        dora = {**lora_module(8, (8,), 2, 1.0, generator), "dora_scale": torch.ones(1, 8)}
        save_adapter(tmp_path / "dora.safetensors", {"lora_unet_mid_block_attentions_0_proj_in": dora}, {}, torch.float32)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    code, out, err = _run(capsys, "lora", *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 2
    assert expected.replace("{tmp}", str(tmp_path)) in err and "Traceback" not in err
    assert err.startswith("error: ") and err.count("\n") == 1  # one paragraph
    # Nothing was written or replaced.
    assert {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before


def test_overwrite_replaces_an_existing_output(tmp_path, capsys):
    src = _lora_file(tmp_path / "a.safetensors")
    _lora_file(tmp_path / "out.safetensors", generator_seed=1)
    code, out, err = _run(capsys, "lora", "resize", src, tmp_path / "out.safetensors", "--rank", "1", "--overwrite")
    assert code == 0, err
    assert load_file(tmp_path / "out.safetensors")["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].shape[0] == 1
