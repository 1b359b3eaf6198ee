"""Mix-of-Show ED-LoRA concept files (``.pth``), the format LoRA-Composer's own concepts come in.

An ED-LoRA file is what Mix-of-Show's ``EDLoRATrainer.delta_state_dict`` saves, wrapped as ``{"params": …}``:

* ``new_concept_embedding``: ``{"<cat1>": (X, D), "<cat2>": (X, D)}``, the concept's new tokens with one input
  embedding per UNet cross-attention layer (P+; X = 16 for SD-1.x, D the text encoder width). X = 1 is a plain
  textual-inversion token. Older files name this ``new_concept_token``.
* ``text_encoder``: ``{"text_model.encoder.layers.0.self_attn.q_proj.lora_down.weight": (r, D), "….lora_up.weight":
  (D, r), …}``: LoRA on the text encoder's attention (and with ``where: CLIPEncoderLayer`` its MLP) linears.
* ``unet``: ``{"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_down.weight": (r, in), …}``: LoRA on
  the attention linears (or every linear and 1×1 conv of the transformer blocks), ``lora_up`` (out, r) or
  (out, r, 1, 1) for convs. The older Mix-of-Show that LoRA-Composer vendors names them ``….to_k_lora.down.weight``
  / ``….to_k_lora.up.weight`` (its ``convert_old_EDLoRA.py`` turns one naming into the other); both load.

The trainer's LoRA forward is ``W x + alpha · up(down(x))`` with ``alpha`` from its config (not in the file; 1.0 in
every Mix-of-Show and LoRA-Composer concept config, and LoRA-Composer fuses with ``unet_alpha = text_encoder_alpha =
1.0``), so the deltas are loaded at scale 1; ``Concept.weight`` multiplies them.

Files are read with ``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary objects.

Layer-wise embeddings enter as LoRA-Composer uses them: the regional prompt is encoded once per cross-attention layer
with each new token bound to that layer's embedding (``bind_concept_prompt``), and cross-attention layer ℓ (counted
down blocks → mid block → up blocks) reads encoding ℓ. Each (token, layer) pair becomes one added tokenizer token
whose input embedding is that layer's vector, as the official loader does.
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch

from visadapt.diffusion.composer.lora_files import LoraFileError, fit_problems, keep_active_adapters, quiet_loading

_LORA_KEY = re.compile(r"^(.+?)(?:\.lora_|_lora\.)(down|up)\.weight$")
_PARTS = ("down_blocks", "mid_block", "up_blocks")
_SECTIONS = {"unet", "text_encoder", "new_concept_embedding", "new_concept_token"}


class EDLoRAError(LoraFileError):
    """An ED-LoRA file that cannot be read or does not fit the pipeline."""


@dataclass
class EDLoRA:
    """The parts of one ED-LoRA file: token → (X, D) embeddings and the LoRA of each component (peft keys)."""

    embeddings: dict[str, torch.Tensor]
    lora: dict[str, torch.Tensor]  # "unet.….lora_A.weight" / "text_encoder.….lora_B.weight"


def read_edlora(path: Union[str, os.PathLike]) -> dict:
    """The ``params`` dict of an ED-LoRA file, loaded without unpickling anything but tensors and containers."""
    path = Path(path)
    if not path.is_file():
        raise EDLoRAError(f"ED-LoRA file not found: {path}.")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise EDLoRAError(f"{path.name} holds objects other than tensors, so it is not loaded (a pickle can run code "
                          f"when opened; {str(err).splitlines()[0]}). Re-save its tensors only.") from None
    except Exception as err:  # zip/pickle errors of every kind for files that are not torch saves
        raise EDLoRAError(f"{path.name} is not a readable torch .pth file ({err}).") from None
    params = state.get("params", state) if isinstance(state, dict) else None
    if not isinstance(params, dict) or not _SECTIONS & set(params):
        shown = ", ".join(list(params)[:4]) if isinstance(params, dict) else type(state).__name__
        raise EDLoRAError(f"{path.name} is not a Mix-of-Show ED-LoRA file: expected 'new_concept_embedding', "
                          f"'text_encoder' and 'unet' (under 'params'), found {shown}.")
    return params


def to_edlora(params: dict, pipe, label: str) -> EDLoRA:
    """Check an ED-LoRA ``params`` dict against ``pipe`` and convert its LoRA to peft keys."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise EDLoRAError(f"{label}: ED-LoRA concepts are for SD-1.x/2.x (one text encoder); this is an SDXL pipeline.")
    embeddings = dict(params.get("new_concept_embedding") or params.get("new_concept_token") or {})
    lora: dict[str, torch.Tensor] = {}
    for component, root in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        for key, tensor in (params.get(component) or {}).items():
            match = _LORA_KEY.match(key)
            if match is None:
                raise EDLoRAError(f"{label}: {component} weight {key!r} is not a LoRA matrix; a LoRA-Composer "
                                  "combined_model (fused full weights) is not a concept file: pass the ED-LoRA .pth "
                                  "it was fused from (its concept config's 'lora_path').")
            module, side = match.groups()
            lora[f"{component}.{_module_path(root, module)}.lora_{'A' if side == 'down' else 'B'}.weight"] = tensor
    _check_embeddings(embeddings, pipe, label)
    _check_finite({**{f"new_concept_embedding.{t}": e for t, e in embeddings.items()}, **lora}, label)
    return EDLoRA(embeddings, lora)


def _check_finite(tensors: dict[str, torch.Tensor], label: str) -> None:
    """One NaN or inf weight turns the whole image into NaN; name the tensors instead."""
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise EDLoRAError(f"{label} holds NaN or inf weights in {len(bad)} tensor(s): {shown}. The file is corrupt "
                          "or its training diverged; use a good checkpoint.")


def _module_path(root: torch.nn.Module, path: str) -> str:
    """``path`` as it names a module of ``root`` (ED-LoRA names the transformers-4 tree ``text_model.…``)."""
    for candidate in (path, path.removeprefix("text_model.")):
        try:
            root.get_submodule(candidate)
            return candidate
        except AttributeError:
            continue
    return path  # reported by the fit check


def cross_attention_layers(unet) -> list[str]:
    """Names of the UNet's cross-attention processors in ED-LoRA's layer order: down blocks, mid block, up blocks."""
    names = [n for n in unet.attn_processors if n.rsplit(".", 2)[-2] == "attn2"]
    return sorted(names, key=lambda n: _PARTS.index(n.split(".")[0]) if n.split(".")[0] in _PARTS else len(_PARTS))


def _check_embeddings(embeddings: dict[str, torch.Tensor], pipe, label: str) -> None:
    n_layers = len(cross_attention_layers(pipe.unet))
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    for token, vectors in embeddings.items():
        if vectors.ndim != 2 or vectors.shape[1] != width or vectors.shape[0] not in (1, n_layers):
            raise EDLoRAError(f"{label}: token {token} has embeddings of shape {tuple(vectors.shape)}; this pipeline "
                              f"needs (1, {width}) or one per cross-attention layer ({n_layers}, {width}). Was it "
                              "trained for another base model?")


def layer_token(adapter: str, token: str, layer: int) -> str:
    """The tokenizer token standing for ``token`` of concept ``adapter`` at cross-attention layer ``layer``."""
    return f"<{adapter}|{token.strip('<>')}|{layer}>".lower()


def add_tokens(pipe, adapter: str, embeddings: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Add each (token, layer) as a tokenizer token with its embedding; return token → its per-layer token names.

    Reloading a concept overwrites its tokens' embeddings.
    """
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    names = {token: [layer_token(adapter, token, i) for i in range(len(vectors))]
             for token, vectors in embeddings.items()}
    tokenizer.add_tokens([name for per_layer in names.values() for name in per_layer])
    if len(tokenizer) > encoder.get_input_embeddings().weight.shape[0]:
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows set below
    table = encoder.get_input_embeddings().weight
    with torch.no_grad():
        for token, per_layer in names.items():
            ids = tokenizer.convert_tokens_to_ids(per_layer)
            table[ids] = embeddings[token].to(table)
    return names


def bind(prompt: str, tokens: dict[str, list[str]], layer: int) -> str:
    """``prompt`` with each concept token replaced by its layer-``layer`` token (a single-vector token: its one)."""
    for token, per_layer in tokens.items():
        prompt = prompt.replace(token, per_layer[min(layer, len(per_layer) - 1)])
    return prompt


def layer_wise(tokens: dict[str, list[str]], prompt: str) -> bool:
    """Whether ``prompt`` uses a token with one embedding per cross-attention layer."""
    return any(len(per_layer) > 1 and token in prompt for token, per_layer in tokens.items())


def load_edlora_concept(pipe, path: Union[str, os.PathLike], adapter_name: str) -> dict[str, list[str]]:
    """Load an ED-LoRA file into ``pipe``: its LoRA as the (inactive) adapter ``adapter_name``, its tokens into the
    tokenizer and text encoder. Returns token → per-layer token names (also kept in ``pipe._edlora_tokens``)."""
    label = Path(path).name
    edlora = to_edlora(read_edlora(path), pipe, label)
    problems = fit_problems(pipe, edlora.lora)
    if problems:
        listed = "\n  ".join(problems[:5])
        raise EDLoRAError(f"{label} does not fit this base model; {len(problems)} LoRA matrices differ:\n  {listed}\n"
                          "Was it trained for another base (SD-1.x vs SD-2.x)?")
    if edlora.lora:
        with keep_active_adapters(pipe), quiet_loading():
            pipe.load_lora_weights(edlora.lora, adapter_name=adapter_name)
    tokens = add_tokens(pipe, adapter_name, edlora.embeddings)
    pipe.__dict__.setdefault("_edlora_tokens", {})[adapter_name] = tokens
    return tokens


def concept_tokens(pipe, adapter_name: str) -> dict[str, list[str]]:
    """Token → per-layer token names of an ED-LoRA concept loaded into ``pipe`` (empty for other concepts)."""
    return pipe.__dict__.get("_edlora_tokens", {}).get(adapter_name, {})
