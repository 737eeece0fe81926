"""``method: textual_inversion``: learn new token embeddings, leave the model untouched."""
