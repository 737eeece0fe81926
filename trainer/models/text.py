"""CLIP prompt encoding, shared by every family that conditions on CLIP text encoders.

A family declares its encoders as ``TextEncoderSpec``s: which hidden layer it conditions on, whether
the final layer norm is applied to it, and whether the encoder gives the pooled prompt vector. This
module does the rest the same way for all of them:

* **clip_skip** counts layers back from the family's own layer: SD1/SD2 condition on the last layer
  (``clip_skip: 2`` = the penultimate one through the final layer norm, as AUTOMATIC1111 and kohya
  do); SDXL conditions on the penultimate layer without the norm (``clip_skip: 2`` = one further
  back, as diffusers' ``clip_skip=1``). See docs/sdxl.md.
* **Long prompts** (``data.max_token_length`` 150 or 225) are cut into 75-token chunks, each encoded
  as its own ``<BOS> … <EOS>`` window, and the hidden states are joined as kohya joins them:
  the first ``<BOS>`` state, the 75 inner states of every chunk, the last state of the last chunk
  (2 + 75·n states; for one chunk that is exactly the plain 77-token encoding).
* **Pooling** takes the final-normed last layer at the *first* end-of-text token of the first chunk,
  then the encoder's ``text_projection``. transformers pools at ``argmax(input_ids)`` for configs
  with the legacy ``eos_token_id: 2``, which lands on a Textual Inversion token (ids above the
  vocabulary) instead; ``fix_pooling`` makes transformers' own pooling agree with ours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

CHUNK_TOKENS = 75  # tokens between <BOS> and <EOS> in one CLIP window of 77


@dataclass(frozen=True)
class TextEncoderSpec:
    """How a family uses one of its CLIP text encoders."""

    # diffusers' component names in a pipeline folder; also the encoder's name in checkpoints.
    component: str
    tokenizer_component: str
    # Short name of the encoder: the key of its vectors in multi-encoder embedding files ("clip_l", "clip_g").
    key: str
    # kohya's LoRA module-name prefix for this encoder ("lora_te"; "lora_te1"/"lora_te2" with two encoders).
    kohya_prefix: str
    # The hidden state conditioned on with clip_skip 1: -1 the last layer, -2 the penultimate one.
    layer: int
    # Apply the final layer norm to a layer before the last (the last layer's output is always normed).
    final_norm: bool
    # The tokenizer's padding token: "<|endoftext|>" for OpenAI's CLIP, "!" (id 0) for OpenCLIP models.
    pad_token: str
    # This encoder gives the pooled, projected prompt vector (a CLIPTextModelWithProjection).
    pooled: bool = False


def final_layer_norm(encoder: nn.Module) -> nn.Module:
    # transformers 5 keeps CLIPTextModel's modules at the top level, CLIPTextModelWithProjection's under text_model.
    return getattr(encoder, "text_model", encoder).final_layer_norm


def fix_pooling(encoder: nn.Module, tokenizer) -> None:
    """Make transformers pool at the first end-of-text token, whatever the config's legacy eos id says.

    The config is updated too, so a pipeline saved from this encoder pools the same way when reloaded.
    """
    inner = getattr(encoder, "text_model", encoder)
    inner.eos_token_id = tokenizer.eos_token_id
    encoder.config.eos_token_id = tokenizer.eos_token_id


def token_windows(tokenizer, captions: list[str], max_token_length: int = CHUNK_TOKENS) -> torch.Tensor:
    """Token ids [B, chunks, 77]: each caption cut into ``max_token_length // 75`` windows ``<BOS> 75 tokens <EOS|pad>``.

    Tokenizers that pad with something else than ``<EOS>`` (SD2's and SDXL's OpenCLIP "!") get kohya's
    fixes: a window whose text runs on past it ends in ``<EOS>``, an empty window starts ``<BOS> <EOS>``.
    """
    chunks = max_token_length // CHUNK_TOKENS
    ids = tokenizer(
        captions, padding="max_length", truncation=True, max_length=chunks * CHUNK_TOKENS + 2, return_tensors="pt"
    ).input_ids
    if chunks == 1:
        return ids[:, None]
    bos, last = ids[:, :1], ids[:, -1:]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    windows = []
    for chunk in range(chunks):
        window = torch.cat([bos, ids[:, 1 + chunk * CHUNK_TOKENS : 1 + (chunk + 1) * CHUNK_TOKENS], last], dim=1)
        if pad != eos:
            runs_on = (window[:, -2] != eos) & (window[:, -2] != pad)
            window[runs_on, -1] = eos
            window[window[:, 1] == pad, 1] = eos
        windows.append(window)
    return torch.stack(windows, dim=1)


def join_windows(states: torch.Tensor, chunks: int) -> torch.Tensor:
    """[B*chunks, 77, D] -> [B, 2 + 75*chunks, D]: the first <BOS>, every window's inner states, the last state."""
    batch = states.shape[0] // chunks
    states = states.reshape(batch, chunks, states.shape[1], states.shape[2])
    inner = states[:, :, 1 : 1 + CHUNK_TOKENS].reshape(batch, chunks * CHUNK_TOKENS, states.shape[-1])
    return torch.cat([states[:, 0, :1], inner, states[:, -1, -1:]], dim=1)


def first_eos_positions(ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Index of the first end-of-text token in each row (0 where there is none)."""
    return (ids == eos_token_id).int().argmax(dim=1)


def encode(spec: TextEncoderSpec, tokenizer, encoder: nn.Module, captions: list[str], clip_skip: int, max_token_length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states [B, 2 + 75n, D], pooled [B, P] or None) of one encoder for ``captions``."""
    windows = token_windows(tokenizer, captions, max_token_length)
    batch, chunks, length = windows.shape
    ids = windows.reshape(batch * chunks, length).to(encoder.device)
    output = encoder(ids, output_hidden_states=True)
    layer = spec.layer - (clip_skip - 1)
    if layer == -1:
        states = output.last_hidden_state
    else:
        states = output.hidden_states[layer]
        if spec.final_norm:
            states = final_layer_norm(encoder)(states)
    pooled = None
    if spec.pooled:
        first = output.last_hidden_state.reshape(batch, chunks, length, -1)[:, 0]
        at_eos = first[torch.arange(batch, device=first.device), first_eos_positions(windows[:, 0], tokenizer.eos_token_id).to(first.device)]
        pooled = encoder.text_projection(at_eos)
    return join_windows(states, chunks), pooled


def check_clip_skip(spec: TextEncoderSpec, encoder: nn.Module, clip_skip: int) -> str | None:
    """Why ``clip_skip`` does not fit ``encoder`` (None if it does)."""
    layers = encoder.config.num_hidden_layers
    if clip_skip < 1 or -(spec.layer - (clip_skip - 1)) > layers:
        return f"the text encoder '{spec.component}' has {layers} layers, so model.clip_skip must be between 1 and {layers + spec.layer + 1}"
    return None
