"""count_lora.py FILE... (either venv's python): per LoRA file, the modules (keys ending in lora_down.weight) per part,
their rank, alpha and dtype, and kohya's metadata, to check both tools trained the same modules."""
import collections, sys
from safetensors import safe_open

for path in sys.argv[1:]:
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
        meta = f.metadata() or {}
        downs = [k for k in keys if k.endswith("lora_down.weight")]
        parts = collections.Counter(k.split("_")[1] for k in downs)  # lora_unet_… / lora_te_…
        dtypes = {str(f.get_tensor(k).dtype) for k in downs[:3]}
        ranks = {f.get_tensor(k).shape[0] for k in downs}
        alpha_keys = [k.replace("lora_down.weight", "alpha") for k in downs]
        alphas = {round(f.get_tensor(k).item(), 4) for k in alpha_keys if k in keys}
    print(f"{path}: {len(downs)} modules {dict(parts)}, {len(keys)} tensors, rank {ranks}, alpha {alphas}, {dtypes}, "
          f"ss_network_dim={meta.get('ss_network_dim')} ss_network_alpha={meta.get('ss_network_alpha')}")
