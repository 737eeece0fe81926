"""LyCORIS end to end: for every algorithm the file holds exactly the weight change that trained.

The weight change is rebuilt from the saved tensors by ``ui_weight`` below, written from
AUTOMATIC1111 (extensions-builtin/Lora/network_*.py) and ComfyUI (comfy/weight_adapter/*.py) as
described in docs/formats.md#lycoris-tensors-per-algorithm and docs/formats.md#dora-magnitude, independently of
trainer/formats/lycoris.py. The trained adapter's effective change is observed through its own
forward pass: adapter(x) - base(x) must equal op(x, W' - W0) (+ b' - b0) for random x, which for
Linear and Conv2d layers pins down W' exactly.
"""

from __future__ import annotations

import copy
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from tests.conftest import REPO, fast_overrides
from tests.tolerances import FP32, FP64, Rounding, assert_close_in_norm, layer_rounding
from trainer.checkpoint import resolve_checkpoint
from trainer.errors import UserError
from trainer.formats import lycoris as lycoris_format
from trainer.formats.kohya_lora import UNET_PREFIX, kohya_name
from trainer.formats.safetensors_file import read_metadata
from trainer.loop import train
from trainer.methods.lycoris.config import LycorisConfig
from trainer.methods.lycoris.method import LycorisMethod, add_adapters
from trainer.methods.lycoris.modules import factorization
from trainer.models.loading import load_base_model
from trainer.recipe import load_recipe

# name -> (recipe, overrides, the consumers the export warns about): each algorithm family's recipe,
# and the variants whose tensors differ. Dropout variants also check that resume restores its RNG.
VARIANTS = {
    # preset full: 3x3 convs, conv_in/out, time embedding; and the text encoder.
    "locon": ("lycoris_locon.yaml", {}, set()),
    "locon_tucker": ("lycoris_locon.yaml", {"lycoris.use_tucker": True, "lycoris.dropout": 0.1, "lycoris.rank_dropout": 0.2}, {"diffusers"}),
    "loha_tucker": ("lycoris_loha.yaml", {"lycoris.use_tucker": True, "lycoris.rank_dropout": 0.2}, {"diffusers"}),
    "lokr": ("lycoris_lokr.yaml", {"lycoris.rank": 1, "lycoris.factor": -1, "lycoris.decompose_both": True, "lycoris.use_tucker": True}, {"ComfyUI", "diffusers"}),
    "dora": ("lycoris_dora.yaml", {"lycoris.preset": "full"}, {"diffusers"}),
    "ia3": ("lycoris_ia3.yaml", {}, {"ComfyUI", "diffusers"}),
    "full": ("lycoris_full.yaml", {"lycoris.text_encoder": True}, {"diffusers"}),
}
STEPS, CHECKPOINT_STEP = 2, 1


def _recipe(variant: str, out):
    recipe_file, overrides, _ = VARIANTS[variant]
    common = {
        "train.max_steps": STEPS,
        "train.batch_size": 1,
        "train.save_every_steps": CHECKPOINT_STEP,
        "train.keep_checkpoints": 5,
        "output.save_dtype": "fp32",
    }
    return load_recipe(REPO / "recipes" / recipe_file, fast_overrides(out, **common, **overrides))


# --- what AUTOMATIC1111 and ComfyUI compute (docs/formats.md#lycoris) -----------------------------------


def _cp(core, w_a, w_b):
    # A1111 lyco_helpers.make_weight_cp / ComfyUI tucker_weight: core [r, r, k, k], w_a [r, out], w_b [r, in].
    temp = torch.einsum("i j k l, j r -> i r k l", core, w_b)
    return torch.einsum("i j k l, i r -> r j k l", temp, w_a)


def ui_updown(t: dict, weight: torch.Tensor) -> torch.Tensor:
    """The weight change at strength 1 before DoRA (A1111 calc_updown + finalize_updown's scale)."""
    alpha = t["alpha"].item() if "alpha" in t else None
    if "lora_down.weight" in t:  # network_lora.py; Tucker: docs/formats.md#lora-tensors-and-scale
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        if "lora_mid.weight" in t:
            updown = torch.einsum("n m k l, i n, m j -> i j k l", t["lora_mid.weight"], up.flatten(1), down.flatten(1))
        else:
            updown = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
        return updown * (alpha / down.shape[0] if alpha is not None else 1.0)
    if "hada_w1_a" in t:  # network_hada.py: dim = hada_w1_b.shape[0]
        if "hada_t1" in t:
            w1 = _cp(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
            w2 = _cp(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
        else:
            w1, w2 = t["hada_w1_a"] @ t["hada_w1_b"], t["hada_w2_a"] @ t["hada_w2_b"]
        return (w1 * w2).reshape(weight.shape) * (alpha / t["hada_w1_b"].shape[0])
    if "lokr_w1" in t or "lokr_w1_a" in t:  # network_lokr.py / ComfyUI lokr.py: dim from whichever factor is low-rank
        dim = None
        if "lokr_w1" in t:
            w1 = t["lokr_w1"]
        else:
            w1, dim = t["lokr_w1_a"] @ t["lokr_w1_b"], t["lokr_w1_b"].shape[0]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        else:
            dim = t["lokr_w2_b"].shape[0]
            w2 = _cp(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"]) if "lokr_t2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        updown = torch.kron(w1, w2.contiguous()).reshape(weight.shape)
        return updown * (alpha / dim if dim is not None and alpha is not None else 1.0)
    if "on_input" in t:  # network_ia3.py (Linear layers)
        w = t["weight"] if t["on_input"].item() else t["weight"].reshape(-1, 1)
        return weight * w
    return t["diff"]  # network_full.py


def ui_weight(t: dict, weight: torch.Tensor, bias: torch.Tensor | None, multiplier: float):
    updown = ui_updown(t, weight)
    if "dora_scale" in t:  # A1111 network.py apply_weight_decompose (per input column)
        merged = updown + weight
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(merged.shape[1], *[1] * (weight.dim() - 1)).transpose(0, 1)
        updown = merged * (t["dora_scale"] / norm) - weight
    if "diff_b" in t:
        bias = bias + multiplier * t["diff_b"]
    return weight + multiplier * updown, bias


def _op(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, weight, bias)


def _random_input(layer: nn.Module, generator: torch.Generator) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return torch.randn(2, layer.in_channels, 8, 8, generator=generator, dtype=torch.float64)
    return torch.randn(3, layer.in_features, generator=generator, dtype=torch.float64)


def rebuild_rounding(layer: nn.Module, unit: float) -> Rounding:
    """Rounding of a weight change rebuilt and applied two ways (the adapter's own pass, the UI formula).

    The longest chain is DoRA with Tucker, 12 operations: the Tucker einsum (2), alpha's scale, W0 + dW,
    the column norm, m / norm, the rescale, - W0, W0 + multiplier * dW (2), and the layer's op or the
    comparison's - W0. The longest sum is the op's (in x kernel) or the column norm's (out x kernel).
    """
    return Rounding(unit=unit, terms=max(layer.weight.shape[:2]) * layer.weight[0, 0].numel(), depth=12)


def merge_scale(before: torch.Tensor, after: torch.Tensor) -> float:
    """The magnitudes a merge W0 + multiplier * dW rounds at: the base weight's and the change's."""
    return float(before.detach().norm() + (after - before).detach().norm())


def assert_file_matches_adapters(adapters: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Every adapter's forward change equals the UI rebuild of its saved tensors, up to float64 rounding."""
    modules = lycoris_format.split_modules(tensors)
    assert set(modules) == set(adapters)
    generator = torch.Generator().manual_seed(0)
    for name, adapter in adapters.items():
        adapter = copy.deepcopy(adapter).double().eval()
        base = adapter.base
        saved = {suffix: value.double() for suffix, value in modules[name].items()}
        weight, new_bias = ui_weight(saved, base.weight, base.bias, 1.0)
        x = _random_input(base, generator)
        with torch.no_grad():
            trained_change = adapter(x) - base(x)
            ui_change = _op(base, x, weight - base.weight, None if new_bias is None else new_bias - (base.bias if base.bias is not None else 0))
        # Both sides subtract the base layer's output (or W0), so the rounding is relative to it as well as
        # to the change: in float64 a bound of 2e-14 to 1e-13 of that, measured 2e-15 at most. A change
        # rebuilt wrong (alpha / rank off, a factor transposed, a module left out) moves it by its whole
        # size: 2.5e-8 of that magnitude for the least trained module of the 2-step runs, 0.28 on the toy layers.
        scale = float(base(x).norm() + ui_change.norm())
        assert_close_in_norm(trained_change, ui_change, rebuild_rounding(base, FP64), scale=scale, what=name)


# --- trained runs ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    """The built-in base model, loaded once; tests change copies of it."""
    return load_base_model("tiny")


@pytest.fixture(scope="module", params=list(VARIANTS))
def run(request, tmp_path_factory, tiny):
    out = tmp_path_factory.mktemp(request.param)
    recipe = _recipe(request.param, out)
    result = train(recipe, show_progress=False)
    # The trained adapters, rebuilt from the final checkpoint (exactly what the loop trained).
    method = LycorisMethod(recipe, copy.deepcopy(tiny))
    method.setup()
    method.load_trainable_state_dict(load_file(resolve_checkpoint(out, "latest") / "trainable.safetensors"))
    method.model.unet.eval()
    method.model.text_encoders[0].model.eval()
    return request.param, recipe, result, method


def test_saved_tensors_rebuild_the_trained_change(run):
    variant, recipe, result, method = run
    tensors = load_file(result.artifacts[0])
    assert_file_matches_adapters(method.adapters, tensors)
    # Training moved every algorithm away from its zero change, so the equality is not trivial.
    modules = lycoris_format.split_modules(tensors)
    changes = [(ui_weight(modules[n], a.base.weight, a.base.bias, 1.0)[0] - a.base.weight).abs().max().item() for n, a in method.adapters.items()]
    assert min(changes) > 0 and max(changes) > 1e-4
    if variant in ("locon", "dora"):
        conv3x3 = [n for n, a in method.adapters.items() if isinstance(a.base, nn.Conv2d) and a.base.kernel_size == (3, 3)]
        assert "lora_unet_down_blocks_0_resnets_0_conv1" in conv3x3 and "lora_unet_conv_in" in conv3x3
        assert "lora_unet_time_embedding_linear_1" in method.adapters
        assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (4, 32, 3, 3)
    if variant == "dora":
        # The input-axis convention: [1, in] and [1, in, 1, 1].
        assert tensors["lora_unet_conv_in.dora_scale"].shape == (1, 4, 1, 1)
        assert tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.dora_scale"].shape == (1, 64)


def test_keys_metadata_and_text_model_spelling(run):
    variant, recipe, result, method = run
    tensors = load_file(result.artifacts[0])
    names = set(lycoris_format.split_modules(tensors))
    text_encoder = [n for n in names if n.startswith("lora_te")]
    assert text_encoder, "every variant trains the text encoder"
    # AUTOMATIC1111 and ComfyUI only match lora_te_text_model_encoder_layers_... (transformers 5 dropped the level).
    assert all(n.startswith("lora_te_text_model_encoder_layers_") for n in text_encoder)
    assert all(n.startswith(("lora_unet_", "lora_te_text_model_")) for n in names)
    for key, value in tensors.items():
        if key.endswith(".alpha"):
            assert value.dim() == 0 and value.dtype == torch.float32
        if key.endswith(".on_input"):
            assert value.dim() == 0 and value.dtype == torch.int64
    warned = {line.split(":")[0] for line in lycoris_format.compatibility_warnings(tensors)}
    assert warned == VARIANTS[variant][2]
    meta = read_metadata(result.artifacts[0])
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lycoris"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["sshs_model_hash"]


def test_file_merges_into_a_base_model_with_a_multiplier(run, tiny):
    variant, recipe, result, method = run
    modules = lycoris_format.split_modules(load_file(result.artifacts[0]))
    base, merged = tiny, copy.deepcopy(tiny)
    assert lycoris_format.apply_to_model(load_file(result.artifacts[0]), merged, multiplier=0.5) == []
    matched = 0
    for part in ("unet", "text_encoder"):
        before = dict(base.parts()[part].named_modules())
        for path, layer in merged.parts()[part].named_modules():
            if not isinstance(layer, (nn.Linear, nn.Conv2d)):
                continue
            name = merged.kohya_name(part, path)
            if name not in modules:
                assert torch.equal(layer.weight, before[path].weight), path
                continue
            matched += 1
            weight, bias = ui_weight(modules[name], before[path].weight, before[path].bias, 0.5)
            # The UI formula against apply_to_model, both in float32: rounding relative to W0 and the change,
            # bound 1e-5 to 6e-5, measured 2e-9 at most. Multiplier 1 instead of 0.5 moves the best-trained
            # layers by 8e-3 of that; in float32 nothing can tell it for layers whose change is below W0's last bits
            # (the mid-block's one-token self-attention never trains: its softmax is constant).
            rounding = rebuild_rounding(layer, FP32)
            assert_close_in_norm(layer.weight, weight, rounding, scale=merge_scale(before[path].weight, weight), what=path)
            if bias is not None:
                base_bias = before[path].bias if before[path].bias is not None else torch.zeros_like(bias)
                assert_close_in_norm(layer.bias, bias, rounding, scale=merge_scale(base_bias, bias), what=f"{path} bias")
    assert matched == len(modules)


def adapted_rounding(network: nn.Module) -> Rounding:
    """Rounding of a forward pass through ``network`` with its layers merged against one with adapters.

    An adapter's own operations (down, mid, up) round at the size of its change, a small part of the
    layer's output; at the output's size it adds one rounding (the sum with the base layer's), as the
    merged layer does (W0 + dW). DoRA also sums a column norm of W0 + dW as long as the layer's own
    sum: twice the roundings per layer, safety sqrt(2).
    """
    return layer_rounding(network, safety=math.sqrt(2))


def test_merged_model_predicts_like_the_trained_one(run, tiny):
    """The names map back onto the right layers: merged at strength 1, the base UNet and text encoder
    compute what the model with trained adapters computes."""
    variant, recipe, result, method = run
    base = copy.deepcopy(tiny)
    lycoris_format.apply_to_model(load_file(result.artifacts[0]), base, multiplier=1.0)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 1000, (1, 77), generator=generator)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    with torch.no_grad():
        states = [m.text_encoders[0].model(tokens)[0] for m in (base, method.model)]
        predictions = [m.unet(latents, 500, states[0]).sample for m in (base, method.model)]
    # Bounds 5e-5 (text encoder) and 4.5e-4 (UNet) of the outputs' norms, measured 1e-6 at most. Leaving
    # the file out moves them by 6e-3 (LoKr's text encoder) and 8e-3 ((IA)^3's UNet) at least, 0.1 at most.
    assert_close_in_norm(states[0], states[1], adapted_rounding(base.text_encoders[0].model), what="text encoder states")
    assert_close_in_norm(predictions[0], predictions[1], adapted_rounding(base.unet), what="UNet prediction")


def test_resumed_run_equals_uninterrupted(run, tmp_path):
    variant, recipe, result, method = run
    checkpoint = f"step-{CHECKPOINT_STEP:08d}"
    shutil.copytree(result.output_dir / "checkpoints" / checkpoint, tmp_path / "checkpoints" / checkpoint)
    resumed = train(_recipe(variant, tmp_path), resume="latest", show_progress=False)
    final, expected = (load_file(resolve_checkpoint(d, "latest") / "trainable.safetensors") for d in (tmp_path, result.output_dir))
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in final)
    # The resumed step really changed the weights, so the equality is not trivially true.
    start = load_file(tmp_path / "checkpoints" / checkpoint / "trainable.safetensors")
    assert any(not torch.equal(start[k], final[k]) for k in final)
    exported, uninterrupted = load_file(resumed.artifacts[0]), load_file(result.artifacts[0])
    assert all(torch.equal(exported[k], uninterrupted[k]) for k in uninterrupted)


@pytest.mark.parametrize("run", ["locon"], indirect=True)
def test_plain_locon_file_loads_in_diffusers_and_predicts_the_same(run, tiny, tmp_path):
    """A LoCon file without Tucker is a plain kohya LoRA: diffusers loads it (3x3 convs, conv_in/out,
    time embedding and text encoder included) and computes what the merged base model computes."""
    variant, recipe, result, method = run
    from diffusers import StableDiffusionPipeline

    from trainer.models.export import save_diffusers_folder

    save_diffusers_folder(tiny, tmp_path / "tiny")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "tiny", local_files_only=True, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(result.artifacts[0].parent), weight_name=result.artifacts[0].name)
    merged = copy.deepcopy(tiny)
    lycoris_format.apply_to_model(load_file(result.artifacts[0]), merged)
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 1000, (1, 77), generator=generator)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    with torch.no_grad():
        states = [pipe.text_encoder(tokens)[0], merged.text_encoders[0].model(tokens)[0]]
        predictions = [m.unet(latents, 500, states[1]).sample for m in (pipe, merged)]
        unchanged = tiny.unet(latents, 500, states[1]).sample
    assert_close_in_norm(states[0], states[1], adapted_rounding(merged.text_encoders[0].model), what="text encoder states")
    assert_close_in_norm(predictions[0], predictions[1], adapted_rounding(merged.unet), what="UNet prediction")
    assert (predictions[0] - unchanged).abs().max() > 1e-4


# --- every algorithm and shape rule on small layers with random tensors (large changes, alpha != rank) --


class UNetOnly:
    """Toy layers as the UNet of a model without text encoders, named as SD1's UNet is (diffusers' paths)."""

    def __init__(self, unet: nn.Module):
        self.unet = unet

    def text_encoder_modules(self) -> dict:
        return {}

    def kohya_name(self, component: str, path: str) -> str:
        return kohya_name(UNET_PREFIX, path)


def _toy_model() -> nn.Module:
    """A Linear, a strided 3x3 conv, a bias-free 1x1 conv and a feed-forward pair (ff.net.2 is scaled on its input by (IA)^3)."""
    torch.manual_seed(0)
    model = nn.Module()
    model.proj = nn.Linear(12, 10)
    model.conv = nn.Conv2d(6, 8, 3, stride=2, padding=1)
    model.shortcut = nn.Conv2d(8, 8, 1, bias=False)
    model.ff = nn.Module()
    model.ff.net = nn.Sequential(nn.Linear(10, 20), nn.GELU(), nn.Linear(20, 10))
    return model


CONFIGS = {
    "locon": dict(algo="locon", rank=3, alpha=1.5, conv_rank=2, conv_alpha=5.0),
    "locon_tucker": dict(algo="locon", rank=3, alpha=1.5, conv_rank=2, conv_alpha=5.0, use_tucker=True),
    "loha": dict(algo="loha", rank=2, alpha=3.0, conv_rank=3, conv_alpha=1.0),
    "loha_tucker": dict(algo="loha", rank=2, alpha=3.0, conv_rank=3, conv_alpha=1.0, use_tucker=True),
    "lokr_both_tucker": dict(algo="lokr", rank=1, alpha=3.0, decompose_both=True, use_tucker=True),
    "lokr_factor": dict(algo="lokr", rank=1, alpha=0.5, factor=2),
    "lokr_full_matrix": dict(algo="lokr", rank=10000, alpha=3.0),
    "dora": dict(algo="dora", rank=3, alpha=1.5, conv_rank=2, conv_alpha=5.0),
    "dora_tucker": dict(algo="dora", rank=3, alpha=1.5, conv_rank=2, conv_alpha=5.0, use_tucker=True),
    "ia3": dict(algo="ia3"),
    "full": dict(algo="full"),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_every_algorithm_rebuilds_exactly_with_alpha_and_multiplier(config):
    cfg = LycorisConfig(preset="full", **CONFIGS[config])
    model, pristine = _toy_model(), _toy_model()
    adapters = add_adapters(model, lambda path: kohya_name(UNET_PREFIX, path), cfg, None)
    with torch.no_grad():
        for adapter in adapters.values():
            for param in adapter.trained.values():
                param.normal_()
    tensors = lycoris_format.to_state_dict({name: a.file_tensors() for name, a in adapters.items()}, torch.float32)
    assert_file_matches_adapters(adapters, tensors)
    # Merged at strength 0.7, the base layers get the UIs' W0 + 0.7 * (W' - W0).
    merged = _toy_model()
    assert lycoris_format.apply_to_model(tensors, UNetOnly(merged), multiplier=0.7) == []
    modules = lycoris_format.split_modules(tensors)
    for path, layer in merged.named_modules():
        name = kohya_name(UNET_PREFIX, path)
        if name in modules:
            original = pristine.get_submodule(path)
            weight, bias = ui_weight(modules[name], original.weight.detach(), None if original.bias is None else original.bias.detach(), 0.7)
            rounding = rebuild_rounding(layer, FP32)
            assert_close_in_norm(layer.weight, weight, rounding, scale=merge_scale(original.weight, weight), what=path)
            if bias is not None:
                base_bias = original.bias if original.bias is not None else torch.zeros_like(bias)
                assert_close_in_norm(layer.bias, bias, rounding, scale=merge_scale(base_bias, bias), what=f"{path} bias")
    if cfg.algo == "ia3":
        # Linear layers only; the feed-forward output scales its input.
        assert set(modules) == {"lora_unet_proj", "lora_unet_ff_net_0", "lora_unet_ff_net_2"}
        assert modules["lora_unet_ff_net_2"]["on_input"].item() == 1 and modules["lora_unet_ff_net_2"]["weight"].shape == (20,)
    if config == "lokr_full_matrix":
        assert all("lokr_w1" in m and "lokr_w2" in m for m in modules.values())


def test_every_preset_name_a_recipe_accepts_has_its_layers():
    from trainer.methods.lycoris.config import PRESET_NAMES
    from trainer.methods.lycoris.method import PRESETS

    assert tuple(PRESETS) == PRESET_NAMES


def test_lokr_factorization_matches_lycoris():
    # LyCORIS' factorization(): the given factor when it divides, else the squarest split below it.
    assert factorization(320, -1) == (16, 20)
    assert factorization(320, 8) == (8, 40)
    assert factorization(320, 32) == (10, 32)
    assert factorization(768, 6) == (6, 128)
    assert factorization(1280, 7) == (5, 256)
    assert factorization(13, -1) == (1, 13)


@pytest.mark.parametrize(
    "override, message",
    [
        ("lycoris.algo=lorra", r"'lycoris\.algo' is 'lorra'"),
        ("lycoris.preset=everything", r"'lycoris\.preset' is 'everything'"),
        ("lycoris.rank_dropout=0.5", r"'lycoris\.rank_dropout' is 0\.5; algo ia3 has no low-rank branch"),
        ("lycoris.use_tucker=true", r"'lycoris\.use_tucker' is true; algo ia3 has no rank"),
        ("lycoris.algo=loha lycoris.alpha=0", r"'lycoris\.alpha' is 0\.0"),
    ],
)
def test_bad_settings_name_the_key(override, message):
    # Refused when the recipe is read, before any model is loaded.
    with pytest.raises(UserError, match=message):
        load_recipe(REPO / "recipes" / "lycoris_ia3.yaml", override.split())
