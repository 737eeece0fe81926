"""Recipe keys of ``method: textual_inversion`` (the ``textual_inversion:`` section)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TextualInversionConfig:
    # The prompt word the embedding is learned for: a made-up, lower-case word the tokenizer does not know
    # (e.g. "sls_frog"). AUTOMATIC1111 and ComfyUI take the prompt word from the file name, so the exported
    # files are named after it.
    placeholder: str = ""
    # Word(s) whose embeddings the new vectors start from: one token, or one token per vector.
    initializer: str = "*"
    # Vectors (tokens) the placeholder stands for. More vectors hold more detail but use more of a prompt's
    # 75 tokens; each adds a token to the tokenizer ("sls_frog", "sls_frog_1", ... as diffusers names them).
    num_vectors: int = 1
    # What the images are captioned with: "object" or "style" (built-in prompt templates, "a photo of a {}"
    # or "a painting in the style of {}"), or "dataset" (the dataset's captions, where the placeholder word
    # stands for the embedding).
    captions: str = "object"
    # Your own prompt templates, each with {} where the placeholder goes; they replace the built-in ones.
    templates: list[str] = field(default_factory=list)
