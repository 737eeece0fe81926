"""Hypernetworks end to end: files AUTOMATIC1111 and ComfyUI read as the trainer meant them.

AUTOMATIC1111's module, its loader and its pickle checker, and ComfyUI's loader, are re-implemented
here from their description (docs/formats.md#automatic1111-hypernetworks and
docs/formats.md#pickles-automatic1111-accepts), independently of the
trainer's code, and must give the trainer's keys and values for the same context.
"""

from __future__ import annotations

import pickle
import re
import shutil
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from tests.conftest import REPO, fast_overrides
from tests.tolerances import assert_close_in_norm, layer_rounding
from trainer.errors import UserError
from trainer.formats.a1111_hypernetwork import convert_hypernetwork, load_pt, read_hypernetwork
from trainer.loop import train
from trainer.methods.base import ExportContext
from trainer.methods.hypernetwork.method import HypernetworkMethod
from trainer.methods.hypernetwork.module import load_hypernetwork
from trainer.models.loading import load_base_model
from trainer.recipe import load_recipe
from trainer.sampling import sampling_pipeline, write_samples

RECIPE = REPO / "recipes" / "sls_frog_hypernetwork.yaml"
TEXT_WIDTH = 64

# --- AUTOMATIC1111 (modules/hypernetworks/hypernetwork.py, modules/safe.py), docs/formats.md#the-hypernetwork-pt

A1111_ACTIVATIONS = {"linear": nn.Identity, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU, "swish": nn.Hardswish, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
A1111_ACTIVATIONS.update({name.lower(): cls for name, cls in vars(torch.nn.modules.activation).items() if isinstance(cls, type) and cls.__module__ == "torch.nn.modules.activation"})


class A1111Module(nn.Module):
    def __init__(self, dim, layer_structure, activation_func, add_layer_norm, activate_output, dropout_structure):
        super().__init__()
        layers = []
        for i in range(len(layer_structure) - 1):
            layers.append(nn.Linear(int(dim * layer_structure[i]), int(dim * layer_structure[i + 1])))
            if not (activation_func in ("linear", None) or (i >= len(layer_structure) - 2 and not activate_output)):
                layers.append(A1111_ACTIVATIONS[activation_func]())
            if add_layer_norm:
                layers.append(nn.LayerNorm(int(dim * layer_structure[i + 1])))
            if dropout_structure is not None and dropout_structure[i + 1] > 0:
                layers.append(nn.Dropout(p=dropout_structure[i + 1]))
        self.linear = nn.Sequential(*layers)
        self.multiplier = 1.0

    def forward(self, x):
        return x + self.linear(x) * (self.multiplier if not self.training else 1)


def a1111_load(path, multiplier=1.0) -> dict[int, list[A1111Module]]:
    """``Hypernetwork.load`` + ``set_multiplier``: strict load_state_dict into modules built from the flags."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    layer_structure = sd.get("layer_structure", [1, 2, 1])
    dropout_structure = sd.get("dropout_structure", None)
    use_dropout = True if dropout_structure is not None and any(dropout_structure) else sd.get("use_dropout", False)
    if dropout_structure is None:
        dropout_structure = [0] * len(layer_structure)
        if use_dropout:
            dropout_structure = [0] + [0.3] * (len(layer_structure) - 3) + [0.3 if sd.get("last_layer_dropout", False) else 0, 0]
    layers = {}
    for size, pair in sd.items():
        if type(size) is int:
            layers[size] = []
            for state_dict in pair:
                module = A1111Module(size, layer_structure, sd.get("activation_func", None), sd.get("is_layer_norm", False), sd.get("activate_output", True), dropout_structure)
                module.load_state_dict(state_dict)
                module.eval()
                module.multiplier = multiplier
                layers[size].append(module)
    return layers


class A1111Unpickler(pickle.Unpickler):
    """The globals AUTOMATIC1111's checker lets through (the ones a hypernetwork may need)."""

    ALLOWED = {
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        *(("torch", name) for name in ("FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "DoubleStorage", "ByteStorage", "float32", "BFloat16Storage")),
        ("__builtin__", "set"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global '{module}/{name}' is forbidden")
        return super().find_class(module, name)

    def persistent_load(self, saved_id):
        assert saved_id[0] == "storage"
        return torch.storage.TypedStorage(_internal=True)


def a1111_pickle_check(path) -> None:
    """``modules/safe.py check_pt``: raises unless AUTOMATIC1111 (without --disable-safe-unpickle) opens the file."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if not re.match(r"^([^/]+)/((data/\d+)|version|(data\.pkl))$", name):
                    raise pickle.UnpicklingError(f"bad file inside {path}: {name}")
            with archive.open(next(n for n in archive.namelist() if n.endswith("/data.pkl"))) as handle:
                A1111Unpickler(handle).load()
        return
    with open(path, "rb") as handle:
        unpickler = A1111Unpickler(handle)
        for _ in range(5):  # legacy layout: magic, protocol, sys info, the object, storage keys
            unpickler.load()


# --- ComfyUI (comfy_extras/nodes_hypernetwork.py), docs/formats.md#how-comfyui-reads-a-hypernetwork ---

COMFYUI_ACTIVATIONS = {"linear": nn.Identity, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU, "swish": nn.Hardswish, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "softsign": nn.Softsign, "mish": nn.Mish}


def comfyui_load(path) -> dict[int, list[nn.Sequential]]:
    """Rebuilds each branch from its ``.weight`` keys in dict order: Linear, activation, LayerNorm."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    activation = sd.get("activation_func", "linear")
    is_layer_norm = sd.get("is_layer_norm", False)
    activate_output = sd.get("activate_output", False)
    assert not sd.get("use_dropout", False), "ComfyUI would keep its Dropout modules in training mode"
    out = {}
    for dim in (key for key in sd if isinstance(key, int)):
        out[dim] = []
        for state in sd[dim]:
            names = [key[: -len(".weight")] for key in state if key.endswith(".weight")]
            layers, i = [], 0
            while i < len(names):
                weight, bias = state[f"{names[i]}.weight"], state[f"{names[i]}.bias"]
                linear = nn.Linear(weight.shape[1], weight.shape[0])
                linear.load_state_dict({"weight": weight, "bias": bias})
                layers.append(linear)
                if activation != "linear" and (i != len(names) - 1 or activate_output):
                    layers.append(COMFYUI_ACTIVATIONS[activation]())
                if is_layer_norm:
                    i += 1
                    norm = nn.LayerNorm(state[f"{names[i]}.weight"].shape[0])
                    norm.load_state_dict({"weight": state[f"{names[i]}.weight"], "bias": state[f"{names[i]}.bias"]})
                    layers.append(norm)
                i += 1
            out[dim].append(nn.Sequential(*layers))
    return out


# --- the trainer's side ---------------------------------------------------------------------------

STRUCTURES = {
    "default": {},
    "relu-ln-activate-output": {"activation": "relu", "layer_norm": "true", "activate_output": "true", "weight_init": "KaimingUniform"},
    "leakyrelu-ln-dropout": {"layer_structure": "[1,1.5,2,1]", "activation": "leakyrelu", "layer_norm": "true", "dropout_structure": "[0,0.3,0.3,0]", "weight_init": "XavierNormal"},
    "swish-dropout-last": {"layer_structure": "[1,2,2,1]", "activation": "swish", "activate_output": "true", "dropout_structure": "[0,0,0.2,0]", "weight_init": "XavierUniform"},
    "tanh-narrow": {"layer_structure": "[1,0.5,1]", "activation": "tanh", "weight_init": "KaimingNormal"},
    "gelu-a1111-only": {"activation": "gelu", "layer_norm": "true", "dropout_structure": "[0,0.1,0]"},
}
COMFYUI_READS_ALIKE = ["default", "relu-ln-activate-output", "swish-dropout-last", "tanh-narrow"]


def _recipe(out, structure: dict, **extra):
    return load_recipe(RECIPE, fast_overrides(out, **{f"hypernetwork.{key}": value for key, value in structure.items()}, **extra))


@pytest.fixture(scope="module")
def tiny():
    return load_base_model("tiny")


def _set_up(tiny, tmp_path, structure: dict):
    """A method set up on the tiny model, its weights scrambled as training would, and its .pt (fp32)."""
    method = HypernetworkMethod(_recipe(tmp_path, structure, **{"output.save_dtype": "fp32", "output.formats": "[a1111]"}), tiny)
    method.setup()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in method.hypernetwork.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    method.hypernetwork.eval()
    (pt_path,) = method.export(ExportContext(output_dir=tmp_path, name="hn", step=3, epoch=0, started_at="", data=None))
    return method, pt_path


def _attn2(unet):
    return unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2


def _context():
    return torch.randn(2, 77, TEXT_WIDTH, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_a1111_reads_the_trainers_keys_and_values(tiny, tmp_path, name):
    method, pt_path = _set_up(tiny, tmp_path, STRUCTURES[name])
    attn, context = _attn2(tiny.unet), _context()
    processor = attn.processor
    if "dropout_structure" in STRUCTURES[name]:
        # Trained with dropout, written without it: the file's indices must skip the Dropout modules.
        assert any(isinstance(m, nn.Dropout) for m in method.hypernetwork.modules())
    for strength in (1.0, 0.6):
        method.hypernetwork.set_strength(strength)
        hn_k, hn_v = a1111_load(pt_path, multiplier=strength)[TEXT_WIDTH]
        with torch.no_grad():
            keys, values = processor.keys_and_values(attn, context)
            # AUTOMATIC1111's module recomputes the trainer's from the file: rounding through its layers and
            # to_k, bound 7e-6 to 1.1e-5 of the keys' norm (measured 0). The wrong strength (1 for 0.6) moves them
            # by 0.1 to 0.6, values' weights for keys' by 0.2 to 1.3.
            assert_close_in_norm(keys, attn.to_k(hn_k(context)), layer_rounding(hn_k, attn.to_k), what="keys")
            assert_close_in_norm(values, attn.to_v(hn_v(context)), layer_rounding(hn_v, attn.to_v), what="values")
            assert (keys - attn.to_k(context)).abs().max() > 1e-2, "the hypernetwork changes the keys"


@pytest.mark.parametrize("name", COMFYUI_READS_ALIKE)
def test_comfyui_reads_the_trainers_keys_and_values(tiny, tmp_path, name):
    method, pt_path = _set_up(tiny, tmp_path, STRUCTURES[name])
    attn, context = _attn2(tiny.unet), _context()
    method.hypernetwork.set_strength(0.6)
    hn_k, hn_v = comfyui_load(pt_path)[TEXT_WIDTH]
    with torch.no_grad():
        keys, values = attn.processor.keys_and_values(attn, context)
        assert_close_in_norm(keys, attn.to_k(context + hn_k(context) * 0.6), layer_rounding(hn_k, attn.to_k), what="keys")
        assert_close_in_norm(values, attn.to_v(context + hn_v(context) * 0.6), layer_rounding(hn_v, attn.to_v), what="values")


def test_warns_where_comfyui_reads_differently(tiny, tmp_path, capsys):
    _set_up(tiny, tmp_path, STRUCTURES["gelu-a1111-only"])
    printed = capsys.readouterr().out
    assert "ComfyUI's HypernetworkLoader does not know hypernetwork.activation 'gelu'" in printed
    assert "hypernetwork.activate_output: true" in printed
    _set_up(tiny, tmp_path, STRUCTURES["relu-ln-activate-output"])
    assert "warning" not in capsys.readouterr().out


def test_pt_passes_a1111_pickle_check_and_weights_only(tiny, tmp_path):
    _, pt_path = _set_up(tiny, tmp_path, STRUCTURES["leakyrelu-ln-dropout"])
    a1111_pickle_check(pt_path)
    content = torch.load(pt_path, weights_only=True)
    assert [key for key in content if isinstance(key, int)] == [TEXT_WIDTH]
    assert content["activation_func"] == "leakyrelu" and content["is_layer_norm"] is True and content["activate_output"] is False
    assert content["use_dropout"] is False and content["dropout_structure"] == [0, 0, 0, 0] and content["last_layer_dropout"] is False
    assert content["layer_structure"] == [1.0, 1.5, 2.0, 1.0] and content["weight_initialization"] == "XavierNormal"
    assert content["name"] == "hn" and content["step"] == 3 and content["sd_checkpoint_name"] == "sdtrain-tiny"
    # Linear + activation + LayerNorm per hidden layer, Linear + LayerNorm at the end; no Dropout indices.
    assert list(content[TEXT_WIDTH][0]) == [f"linear.{i}.{p}" for i in (0, 2, 3, 5, 6, 7) for p in ("weight", "bias")]
    # The same content in torch's current zip layout is what AUTOMATIC1111 turns away.
    zipped = tmp_path / "zipped.pt"
    torch.save(content, zipped)
    with pytest.raises(pickle.UnpicklingError, match="bad file inside"):
        a1111_pickle_check(zipped)


def _assert_same_file(a, b):
    assert list(a.layers) == list(b.layers) and a.info == b.info
    assert [(key, type(value)) for key, value in a.info.items()] == [(key, type(value)) for key, value in b.info.items()]
    for width in a.layers:
        for branch_a, branch_b in zip(a.layers[width], b.layers[width]):
            assert list(branch_a) == list(branch_b), "key order (ComfyUI rebuilds layers in it)"
            for key in branch_a:
                assert branch_a[key].dtype == branch_b[key].dtype and torch.equal(branch_a[key], branch_b[key]), key


def test_pt_and_safetensors_convert_into_each_other_exactly(tiny, tmp_path):
    _, pt_path = _set_up(tiny, tmp_path, STRUCTURES["leakyrelu-ln-dropout"])
    twin = convert_hypernetwork(pt_path, tmp_path / "twin.safetensors")
    back = convert_hypernetwork(twin, tmp_path / "back.pt")
    _assert_same_file(read_hypernetwork(twin), load_pt(pt_path))
    _assert_same_file(load_pt(back), load_pt(pt_path))
    a1111_pickle_check(back)


def test_a1111_style_file_converts_and_loads_with_its_dropout(tiny, tmp_path):
    """A file as AUTOMATIC1111 itself saves it: zip layout, OrderedDict state dicts with Dropout indices, no dropout_structure."""
    structure = [1, 2, 2, 1]
    modules = [A1111Module(TEXT_WIDTH, structure, "relu", False, True, [0, 0.3, 0.3, 0]) for _ in range(2)]
    for module in modules:
        for param in module.parameters():
            nn.init.normal_(param, std=0.1, generator=torch.Generator().manual_seed(param.numel()))
    original = tmp_path / "a1111.pt"
    torch.save(
        {TEXT_WIDTH: tuple(m.state_dict() for m in modules), "step": 500, "name": "a1111", "layer_structure": structure, "activation_func": "relu",
         "is_layer_norm": False, "weight_initialization": "Normal", "use_dropout": True, "sd_checkpoint": "abcdef0123", "sd_checkpoint_name": "sd15",
         "activate_output": True, "last_layer_dropout": True},
        original,
    )
    twin = convert_hypernetwork(original, tmp_path / "a1111.safetensors")
    _assert_same_file(read_hypernetwork(twin), load_pt(original))
    unet = load_base_model("tiny").unet
    load_hypernetwork(unet, twin, strength=0.8)
    attn, context = _attn2(unet), _context()
    hn_k, hn_v = a1111_load(original, multiplier=0.8)[TEXT_WIDTH]
    with torch.no_grad():
        keys, values = attn.processor.keys_and_values(attn, context)
        assert_close_in_norm(keys, attn.to_k(hn_k(context)), layer_rounding(hn_k, attn.to_k), what="keys")
        assert_close_in_norm(values, attn.to_v(hn_v(context)), layer_rounding(hn_v, attn.to_v), what="values")


def test_unreadable_files_are_named(tmp_path):
    flat = tmp_path / "flat.safetensors"
    save_file({"linear.0.weight": torch.zeros(2, 2)}, flat)
    with pytest.raises(UserError, match="flat.safetensors' is not an sdtrain hypernetwork"):
        read_hypernetwork(flat)
    with pytest.raises(UserError, match=r"must end in \.pt .*or \.safetensors"):
        convert_hypernetwork(flat, tmp_path / "out.ckpt")
    with pytest.raises(UserError, match="already exists"):
        convert_hypernetwork(tmp_path / "any.pt", flat)
    torch.save({"step": 1}, tmp_path / "nothing.pt")
    with pytest.raises(UserError, match="no integer context-width entries"):
        read_hypernetwork(tmp_path / "nothing.pt")


def test_initialisation_is_seeded_by_train_seed_alone(tiny, tmp_path):
    def initial_weights(seed: int, global_seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(global_seed)
        method = HypernetworkMethod(_recipe(tmp_path, STRUCTURES["relu-ln-activate-output"], **{"train.seed": seed}), tiny)
        method.setup()
        return {key: value.clone() for key, value in method.hypernetwork.state_dict().items()}

    first, same_seed, other_seed = initial_weights(1, 10), initial_weights(1, 20), initial_weights(2, 10)
    assert all(torch.equal(first[key], same_seed[key]) for key in first)
    assert any(not torch.equal(first[key], other_seed[key]) for key in first)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("layer_structure", "[2,1]", r"'hypernetwork\.layer_structure' is \[2\.0, 1\.0\]; it must start and end with 1"),
        ("activation", "prelu", r"'hypernetwork\.activation' is 'prelu'"),
        ("dropout_structure", "[0,0.3]", r"'hypernetwork\.dropout_structure' is \[0\.0, 0\.3\]; it needs one probability per"),
        ("weight_init", "Uniform", r"'hypernetwork\.weight_init' is 'Uniform'; use one of Normal"),
    ],
)
def test_bad_structure_is_named_by_its_recipe_key(tmp_path, key, value, message):
    # Refused when the recipe is read, before any model is loaded.
    with pytest.raises(UserError, match=message):
        _recipe(tmp_path, {key: value})


# --- training ---------------------------------------------------------------------------------------

RESUMED_RUN = {"train.max_steps": 6, "train.save_every_steps": 3, "train.keep_checkpoints": 10, "train.lr_scheduler": "cosine", "output.formats": "[a1111]"}


def test_resume_equals_the_uninterrupted_run(tmp_path):
    structure = STRUCTURES["leakyrelu-ln-dropout"]
    whole = train(_recipe(tmp_path / "whole", structure, **RESUMED_RUN), show_progress=False)
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(whole.output_dir / "checkpoints" / "step-00000003", resumed_dir / "checkpoints" / "step-00000003")
    resumed = train(_recipe(resumed_dir, structure, **RESUMED_RUN), resume=str(resumed_dir / "checkpoints" / "step-00000003"), show_progress=False)
    final, start = (load_file(whole.output_dir / "checkpoints" / step / "trainable.safetensors") for step in ("step-00000006", "step-00000003"))
    resumed_final = load_file(resumed_dir / "checkpoints" / "step-00000006" / "trainable.safetensors")
    assert final.keys() == resumed_final.keys()
    assert all(torch.equal(final[key], resumed_final[key]) for key in final)
    assert any(not torch.equal(final[key], start[key]) for key in final), "steps 4-6 trained"
    _assert_same_file(load_pt(resumed.artifacts[0]), load_pt(whole.artifacts[0]))


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def _image(pipe) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe("sls frog", num_inference_steps=4, height=64, width=64, guidance_scale=7.0, generator=generator, output_type="np").images[0]


def test_training_changes_the_weights_and_the_image(tmp_path):
    sampling = {"sample.prompts": "[sls frog]", "sample.steps": 4, "hypernetwork.sample_strength": 0.0}
    recipe = _recipe(tmp_path, {}, **{"train.max_steps": 30, **sampling})
    result = train(recipe, show_progress=False)
    pt_path, twin = result.artifacts
    assert (pt_path.name, twin.name) == ("sls_frog.pt", "sls_frog.safetensors")
    _assert_same_file(read_hypernetwork(twin), load_pt(pt_path))
    # Samples during training are drawn at hypernetwork.sample_strength; at 0 they are the base model's.
    (base_sample,) = write_samples(load_base_model("tiny"), recipe, 30, tmp_path / "base_samples", torch.device("cpu"))
    assert np.abs(_pixels(result.samples[-1]) - _pixels(base_sample)).max() <= 1

    # The run's starting point: the same recipe set up again (initialisation is seeded by train.seed).
    untrained = HypernetworkMethod(recipe, load_base_model("tiny"))
    untrained.setup()
    initial = untrained.hypernetwork.a1111_layers(torch.float16)[TEXT_WIDTH]
    trained = load_pt(pt_path).layers[TEXT_WIDTH]
    assert all(not torch.equal(initial[b][key], trained[b][key]) for b in (0, 1) for key in trained[b])

    base = sampling_pipeline(load_base_model("tiny"), torch.device("cpu"))
    plain = _image(base)
    untrained_pt = untrained.export(ExportContext(output_dir=tmp_path / "untrained", name="start", step=0, epoch=0, started_at="", data=None))[0]
    load_hypernetwork(base.unet, untrained_pt)
    before = _image(base)
    hypernetwork = load_hypernetwork(base.unet, pt_path, strength=1.0)
    after = _image(base)
    assert np.abs(after - before).max() > 0.05, "training changed what the hypernetwork does to the image"
    hypernetwork.set_strength(0.0)
    # Exactly the base model's image: at strength 0 the context is x + mlp(x) * 0 = x, and the processor
    # runs diffusers' AttnProcessor2_0 operation for operation on it.
    np.testing.assert_array_equal(_image(base), plain)
