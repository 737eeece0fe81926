"""``method: dreambooth``: full-model training with prior preservation, exported as whole checkpoints."""
