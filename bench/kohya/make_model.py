"""make_model.py WORK [sdxl] (with sdtrain's python): write sdtrain's random:sd1 (seeded, so the same weights every
time, fp32) as the diffusers folder WORK/models/sd15-random and the single file WORK/models/sd15-random.safetensors (and
rounded to fp16, WORK/models/sd15-random-fp16.safetensors and the folder WORK/models/sd15-random-fp16), the built-in tiny model as the diffusers folder WORK/models/tiny, and the CLIP tokenizer. With sdxl: only random:sdxl as the
single file WORK/models/sdxl-random.safetensors (fp16, 7 GB: what SDXL files are shared as) and SDXL's second tokenizer."""
import copy
import sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
from trainer.models.base_model import replace_parts
from trainer.models.export import save_diffusers_folder, save_single_file
from trainer.models.loading import load_base_model
from trainer.models.tokenizer import write_tokenizer_files


def prefix_text_encoder_keys(folder: Path) -> None:
    """transformers 5 saves CLIPTextModel's weights without the 'text_model.' prefix, and kohya's transformers 4.54
    then matches none of them and keeps a randomly initialised text encoder. Every version reads the prefixed names."""
    path = folder / "text_encoder" / "model.safetensors"
    weights = load_file(path)
    if not all(k.startswith("text_model.") for k in weights):
        prefixed = {("" if k.startswith("text_model.") else "text_model.") + k: v.contiguous() for k, v in weights.items()}
        save_file(prefixed, path, metadata={"format": "pt"})


models = Path(sys.argv[1]) / "models"
models.mkdir(parents=True, exist_ok=True)
# kohya loads its tokenizers by hub id unless --tokenizer_cache_dir holds a folder of that name (the id with "_" for
# "/"); sdtrain writes the same tokenizer files offline.
tokenizers = Path(sys.argv[1]) / "tokenizer_cache"
write_tokenizer_files(tokenizers / "openai_clip-vit-large-patch14")
if sys.argv[2:] == ["sdxl"]:
    # Every part loaded as fp16, converted one tensor at a time: the fp32 model (14 GB) and an fp16 copy would not
    # fit 24 GB together.
    model = load_base_model("random:sdxl", frozen_dtype=torch.float16, vae_fp32=False)
    # SDXL's second tokenizer (OpenCLIP bigG) is the same BPE padded with "!".
    write_tokenizer_files(tokenizers / "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k", pad_token="!")
    save_single_file(model, models / "sdxl-random.safetensors", dtype=torch.float16, title="sdxl-random")
    sys.exit()
save_diffusers_folder(load_base_model("tiny"), models / "tiny", "fp32", replace=True)
prefix_text_encoder_keys(models / "tiny")
model = load_base_model("random:sd1")
save_diffusers_folder(model, models / "sd15-random", "fp32", replace=True)
prefix_text_encoder_keys(models / "sd15-random")
# The same weights rounded to fp16, as checkpoints are shared: a single file, and a diffusers folder of fp16 files.
save_single_file(model, models / "sd15-random-fp16.safetensors", dtype=torch.float16, title="sd15-random-fp16")
replace_parts(model, {name: copy.deepcopy(part).half() for name, part in model.parts().items()}).pipeline().save_pretrained(
    models / "sd15-random-fp16", safe_serialization=True
)
prefix_text_encoder_keys(models / "sd15-random-fp16")
# Last: setup_env.sh takes this file as the sign that everything above is there.
save_single_file(model, models / "sd15-random.safetensors", dtype=torch.float32, title="sd15-random")
