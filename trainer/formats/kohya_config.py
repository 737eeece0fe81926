"""kohya's configuration files: read them into one flat set of options, and write them back.

Four forms hold a kohya training setup (docs/from-kohya.md):

- a kohya_ss GUI configuration (``.json``): one flat object of the GUI's fields;
- an sd-scripts ``--config_file`` TOML: sections of ``option = value`` (the sections only group);
- a dataset TOML (``--dataset_config``): ``[general]``, ``[[datasets]]`` and ``[[datasets.subsets]]``;
- a saved command line (``accelerate launch ... train_network.py --flag value ...``), ``\\`` or ``^``
  line continuations allowed.

``read_kohya_files`` merges any of them into a :class:`KohyaSetup`; a dataset TOML named by
``dataset_config`` is read too. The writers produce the dataset TOML and command line sd-scripts accepts.
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.errors import UserError

# Options sd-scripts declares with nargs="*": their values stay a list even when one is given.
LIST_OPTIONS = frozenset({"network_args", "optimizer_args", "lr_scheduler_args", "text_encoder_lr", "base_weights", "base_weights_multiplier"})


@dataclass
class KohyaSetup:
    """Everything the files said, before any of it is mapped to a recipe."""

    # The sd-scripts script the setup is for (e.g. "train_network.py"), or None when no file says.
    script: str | None = None
    # sd-scripts option (or kohya_ss GUI field) -> value, as the file gave it.
    options: dict[str, Any] = field(default_factory=dict)
    # The file each option came from, to name it in messages.
    origins: dict[str, Path] = field(default_factory=dict)
    # A dataset TOML's content: {"general": {...}, "datasets": [{..., "subsets": [{...}]}]}.
    dataset: dict[str, Any] | None = None
    dataset_file: Path | None = None
    # True when a kohya_ss GUI configuration was read: some fields mean other things there (docs/from-kohya.md).
    from_gui: bool = False
    # Folder relative paths are tried against after the working folder: the folder of the first file.
    base_dir: Path = field(default_factory=Path.cwd)


def _read_text(path: Path) -> str:
    if path.is_dir():
        raise UserError(f"'{path}' is a folder. Pass a kohya file: a kohya_ss .json configuration, an sd-scripts .toml, or a text file with the command line.")
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"kohya file '{path}' does not exist. Check the path.") from None
    except UnicodeDecodeError:
        raise UserError(f"kohya file '{path}' is not UTF-8 text, so it is none of the kohya forms sdtrain reads (.json, .toml, a command line). Re-save it as UTF-8.") from None
    except OSError as err:
        raise UserError(f"kohya file '{path}' cannot be read ({err.strerror}). Check its permissions.") from None


def _read_toml(path: Path, text: str) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # the same parser, as a package (a dependency on Python 3.10)
        import tomli as tomllib
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"kohya file '{path}' is not valid TOML ({err}). Fix it there.") from None


def _read_json(path: Path, text: str) -> dict:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"kohya file '{path}' is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}). Fix it there.") from None
    if not isinstance(data, dict):
        raise UserError(f"kohya file '{path}' holds a JSON {type(data).__name__}; a kohya_ss configuration is one JSON object of fields.")
    return data


def is_dataset_toml(data: dict) -> bool:
    return "datasets" in data or ("general" in data and isinstance(data["general"], dict))


def parse_command_line(text: str, path: Path) -> tuple[str | None, dict[str, Any]]:
    """The script and the ``--option`` values of a saved sd-scripts command line.

    Options before the script are accelerate's (``--num_cpu_threads_per_process``) and are skipped. A flag
    without values is True; one value is a string (a list for the nargs="*" options); several, a list.
    """
    joined = text.replace("\\\r\n", " ").replace("\\\n", " ").replace("^\r\n", " ").replace("^\n", " ").replace("`\n", " ")
    lines = [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    try:
        tokens = shlex.split(" ".join(lines))
    except ValueError as err:
        raise UserError(f"kohya file '{path}' is not a command line sdtrain can split ({err}: an unclosed quote?). Fix the quoting there.") from None
    script_at = next((i for i, token in enumerate(tokens) if token.endswith(".py")), None)
    if script_at is None:
        raise UserError(
            f"kohya file '{path}' is not a kohya file sdtrain reads: not .json or .toml, and no sd-scripts script (train_network.py, "
            "sdxl_train_network.py, train_db.py, ...) in it as a command line. Pass a kohya_ss .json configuration, an sd-scripts "
            "--config_file or --dataset_config .toml, or a text file with the 'accelerate launch ... train_network.py --option value' line."
        )
    return Path(tokens[script_at]).name, parse_options(tokens[script_at + 1:], f"kohya file '{path}'")


def parse_options(tokens: list[str], where: str) -> dict[str, Any]:
    """``--option value ...`` tokens as options: a flag without values is True; one value a string (a
    list for the nargs="*" options); several, a list."""
    options: dict[str, list[str]] = {}
    name = None
    for token in tokens:
        if token.startswith("--"):
            name, _, inline = token[2:].partition("=")
            options[name] = [inline] if inline else []
        elif name is None:
            raise UserError(f"{where}: '{token}' is not an --option or its value. Fix the command line there.")
        else:
            options[name].append(token)
    return {name: (True if not got else got if (len(got) > 1 or name in LIST_OPTIONS) else got[0]) for name, got in options.items()}


def _add(setup: KohyaSetup, options: dict[str, Any], path: Path) -> None:
    for name, value in options.items():
        setup.options[name] = value
        setup.origins[name] = path


def _set_dataset(setup: KohyaSetup, data: dict, path: Path) -> None:
    if setup.dataset is not None and setup.dataset_file != path:
        raise UserError(f"Two dataset TOMLs were given ('{setup.dataset_file}' and '{path}'); sd-scripts reads one. Pass one of them.")
    setup.dataset, setup.dataset_file = data, path


def read_kohya_files(paths: list[Path]) -> KohyaSetup:
    """Read and merge the given kohya files (later files win on the same option)."""
    if not paths:
        raise UserError("Name at least one kohya file to import.")
    setup = KohyaSetup(base_dir=paths[0].resolve().parent)
    for path in paths:
        text = _read_text(path)
        suffix = path.suffix.lower()
        if suffix == ".json":
            fields = _read_json(path, text)
            # The GUI's "additional parameters" box: more sd-scripts options, as on a command line.
            extra = str(fields.pop("additional_parameters", "") or "")
            _add(setup, fields, path)
            try:
                tokens = shlex.split(extra)
            except ValueError as err:
                raise UserError(f"additional_parameters in '{path}' cannot be split into options ({err}: an unclosed quote?). Fix it there.") from None
            _add(setup, parse_options(tokens, f"additional_parameters in '{path}'"), path)
            setup.from_gui = True
        elif suffix == ".toml":
            data = _read_toml(path, text)
            if is_dataset_toml(data):
                _set_dataset(setup, data, path)
            else:
                # sd-scripts' read_config_from_file: tables only group options; their keys are the options.
                _add(setup, {key: value for section in data.values() if isinstance(section, dict) for key, value in section.items()}, path)
                _add(setup, {key: value for key, value in data.items() if not isinstance(value, dict)}, path)
        else:
            script, options = parse_command_line(text, path)
            setup.script = script
            _add(setup, options, path)
    dataset_config = setup.options.get("dataset_config")
    if dataset_config and setup.dataset is None:
        path = find_referenced(setup, "dataset_config", str(dataset_config), want_dir=False)
        data = _read_toml(path, _read_text(path))
        if not is_dataset_toml(data):
            raise UserError(f"'{path}' (dataset_config in '{setup.origins['dataset_config']}') has no [[datasets]]: it is not a dataset TOML. Fix the path.")
        _set_dataset(setup, data, path)
    return setup


def find_referenced(setup: KohyaSetup, option: str, value: str, *, want_dir: bool) -> Path:
    """A file or folder a kohya option names: as given (relative to the working folder, as kohya reads it),
    else relative to the folder of the kohya file. Missing: a UserError naming the option and the file."""
    given = Path(value).expanduser()
    candidates = [given] if given.is_absolute() else [given, setup.base_dir / given]
    for candidate in candidates:
        if candidate.is_dir() if want_dir else candidate.is_file():
            return candidate if candidate is given else candidate.resolve()
    kind = "folder" if want_dir else "file"
    source = setup.origins.get(option) or setup.dataset_file
    looked = " and ".join(f"'{c}'" for c in dict.fromkeys(candidates))
    raise UserError(
        f"{option} in '{source}' names the {kind} '{value}', which does not exist (looked for {looked}). Fix the path in that file, "
        f"or run the import from the folder kohya ran in."
    )


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    # JSON's string escapes are TOML basic-string escapes.
    return json.dumps(str(value), ensure_ascii=False)


def dataset_toml(general: dict[str, Any], subsets: list[dict[str, Any]]) -> str:
    """A dataset TOML of one dataset: ``general`` under ``[general]``, each subset a ``[[datasets.subsets]]``."""
    lines = ["[general]", *(f"{key} = {_toml_value(value)}" for key, value in general.items()), "", "[[datasets]]"]
    for subset in subsets:
        lines += ["", "  [[datasets.subsets]]", *(f"  {key} = {_toml_value(value)}" for key, value in subset.items())]
    return "\n".join(lines) + "\n"


def command_line(script: str, options: dict[str, Any]) -> str:
    """``accelerate launch SCRIPT --option value ...``, one option per line, quoted for a POSIX shell."""
    parts = [f"accelerate launch {shlex.quote(script)}"]
    for name, value in options.items():
        if value is True:
            parts.append(f"--{name}")
        elif isinstance(value, (list, tuple)):
            parts.append(f"--{name} " + " ".join(shlex.quote(str(item)) for item in value))
        else:
            parts.append(f"--{name} {shlex.quote(str(value))}")
    return " \\\n  ".join(parts) + "\n"


# kohya's prompt-file options (``--w 512``) -> the keys of its .toml/.json prompt files.
_PROMPT_OPTIONS = {"n": ("negative_prompt", str), "w": ("width", int), "h": ("height", int), "s": ("sample_steps", int),
                   "l": ("scale", float), "d": ("seed", int), "ss": ("sample_sampler", str)}


def parse_prompt_line(line: str) -> dict[str, Any]:
    """``a frog --n blurry --w 512 --d 3`` -> ``{"prompt": "a frog", "negative_prompt": "blurry", "width": 512, "seed": 3}``.

    As in sd-scripts, the prompt is the text before the first `` --``; an option sdtrain does not know is kept by its letter.
    """
    prompt, *parts = line.strip().split(" --")
    result: dict[str, Any] = {"prompt": prompt.strip()}
    for part in parts:
        letter, _, value = part.strip().partition(" ")
        key, kind = _PROMPT_OPTIONS.get(letter.lower(), (f"--{letter}", str))
        try:
            result[key] = kind(value.strip())
        except ValueError:
            raise UserError(f"The sample prompt '{line.strip()}' has --{letter} {value.strip()!r}, which is not a number. Fix the prompt.") from None
    return result


def read_prompts(path: Path) -> list[dict[str, Any]]:
    """A kohya prompt file: .txt lines (``#`` comments skipped), a .toml ``[prompt]`` with ``[[prompt.subset]]``, or a .json list."""
    text = _read_text(path)
    if path.suffix.lower() == ".toml":
        data = _read_toml(path, text).get("prompt", {})
        shared = {key: value for key, value in data.items() if key != "subset"}
        return [{**shared, **subset} for subset in data.get("subset", [])]
    if path.suffix.lower() == ".json":
        items = json.loads(text) if text.strip() else []
        return [parse_prompt_line(item) if isinstance(item, str) else dict(item) for item in items]
    return prompt_lines(text)


def prompt_lines(text: str) -> list[dict[str, Any]]:
    return [parse_prompt_line(line) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def prompt_line(prompt: str, settings: dict[str, Any]) -> str:
    """The .txt prompt-file line of a prompt and its settings (the inverse of ``parse_prompt_line``)."""
    letters = {key: letter for letter, (key, _) in _PROMPT_OPTIONS.items()}
    return prompt + "".join(f" --{letters[key]} {value}" for key, value in settings.items() if value != "")
