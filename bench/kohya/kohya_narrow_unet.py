"""kohya_narrow_unet.py MODEL_FOLDER SCRIPT ARGS...: run an sd-scripts training script on a diffusers folder whose
SD1-layout UNet is narrower than SD1.5's (sdtrain's built-in tiny model).

sd-scripts rebuilds a diffusers UNet as its own `library.original_unet.UNet2DConditionModel`, whose widths and group
counts are module constants fixed at SD1.5's (BLOCK_OUT_CHANNELS = (320, 640, 1280, 1280), 32 groups); a narrower
UNet's weights do not fit it. The class reads those constants when it is built, so setting them from the folder's
unet/config.json before the script runs builds the same layout at the folder's widths; nothing else changes."""
import json
import runpy
import sys
from pathlib import Path

model, script, *arguments = sys.argv[1:]
config = json.loads((Path(model) / "unet" / "config.json").read_text())
fixed = {"down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "layers_per_block": 2, "in_channels": 4,
         "out_channels": 4, "use_linear_projection": False}
for key, value in fixed.items():
    if config[key] != value:
        sys.exit(f"{model}: unet {key} is {config[key]!r}; sd-scripts' SD1 UNet is built with {value!r} only")

from library import original_unet  # noqa: E402  (sd-scripts' package, importable from its folder)

widths = tuple(config["block_out_channels"])
original_unet.BLOCK_OUT_CHANNELS = widths
original_unet.TIMESTEP_INPUT_DIM = widths[0]
original_unet.TIME_EMBED_DIM = widths[0] * 4
original_unet.NORM_GROUPS = config["norm_num_groups"]
original_unet.TRANSFORMER_NORM_NUM_GROUPS = config["norm_num_groups"]
original_unet.NORM_EPS = config["norm_eps"]
sys.argv = [script, *arguments]
runpy.run_path(script, run_name="__main__")
