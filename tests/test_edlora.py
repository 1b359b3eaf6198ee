"""Mix-of-Show ED-LoRA concept files in LoRA-Composer, on a synthetic file with the official key names and shapes.

The file is built the way Mix-of-Show's ``EDLoRATrainer`` saves one (``delta_state_dict`` under ``params``): LoRA
``lora_down``/``lora_up`` on every linear of each UNet ``Attention`` and text-encoder ``CLIPAttention`` module,
text-encoder keys in the transformers-4 tree (``text_model.…``), and two new tokens with one embedding per
cross-attention layer. The reference composition is computed the official way, independently of visadapt: LoRA
fused into the weights (``W + alpha·up@down``, alpha 1), one added token per (token, layer) bound into the prompt
(``bind_concept_prompt``), and each cross-attention layer (counted down → mid → up) reading its own encoding.
"""

from __future__ import annotations

import pathlib

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from visadapt.diffusion import ComposerConfig, Concept, LoraFileError
from visadapt.diffusion.tiny import tiny_pipeline
from visadapt.pipelines import LoRAComposerPipeline, LoRAComposerXLPipeline

PLAIN = ComposerConfig(latent_optimization=False, latent_reinit=False)
SIZE = dict(height=32, width=64)
TOKENS = ("<cat1>", "<cat2>")
PROMPT = "a photo of a <cat1> <cat2> cat"


def official_cross_attention_order(unet) -> list[str]:
    """LoRA_Composer / Mix-of-Show ``change_forward``: attn2 modules counted in down_blocks, mid_block, up_blocks."""
    names = []

    def walk(module, prefix):
        for name, child in module.named_children():
            if type(child).__name__ == "Attention" and name == "attn2":
                names.append(f"{prefix}.{name}")
            else:
                walk(child, f"{prefix}.{name}")

    for part in ("down_blocks", "mid_block", "up_blocks"):
        walk(getattr(unet, part), part)
    return names


def edlora_params(pipe, seed: int = 0, rank: int = 2, n_layers: int | None = None, old_names: bool = False) -> dict:
    """An ED-LoRA ``params`` dict with the official names and shapes for ``pipe``; ``old_names``: the older
    Mix-of-Show naming LoRA-Composer vendors (``…to_k_lora.down.weight``)."""
    down, up = ("_lora.down", "_lora.up") if old_names else (".lora_down", ".lora_up")
    gen = torch.Generator().manual_seed(seed)
    n_layers = n_layers or len(official_cross_attention_order(pipe.unet))
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]

    def lora(root, owner_class, prefix=""):
        out = {}
        for name, module in root.named_modules():
            if type(module).__name__ != owner_class:
                continue
            for child_name, child in module.named_modules():
                if isinstance(child, torch.nn.Linear):
                    key = f"{prefix}{name}.{child_name}"
                    out[f"{key}{down}.weight"] = torch.randn(rank, child.in_features, generator=gen) * 0.3
                    out[f"{key}{up}.weight"] = torch.randn(child.out_features, rank, generator=gen) * 0.3
        return out

    return {"new_concept_embedding": {t: torch.randn(n_layers, width, generator=gen) for t in TOKENS},
            "text_encoder": lora(pipe.text_encoder, "CLIPAttention", prefix="text_model."),
            "unet": lora(pipe.unet, "Attention")}


def save_edlora(params: dict, path: pathlib.Path) -> pathlib.Path:
    torch.save({"params": params}, str(path))
    return path


def generate(pipe, **kwargs):
    kwargs = {**SIZE, "prompt": "a cat in a park", **kwargs}
    return pipe(num_inference_steps=3, output_type="latent", generator=torch.Generator().manual_seed(0),
                **kwargs).images


class LayerText(AttnProcessor2_0):
    """Cross-attention reading its own slice of a sequence-concatenated stack of per-layer encodings."""

    def __init__(self, index: int, length: int):
        super().__init__()
        self.index, self.length = index, length

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        context = encoder_hidden_states[:, self.index * self.length:(self.index + 1) * self.length]
        return super().__call__(attn, hidden_states, context, *args, **kwargs)


def official_reference(params: dict):
    """The composed latents of one full-canvas ED-LoRA concept, computed the official way on a fresh pipeline."""
    pipe = tiny_pipeline("sd")
    order = official_cross_attention_order(pipe.unet)
    with torch.no_grad():  # fuse attn2 K/V/O (the parts LoRA-Composer uses) and the text encoder LoRA
        for key, down in params["unet"].items():
            module = key.removesuffix(".lora_down.weight")
            used = ".attn2." in module and module.endswith(("to_k", "to_v", "to_out.0"))
            if key.endswith(".lora_down.weight") and used:
                pipe.unet.get_submodule(module).weight += params["unet"][f"{module}.lora_up.weight"] @ down
        for key, down in params["text_encoder"].items():
            if not key.endswith(".lora_down.weight"):
                continue
            module = key.removesuffix(".lora_down.weight")
            up = params["text_encoder"][f"{module}.lora_up.weight"]
            pipe.text_encoder.get_submodule(module.removeprefix("text_model.")).weight += up @ down
    # load_new_concept: tokens <new0> … one per (token, layer), then bind_concept_prompt per layer
    n_layers = len(order)
    names = {t: [f"<new{k * n_layers + i}>" for i in range(n_layers)] for k, t in enumerate(TOKENS)}
    pipe.tokenizer.add_tokens([n for per_layer in names.values() for n in per_layer])
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer), mean_resizing=False)
    table = pipe.text_encoder.get_input_embeddings().weight.data
    for token, per_layer in names.items():
        table[pipe.tokenizer.convert_tokens_to_ids(per_layer)] = params["new_concept_embedding"][token]
    prompts = [PROMPT] * n_layers
    for token, per_layer in names.items():
        prompts = [p.replace(token, new) for p, new in zip(prompts, per_layer)]
    cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True, negative_prompt=[""] * n_layers)[:2]
    length = cond.shape[1]
    pipe.unet.set_attn_processor({name: LayerText(order.index(name.removesuffix(".processor")), length)
                                  if ".attn2." in name else AttnProcessor2_0() for name in pipe.unet.attn_processors})

    def flat(e):
        return e.reshape(1, -1, e.shape[-1])

    return generate(pipe, prompt=None, prompt_embeds=flat(cond), negative_prompt_embeds=flat(uncond))


def test_full_canvas_edlora_concept_equals_the_official_fused_layer_wise_model(tmp_path):
    pipe = tiny_pipeline("sd", pipeline_class=LoRAComposerPipeline)
    params = edlora_params(pipe)
    path = save_edlora(params, tmp_path / "catA.pth")
    composed = generate(pipe, concepts=[Concept(lora=path, prompt=PROMPT, box=[0, 0, 1, 1])], composer=PLAIN)
    # Latents reach |63|; fusing W + up@down vs adding up(down(x)) differs by float rounding (~2e-4).
    torch.testing.assert_close(composed, official_reference(params), atol=1e-3, rtol=1e-4)

    # The layer-wise embeddings matter: the same file with every layer's embedding equal to layer 0's differs.
    flat = {**params, "new_concept_embedding": {t: e[:1].expand_as(e).clone()
                                                for t, e in params["new_concept_embedding"].items()}}
    other = generate(pipe, concepts=[Concept(lora=save_edlora(flat, tmp_path / "flat.pth"), prompt=PROMPT,
                                             box=[0, 0, 1, 1])], composer=PLAIN)
    assert (other - composed).abs().max() > 1e-3


def test_old_and_new_mix_of_show_key_names_load_alike(tmp_path):
    pipe = tiny_pipeline("sd", pipeline_class=LoRAComposerPipeline)
    new = save_edlora(edlora_params(pipe, seed=3), tmp_path / "new.pth")
    old = save_edlora(edlora_params(pipe, seed=3, old_names=True), tmp_path / "old.pth")
    images = [generate(pipe, concepts=[Concept(lora=path, prompt=PROMPT, box=[0, 0, 0.5, 1])], composer=PLAIN)
              for path in (new, old)]
    assert torch.equal(*images)
    assert (images[0] - generate(pipe, composer=PLAIN)).abs().max() > 1e-3


def test_edlora_concept_composes_with_a_safetensors_one_and_pulls_its_new_tokens(tmp_path):
    from visadapt.diffusion.composer.edlora import concept_tokens, cross_attention_layers
    from visadapt.diffusion.tiny import save_random_lora

    pipe = tiny_pipeline("sd", pipeline_class=LoRAComposerPipeline)
    path = save_edlora(edlora_params(pipe, seed=1), tmp_path / "catA.pth")
    dog = save_random_lora(pipe, tmp_path / "dog.safetensors", seed=2)
    concepts = [Concept(lora=path, prompt=PROMPT, box=[0, 0, 0.5, 1]),
                Concept(lora=dog, prompt="a photo of a dog", box=[0.5, 0, 1, 1])]
    out = generate(pipe, concepts=concepts, composer=ComposerConfig(latent_reinit=False))
    assert torch.isfinite(out).all() and all(g > 0 for g in pipe.composition_log["grad_norms"])
    assert [n.removesuffix(".processor") for n in cross_attention_layers(pipe.unet)] == \
        official_cross_attention_order(pipe.unet)
    tokens = concept_tokens(pipe, "catA")
    assert set(tokens) == set(TOKENS) and all(len(v) == 4 for v in tokens.values())
    layer = pipe.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn2.to_k")
    assert layer.scaling["catA"] == 1.0  # Mix-of-Show's alpha 1
    # The loss pulls exactly the two new tokens (positions in "a photo of a <cat1> <cat2> cat"), as the official code.
    seen = {}

    def look(p, step, timestep, tensors):
        seen["positions"] = p._run.positions
        return tensors

    generate(pipe, concepts=concepts, composer=PLAIN, callback_on_step_end=look)
    assert seen["positions"] == [[5, 6], [5]]


def test_bad_edlora_files_say_what_is_wrong(tmp_path):
    pipe = tiny_pipeline("sd", pipeline_class=LoRAComposerPipeline)
    params = edlora_params(pipe)
    pickled = tmp_path / "pickled.pth"
    torch.save({"params": {"unet": {}, "text_encoder": {}, "where": pathlib.PurePosixPath("x")}}, str(pickled))
    fused = tmp_path / "combined_model_.pth"
    torch.save({"params": {"text_encoder": {"text_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(2)},
                           "unet": {}}}, str(fused))
    deeper = save_edlora(edlora_params(pipe, n_layers=16), tmp_path / "sd15.pth")
    narrow = save_edlora({**params, "unet": {k: v[:, :3] if "lora_down" in k else v
                                             for k, v in params["unet"].items()}}, tmp_path / "narrow.pth")
    broken = {**params, "new_concept_embedding": {**params["new_concept_embedding"],
                                                  "<cat2>": params["new_concept_embedding"]["<cat2>"] * float("nan")}}
    nan = save_edlora(broken, tmp_path / "nan.pth")
    cases = [(pickled, "objects other than tensors"), (fused, "combined_model"),
             (nan, r"NaN or inf weights in 1 tensor\(s\): new_concept_embedding.<cat2>"),
             (deeper, r"one per cross-attention layer \(4, 32\)"), (narrow, "does not fit this base model"),
             (tmp_path / "missing.pth", "not found")]
    for path, message in cases:
        with pytest.raises(LoraFileError, match=message):
            generate(pipe, concepts=[Concept(lora=path, prompt=PROMPT, box=[0, 0, 1, 1])], composer=PLAIN)
    xl = tiny_pipeline("sdxl", pipeline_class=LoRAComposerXLPipeline)
    with pytest.raises(LoraFileError, match="SDXL"):
        generate(xl, concepts=[Concept(lora=save_edlora(params, tmp_path / "a.pth"), prompt=PROMPT, box=[0, 0, 1, 1])],
                 composer=PLAIN)
