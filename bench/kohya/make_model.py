"""make_model.py WORK (with sdtrain's python): write sdtrain's random:sd1 (seeded, so the same weights every time, fp32)
as the diffusers folder WORK/models/sd15-random and the single file WORK/models/sd15-random.safetensors, the built-in
tiny model as the diffusers folder WORK/models/tiny, and the CLIP tokenizer."""
import sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
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
save_diffusers_folder(load_base_model("tiny"), models / "tiny", "fp32", replace=True)
prefix_text_encoder_keys(models / "tiny")
model = load_base_model("random:sd1")
save_diffusers_folder(model, models / "sd15-random", "fp32", replace=True)
prefix_text_encoder_keys(models / "sd15-random")
# kohya loads its tokenizer by hub id (openai/clip-vit-large-patch14) unless --tokenizer_cache_dir holds a folder
# of that name; sdtrain writes the same tokenizer files offline.
write_tokenizer_files(Path(sys.argv[1]) / "tokenizer_cache" / "openai_clip-vit-large-patch14")
# Last: setup_env.sh takes this file as the sign that everything above is there.
save_single_file(model, models / "sd15-random.safetensors", dtype=torch.float32, title="sd15-random")
