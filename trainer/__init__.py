"""sdtrain: fine-tune Stable Diffusion models from YAML recipes, offline."""

import logging

# bitsandbytes warns on import about optional CPU kernels on machines without them; the 8-bit
# optimizers sdtrain uses run on CUDA and need none of them.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

__version__ = "0.1.0"
