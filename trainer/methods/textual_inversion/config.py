"""Recipe keys of ``method: textual_inversion`` (the ``textual_inversion:`` section)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trainer.checks import broken, one_of

# The placeholder is a file name in AUTOMATIC1111 and ComfyUI (Windows forbids <>:"/\|?*), one word in
# a prompt (no spaces or commas), and what {} in a template stands for.
FORBIDDEN_IN_PLACEHOLDER = set('<>:"/\\|?*{},')

# The prompt templates of textual_inversion.captions: object and style (Textual Inversion's own sets).
OBJECT_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a dark photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a photo of the small {}",
    "a photo of the large {}",
    "a rendition of the {}",
    "a picture of a {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a dark painting in the style of {}",
    "a good painting in the style of {}",
    "a picture in the style of {}",
    "a small painting in the style of {}",
    "a large painting in the style of {}",
    "an artwork in the style of {}",
)
BUILT_IN_TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}


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


def problems(cfg: TextualInversionConfig) -> list[str]:
    """The ``textual_inversion:`` values that cannot train, each with its fix (see trainer/checks.py).

    Whether the placeholder is new to the tokenizer, and how it splits the initializer, is checked
    with the model's tokenizer at hand (method.py).
    """
    placeholder, captions = cfg.placeholder, (*BUILT_IN_TEMPLATES, "dataset")
    bad = "".join(sorted({char for char in placeholder if char in FORBIDDEN_IN_PLACEHOLDER or char.isspace()}))
    return broken("textual_inversion", cfg, [
        ("placeholder", bool(placeholder), "set it to the made-up word the embedding is for, e.g. 'sls_frog'."),
        ("placeholder", not bad,
         f"it contains {bad!r}. The placeholder is one prompt word and the name of the exported file (AUTOMATIC1111 and "
         "ComfyUI take the prompt word from it), so it cannot hold spaces, commas, braces or <>:\"/\\|?*. Use letters, "
         "digits, _ or -, e.g. 'sls_frog'."),
        ("placeholder", placeholder == placeholder.lower(),
         f"use lower case ('{placeholder.lower()}'). CLIP lower-cases every prompt, and diffusers only expands a "
         "multi-vector word it finds spelled exactly as trained."),
        ("num_vectors", cfg.num_vectors >= 1, "it must be at least 1."),
        ("captions", cfg.captions in captions, one_of(cfg.captions, captions)),
        ("templates", not (cfg.templates and cfg.captions == "dataset"),
         "templates replace the captions, which contradicts textual_inversion.captions: dataset. Remove the templates, "
         "or set captions to object or style."),
        ("templates", all("{}" in template for template in cfg.templates),
         "a template without {} never puts the placeholder into the prompt, so the embedding would not train. Mark "
         "where it goes with {}, e.g. 'a photo of a {}'."),
    ])
