"""crosscheck_values.py SD_SCRIPTS EXPORT_TRAIN_SH KOHYA_CMD_FILE (with kohya's venv python): parse both train_network.py
command lines with kohya's own parser and print every argument whose value differs (the export's dataset_config aside)."""
import os, shlex, sys

sd_scripts, export_path, kohya_path = sys.argv[1:4]
sys.path.insert(0, sd_scripts)
os.chdir(sd_scripts)  # where sd-scripts' own scripts are run from
import train_network

parser = train_network.setup_parser()


def parsed(path):
    tokens = shlex.split(open(path).read().replace("\\\n", " "), comments=True)
    return vars(parser.parse_args(tokens[tokens.index("train_network.py") + 1:]))


export, kohya = parsed(export_path), parsed(kohya_path)
for key in sorted(export.keys() | kohya.keys()):
    if export.get(key) != kohya.get(key):
        print(f"  {key}: export={export.get(key)!r}  run_kohya.sh={kohya.get(key)!r}")
