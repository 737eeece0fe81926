"""AUTOMATIC1111's hypernetwork file (``.pt``), and the toolkit's lossless safetensors twin.

The ``.pt`` is a pickled dict (docs/formats.md#the-hypernetwork-pt)::

    {768: (keys-module state dict, values-module state dict), ...,   # int key = context width
     "step": int, "name": str, "layer_structure": [1.0, 2.0, 1.0], "activation_func": "linear", ...}

written with torch's legacy (non-zip) serialisation: AUTOMATIC1111's pickle checker rejects the
members torch's zip format now adds (docs/formats.md#pickles-automatic1111-accepts), while
``torch.load(weights_only=True)`` (ComfyUI) reads both. Only dicts, tuples, lists, strings, numbers, booleans, None and tensors go in.

The safetensors twin holds the same tensors as ``{width}.k.{key}`` / ``{width}.v.{key}`` and the
rest in the header: the non-tensor entries as JSON (types kept: 1 stays int, 1.0 float) and each
state dict's key order, which ComfyUI depends on (it rebuilds layers in dict order). No UI reads
this file (docs/formats.md#the-safetensors-twin); it exists so the weights also travel without a pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.atomic import refuse_to_replace, write_legacy_torch_file
from trainer.errors import UserError
from trainer.formats.safetensors_file import read_metadata, read_safetensors, save_safetensors

FORMAT_KEY = "sdtrain.format"
FORMAT_NAME = "a1111_hypernetwork"
LAYERS_KEY = "sdtrain.hypernetwork.layers"
INFO_KEY = "sdtrain.hypernetwork.info"
BRANCHES = ("k", "v")

StateDict = dict[str, torch.Tensor]


@dataclass
class HypernetworkFile:
    """One hypernetwork file's content, whichever of the two files it came from."""

    # context width -> (keys-module state dict, values-module state dict), both in the file's key order.
    layers: dict[int, tuple[StateDict, StateDict]]
    # Every other entry of the .pt (name, step, layer_structure, ...), in the file's order.
    info: dict[str, object]


def a1111_info(*, name: str, step: int, layer_structure: list[float], activation: str, layer_norm: bool, activate_output: bool, weight_init: str, sd_checkpoint_name: str | None, optional_info: str | None) -> dict[str, object]:
    """The non-tensor entries as AUTOMATIC1111's ``Hypernetwork.save`` writes them, for a file without dropout.

    Written explicitly, never left to a loader's default: AUTOMATIC1111 and ComfyUI default
    ``activate_output`` and ``activation_func`` differently (docs/formats.md#how-comfyui-reads-a-hypernetwork).
    Dropout is training-only; ComfyUI never switches its Dropout modules to eval, so the file says
    there is none (and the state dicts are numbered without it).
    """
    return {
        "step": step,
        "name": name,
        "layer_structure": list(layer_structure),
        "activation_func": activation,
        "is_layer_norm": layer_norm,
        # AUTOMATIC1111 stores the flag as is_layer_norm; add_layer_norm is its name at creation.
        "add_layer_norm": layer_norm,
        "weight_initialization": weight_init,
        "sd_checkpoint": None,
        "sd_checkpoint_name": sd_checkpoint_name,
        "activate_output": activate_output,
        "use_dropout": False,
        "dropout_structure": [0] * len(layer_structure),
        "last_layer_dropout": False,
        "optional_info": optional_info,
    }


def a1111_structure(info: dict[str, object]) -> dict[str, object]:
    """The layer flags as AUTOMATIC1111's ``Hypernetwork.load`` reads them, its defaults for missing keys included.

    Files from before ``dropout_structure`` existed derive it from ``use_dropout`` and
    ``last_layer_dropout``: 0.3 after every hidden layer but the last, which gets it only with
    ``last_layer_dropout``. Dropout modules shift the Sequential's indices, so this decides which
    state-dict keys the file must have.
    """
    layer_structure = list(info.get("layer_structure") or [1, 2, 1])
    dropout_structure = info.get("dropout_structure")
    if dropout_structure is None:
        if info.get("use_dropout", False):
            last = 0.3 if info.get("last_layer_dropout", False) else 0
            dropout_structure = [0] + [0.3] * (len(layer_structure) - 3) + [last, 0]
        else:
            dropout_structure = [0] * len(layer_structure)
    return {
        "layer_structure": tuple(layer_structure),
        "activation": info.get("activation_func") or "linear",
        "layer_norm": bool(info.get("is_layer_norm", False)),
        "activate_output": bool(info.get("activate_output", True)),
        "dropout_structure": tuple(dropout_structure),
    }


def upgrade_old_keys(state_dict: StateDict) -> StateDict:
    """A branch's state dict with the first (NovelAI) files' ``linear1``/``linear2`` renamed, as AUTOMATIC1111 does."""
    old_names = {"linear1": "linear.0", "linear2": "linear.1"}
    renamed = {}
    for key, value in state_dict.items():
        module, _, param = key.rpartition(".")
        renamed[f"{old_names.get(module, module)}.{param}"] = value
    return renamed


# --- the .pt --------------------------------------------------------------------------------------


def save_pt(path: Path, hypernetwork: HypernetworkFile) -> Path:
    # Plain dicts of tensors that own their storage: nothing but builtins and tensors in the pickle.
    content: dict = {
        width: tuple({key: tensor.detach().cpu().contiguous().clone() for key, tensor in branch.items()} for branch in pair)
        for width, pair in hypernetwork.layers.items()
    }
    content.update(hypernetwork.info)
    return write_legacy_torch_file(Path(path), content)


def load_pt(path: Path) -> HypernetworkFile:
    path = Path(path)
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(
            f"'{path}' cannot be read as a hypernetwork: torch.load(weights_only=True) refuses it ({err.__class__.__name__}). "
            "AUTOMATIC1111 hypernetworks are plain dicts of tensors; a file that needs more is not one, or is not safe to open."
        ) from None
    if not isinstance(content, dict):
        raise UserError(f"'{path}' is not an AUTOMATIC1111 hypernetwork: it holds a {type(content).__name__}, not a dict of context widths.")
    layers, info = {}, {}
    for key, value in content.items():
        if isinstance(key, int):
            if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(branch, dict) for branch in value)):
                raise UserError(f"'{path}' is not an AUTOMATIC1111 hypernetwork: entry {key} is not a (keys, values) pair of state dicts.")
            layers[key] = (dict(value[0]), dict(value[1]))
        else:
            info[str(key)] = value
    if not layers:
        raise UserError(f"'{path}' is not an AUTOMATIC1111 hypernetwork: it has no integer context-width entries (e.g. 768).")
    return HypernetworkFile(layers, info)


# --- the safetensors twin -------------------------------------------------------------------------


def save_safetensors_twin(path: Path, hypernetwork: HypernetworkFile) -> Path:
    tensors, order = {}, []
    for width, pair in hypernetwork.layers.items():
        order.append([width, *(list(branch) for branch in pair)])
        for branch_name, branch in zip(BRANCHES, pair):
            tensors.update({f"{width}.{branch_name}.{key}": tensor for key, tensor in branch.items()})
    try:
        info = json.dumps(hypernetwork.info)
    except TypeError as err:
        raise UserError(f"The hypernetwork's entries cannot be stored in a safetensors header ({err}); only strings, numbers, booleans, None and lists can.") from None
    metadata = {FORMAT_KEY: FORMAT_NAME, LAYERS_KEY: json.dumps(order), INFO_KEY: info}
    return save_safetensors(Path(path), tensors, metadata)


def load_safetensors_twin(path: Path) -> HypernetworkFile:
    path = Path(path)
    tensors, metadata = read_safetensors(path, "hypernetwork")
    if metadata.get(FORMAT_KEY) != FORMAT_NAME:
        raise UserError(
            f"'{path}' is not an sdtrain hypernetwork safetensors file (its header has no '{FORMAT_KEY}: {FORMAT_NAME}'). "
            "Only files written by sdtrain carry the structure a hypernetwork needs besides its tensors."
        )
    layers = {}
    for width, *branch_keys in json.loads(metadata[LAYERS_KEY]):
        layers[width] = tuple({key: tensors[f"{width}.{name}.{key}"] for key in keys} for name, keys in zip(BRANCHES, branch_keys))
    return HypernetworkFile(layers, json.loads(metadata[INFO_KEY]))


# --- either ---------------------------------------------------------------------------------------

READERS = {".pt": load_pt, ".safetensors": load_safetensors_twin}
WRITERS = {".pt": save_pt, ".safetensors": save_safetensors_twin}


def _suffix(path: Path, role: str) -> str:
    suffix = path.suffix.lower()
    if suffix not in READERS:
        raise UserError(f"The {role} '{path}' must end in .pt (AUTOMATIC1111) or .safetensors (sdtrain's twin), not '{path.suffix}'.")
    return suffix


def is_hypernetwork_file(path: Path) -> bool:
    """A ``.pt`` (AUTOMATIC1111 keeps hypernetworks there) or sdtrain's safetensors twin, told by its metadata."""
    path = Path(path)
    if path.suffix.lower() == ".pt":
        return True
    return path.suffix.lower() == ".safetensors" and path.is_file() and read_metadata(path).get(FORMAT_KEY) == FORMAT_NAME


def read_hypernetwork(path: Path) -> HypernetworkFile:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Hypernetwork file '{path}' does not exist.")
    return READERS[_suffix(path, "hypernetwork file")](path)


def write_hypernetwork(path: Path, hypernetwork: HypernetworkFile) -> Path:
    return WRITERS[_suffix(Path(path), "output file")](Path(path), hypernetwork)


def convert_hypernetwork(src: Path, dst: Path) -> Path:
    """Turn an AUTOMATIC1111 ``.pt`` into the safetensors twin or back, losslessly; the format follows each suffix.

    Returns ``dst``; refuses to overwrite an existing file.
    """
    src, dst = Path(src), Path(dst)
    writer = WRITERS[_suffix(dst, "output file")]
    refuse_to_replace([dst], "Choose a new name for the converted file, or delete that one first.")
    return writer(dst, read_hypernetwork(src))
