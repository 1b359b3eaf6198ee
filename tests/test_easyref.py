"""EasyRef on a tiny random Qwen2-VL and the tiny SDXL pipeline (offline).

Checks: encoder shapes for 1 and 5 references; the encoder equals the official computation re-run through
transformers' own model forward (truncated MLLM normalised, final layer causal with plain positions); the causal
quirk (a reference token never sees later ones) and its clean switch; the UNet install (decoupled cross-attention
equals its formula on a layer); official checkpoint layout ↔ ours round-trips and loads; bad inputs name the fix.
"""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

from visadapt.diffusion.easyref.encoder import INSTRUCTION, EasyRefEncoder, EasyRefInputError
from visadapt.diffusion.easyref.files import convert_official, easyref_state_dict, load_easyref_state, to_official
from visadapt.diffusion.easyref.tiny_mllm import tiny_qwen2vl
from visadapt.diffusion.easyref.unet import install_easyref, set_easyref_scale, unet_image_embeds
from visadapt.diffusion.tiny import tiny_pipeline

TOKENS = 8  # reference tokens in the tests (64 as released)
# The released EasyRef.generate() (ip_adapter/ip_adapter.py): num_inference_steps=30, and this negative prompt when
# negative_prompt is None.
RELEASED_STEPS = 30
RELEASED_NEGATIVE = "monochrome, lowres, bad anatomy, worst quality, low quality"
WIDTH = 64  # the tiny SDXL's cross-attention width


def refs(n: int, seed: int = 0) -> list[Image.Image]:
    gen = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(50 + 6 * i, 60, 3, generator=gen) * 255).byte().numpy()) for i in range(n)]


@pytest.fixture(scope="module")
def encoder():
    model, processor = tiny_qwen2vl(seed=0)
    return EasyRefEncoder(model, processor, cross_attention_dim=WIDTH, num_queries=TOKENS, image_size=56).eval()


def test_encoder_shapes_one_and_five_references(encoder):
    with torch.no_grad():
        one = encoder.encode([refs(1)], ["a cat"])
        five = encoder.encode([refs(5)], ["a cat"])
        batch = encoder.encode([refs(1), refs(5)], ["a cat", "a dog on the grass"])
    assert one.shape == five.shape == (1, TOKENS, WIDTH)
    assert batch.shape == (2, TOKENS, WIDTH)
    assert torch.isfinite(batch).all() and not torch.allclose(one, five)
    # encode runs prompts one at a time: a batch gives each prompt its own unpadded result
    torch.testing.assert_close(batch[0:1], one, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(batch[1:2], encoder.encode([refs(5)], ["a dog on the grass"]))


def test_prepare_feeds_references_then_instruction(encoder):
    inputs = encoder.prepare([refs(3)], ["a red car"])
    text = encoder.processor.tokenizer.decode(inputs["input_ids"][0])
    user = text.split("<|im_start|>user\n", 1)[1]
    assert user.startswith("<|vision_start|>") and user.count("<|vision_start|>") == 3
    assert user.endswith(INSTRUCTION + "a red car<|im_end|>\n<|im_start|>assistant\n")
    assert inputs["image_grid_thw"].shape == (3, 3)


def test_loaded_processor_gives_the_released_pil_pixels(tmp_path):
    """The released code's Qwen2-VL image processor was transformers 4.45's PIL one; transformers 5 loads a
    torchvision one by default, whose pixels differ. Both loaders (pipeline, training) give the PIL pixels, also
    through the encoder's 336 px sizing."""
    from transformers import AutoProcessor, Qwen2VLImageProcessorPil

    from visadapt.diffusion.easyref.encoder import _round_to_cells, reference_pixels
    from visadapt.diffusion.easyref.tiny_mllm import tiny_qwen2vl_processor
    from visadapt.diffusion.easyref.train import load_mllm
    from visadapt.pipelines.easyref import _load_mllm

    model, _ = tiny_qwen2vl()
    model.save_pretrained(tmp_path)
    tiny_qwen2vl_processor(336).save_pretrained(tmp_path)
    image = _round_to_cells(refs(1, seed=5)[0].resize((420, 300), Image.BICUBIC))
    min_pixels, max_pixels = reference_pixels(336)
    slow = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)(images=[image], return_tensors="pt")

    def pixels(processor) -> torch.Tensor:
        out = processor(text=["<|image_pad|>"], images=[image], return_tensors="pt")
        assert torch.equal(out["image_grid_thw"], slow["image_grid_thw"])
        return out["pixel_values"]

    default = pixels(AutoProcessor.from_pretrained(tmp_path))
    assert (default - slow["pixel_values"]).abs().max() > 0.01  # transformers 5's default is not the released one
    for _, processor in (_load_mllm(str(tmp_path), None), load_mllm(str(tmp_path))):
        assert torch.equal(pixels(processor), slow["pixel_values"])
    encoder = EasyRefEncoder(model, _load_mllm(str(tmp_path), None)[1], cross_attention_dim=WIDTH, image_size=336)
    assert torch.equal(encoder.prepare([[image]], ["a cat"])["pixel_values"], slow["pixel_values"])


def _official(encoder: EasyRefEncoder, inputs: dict) -> torch.Tensor:
    """The released computation, re-run through transformers' model forward (its own causal mask, no position ids
    → positions 0..L-1): truncated MLLM output after its norm, then a one-layer model on [H; R], last Q rows, MLP."""
    model = encoder.mllm.model
    language = model.language_model
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    embeds = language.embed_tokens(ids)
    feats = torch.cat(list(model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output))
    embeds = embeds.masked_scatter((ids == encoder.mllm.config.image_token_id)[..., None], feats)
    states = language(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    final = copy.deepcopy(language)
    final.layers = torch.nn.ModuleList([encoder.final_layer])
    final.norm = encoder.final_norm
    tokens = encoder.reference_tokens[None].expand(ids.shape[0], -1, -1)
    out = final(inputs_embeds=torch.cat([states, tokens], 1),
                attention_mask=torch.cat([mask, torch.ones_like(mask[:, :TOKENS])], 1)).last_hidden_state
    return encoder.proj(out[:, -TOKENS:])


def test_encoder_matches_the_official_computation(encoder):
    """Unpadded (inference) and a padded batch (training): transformers builds the same causal + padding mask."""
    for inputs in (encoder.prepare([refs(2)], ["two shapes"]),
                   encoder.prepare([refs(1), refs(3)], ["a", "three shapes on a table"])):
        with torch.no_grad():
            torch.testing.assert_close(encoder(**inputs), _official(encoder, inputs), atol=1e-5, rtol=1e-4)


def test_final_layer_is_causal_unless_clean(encoder):
    """Faithful: reference token 0 cannot see reference token Q-1; the clean variant attends both ways."""
    inputs = encoder.prepare([refs(1)], ["x"])
    clean = copy.copy(encoder)
    clean.faithful = False
    with torch.no_grad():
        before, before_clean = encoder(**inputs), clean(**inputs)
        saved = encoder.reference_tokens.data.clone()
        encoder.reference_tokens.data[-1] += 1.0
        try:
            after, after_clean = encoder(**inputs), clean(**inputs)
        finally:
            encoder.reference_tokens.data.copy_(saved)
    torch.testing.assert_close(after[:, :-1], before[:, :-1])
    assert not torch.allclose(after[:, -1], before[:, -1])
    assert not torch.allclose(after_clean[:, 0], before_clean[:, 0])
    assert not torch.allclose(before, before_clean)


def test_bad_references_name_the_fix(encoder, tmp_path):
    with pytest.raises(EasyRefInputError, match="reference_images="):
        encoder.prepare([], ["a cat"])
    with pytest.raises(EasyRefInputError, match="no reference images"):
        encoder.prepare([[], refs(1)], ["a", "b"])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(EasyRefInputError, match="broken.png.*not a readable image"):
        encoder.prepare([[broken]], ["a cat"])
    with pytest.raises(EasyRefInputError, match="no file at"):
        encoder.prepare([[tmp_path / "missing.jpg"]], ["a cat"])
    with pytest.raises(EasyRefInputError, match="2 reference lists for 1 prompts"):
        encoder.prepare([refs(1), refs(1)], ["a cat"])


@pytest.fixture(scope="module")
def installed():
    pipe = tiny_pipeline("sdxl")
    install_easyref(pipe.unet, num_tokens=TOKENS, r=4)
    return pipe.unet


def test_remove_easyref_restores_the_plain_unet():
    from visadapt.diffusion.easyref.unet import is_easyref_installed, remove_easyref

    unet = tiny_pipeline("sdxl").unet
    plain = dict(unet.state_dict())
    install_easyref(unet, num_tokens=TOKENS, r=4)
    with pytest.raises(ValueError, match="remove_easyref"):
        install_easyref(unet)
    remove_easyref(unet)
    assert not is_easyref_installed(unet) and unet.config.encoder_hid_dim_type is None
    after = unet.state_dict()
    assert after.keys() == plain.keys() and all(torch.equal(after[k], plain[k]) for k in plain)


def test_decoupled_cross_attention_formula(installed):
    """One cross-attention layer: softmax(QKᵀ)V on text + λ·softmax(Q K_ipᵀ)V_ip on the reference tokens."""
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    attn = installed.get_submodule(name)
    proc = installed.attn_processors[name + ".processor"]
    x, text, c = torch.randn(2, 16, attn.to_q.in_features), torch.randn(2, 77, WIDTH), torch.randn(2, TOKENS, WIDTH)

    def heads(t):
        return t.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

    def attend(q, k, v):
        return ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1) @ v

    q = heads(attn.to_q(x))
    base = attend(q, heads(attn.to_k(text)), heads(attn.to_v(text)))
    ref = attend(q, heads(proc.to_k_ip[0](c)), heads(proc.to_v_ip[0](c)))
    with torch.no_grad():
        for scale in (0.0, 0.7):
            set_easyref_scale(installed, scale)
            want = attn.to_out[0]((base + scale * ref).transpose(1, 2).flatten(2))
            got = attn(x, encoder_hidden_states=(text, [c[:, None]]))
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    set_easyref_scale(installed, 1.0)
    # initialised from the layer's own K/V, as the official training does
    torch.testing.assert_close(proc.to_k_ip[0].weight, attn.to_k.base_layer.weight)


def _official_state(unet, hidden: int = 32) -> dict[str, torch.Tensor]:
    """A synthetic checkpoint with the official names and shapes (processor LoRA down/up, to_k_ip without index,
    the one-layer MLLM copy, the MLP projector), plus the duplicates and frozen weights the training wrapper saves."""
    gen = torch.Generator().manual_seed(1)
    state: dict[str, torch.Tensor] = {}
    for name in unet.attn_processors:
        attn = unet.get_submodule(name.rsplit(".processor", 1)[0])
        to_q, to_k = getattr(attn.to_q, "base_layer", attn.to_q), getattr(attn.to_k, "base_layer", attn.to_k)
        inner, ctx = to_q.out_features, to_k.in_features
        for proj, d_in in (("q", inner), ("k", ctx), ("v", ctx), ("out", inner)):
            state[f"unet.{name}.to_{proj}_lora.down.weight"] = torch.randn(4, d_in, generator=gen)
            state[f"unet.{name}.to_{proj}_lora.up.weight"] = torch.randn(inner, 4, generator=gen)
        if attn.is_cross_attention:
            for kind in ("k", "v"):
                state[f"unet.{name}.to_{kind}_ip.weight"] = torch.randn(inner, ctx, generator=gen)
    state["unet.conv_in.weight"] = torch.randn(4, 4, generator=gen)  # frozen SDXL weight: skipped
    state["adapter_modules.0.to_k_ip.weight"] = torch.randn(2, 2, generator=gen)  # duplicate: skipped
    state["image_proj_model.proj.0.weight"] = torch.randn(hidden, hidden, generator=gen)
    state["image_proj_model.proj.0.bias"] = torch.randn(hidden, generator=gen)
    state["image_proj_model.proj.2.weight"] = torch.randn(WIDTH, hidden, generator=gen)
    state["image_proj_model.proj.2.bias"] = torch.randn(WIDTH, generator=gen)
    state["image_proj_model.proj.3.weight"] = torch.randn(WIDTH, generator=gen)
    state["image_proj_model.proj.3.bias"] = torch.randn(WIDTH, generator=gen)
    state["mllm_final_layer.reference_tokens"] = torch.randn(TOKENS, hidden, generator=gen)
    state["mllm_final_layer.norm.weight"] = torch.randn(hidden, generator=gen)
    for key, value in tiny_qwen2vl()[0].model.language_model.layers[-1].state_dict().items():
        state[f"mllm_final_layer.layers.0.{key}"] = torch.randn(value.shape, generator=gen)
    return state


def test_official_checkpoint_converts_loads_and_round_trips(installed, encoder):
    official = _official_state(installed)
    ours = convert_official(official)
    assert not any(k.startswith(("adapter_modules", "unet.conv_in")) for k in ours)
    assert to_official(ours) == {k: v for k, v in official.items()
                                 if not k.startswith(("adapter_modules", "unet.conv_in"))}
    load_easyref_state(installed, encoder, official)
    saved = easyref_state_dict(installed, encoder)
    assert set(saved) == set(ours)
    for key in ours:
        torch.testing.assert_close(saved[key], ours[key], msg=key)
    # the official processor LoRA (q + lora_scale·up(down(x))) equals the peft layer on the same input
    name = "mid_block.attentions.0.transformer_blocks.0.attn1"
    layer = installed.get_submodule(name + ".to_q")
    x = torch.randn(3, layer.in_features)
    want = layer.base_layer(x) + x @ official[f"unet.{name}.processor.to_q_lora.down.weight"].T @ \
        official[f"unet.{name}.processor.to_q_lora.up.weight"].T
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, atol=1e-4, rtol=1e-4)


def test_unet_takes_the_tokens_as_ip_adapter_embeds(installed):
    lat, text = torch.randn(1, 4, 16, 16), torch.randn(1, 77, WIDTH)
    added = {"text_embeds": torch.randn(1, 32), "time_ids": torch.zeros(1, 6)}
    with torch.no_grad():
        outs = [installed(lat, 10, text, added_cond_kwargs={**added, "image_embeds": unet_image_embeds(c)}).sample
                for c in (torch.randn(1, TOKENS, WIDTH), torch.randn(1, TOKENS, WIDTH))]
    assert not torch.allclose(*outs)


# -- pipelines -------------------------------------------------------------------------------------------------------

STEPS = dict(height=32, width=32, num_inference_steps=2, output_type="latent")


def run(pipe, prompt="a cat", **kwargs):
    return pipe(prompt, generator=torch.Generator().manual_seed(0), **STEPS, **kwargs).images


def fresh_encoder(seed: int = 0) -> EasyRefEncoder:
    model, processor = tiny_qwen2vl(seed=seed)
    return EasyRefEncoder(model, processor, cross_attention_dim=WIDTH, num_queries=TOKENS, image_size=56).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny SDXL folder, an official-layout EasyRef file with non-zero LoRA, a user LoRA, plain SDXL latents."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    from visadapt.diffusion.tiny import save_random_lora

    folder = tmp_path_factory.mktemp("easyref")
    plain = tiny_pipeline("sdxl")
    plain.save_pretrained(folder / "sdxl")
    official = _official_state(plain.unet)
    save_file(official, str(folder / "official.safetensors"))
    save_random_lora(plain, folder / "user.safetensors", seed=3)
    save_random_lora(plain, folder / "cat.safetensors", seed=4)
    loaded = StableDiffusionXLPipeline.from_pretrained(folder / "sdxl")  # reloading alone changes the last digits
    loaded.set_progress_bar_config(disable=True)
    return {"sdxl": folder / "sdxl", "official": folder / "official.safetensors", "state": official,
            "user": folder / "user.safetensors", "cat": folder / "cat.safetensors", "plain": run(loaded),
            "plain_released": run(loaded, negative_prompt=RELEASED_NEGATIVE), "plain_empty": run(loaded,
                                                                                                negative_prompt="")}


@pytest.fixture(scope="module")
def ref_pipe(files):
    from visadapt.pipelines import EasyRefPipeline

    pipe = EasyRefPipeline.from_pretrained(files["sdxl"], easyref=files["official"], encoder=fresh_encoder())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_loads_the_official_file(ref_pipe, files):
    attn = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    proc = ref_pipe.unet.attn_processors[attn + ".processor"]
    torch.testing.assert_close(proc.to_k_ip[0].weight, files["state"][f"unet.{attn}.processor.to_k_ip.weight"])
    lora_b = ref_pipe.unet.get_submodule(attn + ".to_out.0").lora_B["easyref"].weight
    torch.testing.assert_close(lora_b, files["state"][f"unet.{attn}.processor.to_out_lora.up.weight"])
    torch.testing.assert_close(ref_pipe.easyref_encoder.reference_tokens,
                               files["state"]["mllm_final_layer.reference_tokens"])


def test_scale_zero_is_plain_sdxl_and_references_change_the_image(ref_pipe, files):
    # λ=0 is the plain SDXL pipeline given the same steps and negative prompt (EasyRef's default one, or the user's)
    assert torch.equal(run(ref_pipe, scale=0), files["plain_released"])
    assert torch.equal(run(ref_pipe, scale=0, negative_prompt=""), files["plain_empty"])
    assert not torch.equal(files["plain_released"], files["plain"])
    with_refs = run(ref_pipe, reference_images=refs(2))
    assert torch.isfinite(with_refs).all() and not torch.allclose(with_refs, files["plain"])
    half = run(ref_pipe, reference_images=refs(2), scale=0.5)
    assert not torch.allclose(half, with_refs)
    assert ref_pipe.unet.active_adapters() == ["easyref"]  # the call restores the LoRA it switched off at λ=0


def test_mllm_runs_in_bf16_or_fp32_whatever_the_unet_dtype(files, monkeypatch):
    """The released code runs Qwen2-VL (and its final layer and projector) in bf16 beside an fp16 UNet, casting the
    tokens to fp16 for the UNet; Qwen2-VL gives garbage in fp16. So: bf16 where the device has it, fp32 elsewhere."""
    from visadapt.diffusion.easyref import encoder as easyref_encoder
    from visadapt.pipelines import EasyRefPipeline

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for native, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, n=native: n)
        assert easyref_encoder.mllm_dtype("cuda:0") == dtype
    assert easyref_encoder.mllm_dtype("cpu") == torch.float32
    monkeypatch.undo()

    pipe = EasyRefPipeline.from_pretrained(files["sdxl"], easyref=files["official"], mllm=tiny_qwen2vl(),
                                           dtype=torch.float16)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.dtype == torch.float16
    assert {p.dtype for p in pipe.easyref_encoder.parameters()} == {torch.float32}  # CPU: fp32, not the UNet's fp16
    monkeypatch.setattr(easyref_encoder, "mllm_dtype", lambda device: torch.bfloat16)  # as on a bf16 GPU
    pipe.to("cpu")
    assert {p.dtype for p in pipe.easyref_encoder.parameters()} == {torch.bfloat16}
    assert pipe.unet.dtype == torch.float16
    uncond, cond = pipe.encode_references(refs(2), ["a cat"])
    assert uncond.dtype == cond.dtype == torch.float16 and torch.isfinite(cond).all()
    assert torch.isfinite(run(pipe, reference_images=refs(2))).all()


class _Called(Exception):
    """Stops a spied call, carrying the keyword arguments it got."""


def _spy(monkeypatch, owner, name: str) -> None:
    import functools

    original = getattr(owner, name)

    @functools.wraps(original)  # keeps the signature, which the defaults read positional arguments by
    def spy(self, *args, **kwargs):
        raise _Called(kwargs)

    monkeypatch.setattr(owner, name, spy)


def _kwargs_reaching(pipe, *args, **kwargs) -> dict:
    with pytest.raises(_Called) as called:
        pipe(*args, **kwargs)
    return called.value.args[0]


def test_easyref_calls_take_the_released_sampling_defaults(ref_pipe, monkeypatch):
    """An EasyRef call unset → the released generate()'s 30 steps and negative prompt; anything given wins."""
    from diffusers import StableDiffusionXLPipeline

    _spy(monkeypatch, StableDiffusionXLPipeline, "__call__")
    for scale in (0, 1):
        got = _kwargs_reaching(ref_pipe, "a cat", scale=scale, reference_images=refs(1))
        assert got["num_inference_steps"] == RELEASED_STEPS and got["negative_prompt"] == RELEASED_NEGATIVE
    got = _kwargs_reaching(ref_pipe, "a cat", scale=0, num_inference_steps=4, negative_prompt="")
    assert got["num_inference_steps"] == 4 and got["negative_prompt"] == ""  # "" is a negative prompt, as released
    assert _kwargs_reaching(ref_pipe, "a cat", scale=0, negative_prompt=None)["negative_prompt"] == RELEASED_NEGATIVE
    zeros = torch.zeros(1, 77, WIDTH)
    got = _kwargs_reaching(ref_pipe, "a cat", scale=0, negative_prompt_embeds=zeros)
    assert "negative_prompt" not in got and got["negative_prompt_embeds"] is zeros
    got = _kwargs_reaching(ref_pipe, "a cat", None, 32, 32, 7, scale=0)  # steps given positionally
    assert "num_inference_steps" not in got


def test_composer_regions_read_the_easyref_negative_prompt(ref_pipe, files, monkeypatch):
    """Composed calls fill EasyRef's defaults in before the concepts' regional negatives are encoded."""
    from visadapt.diffusion import Concept
    from visadapt.pipelines import LoRAComposerXLPipeline
    from visadapt.pipelines.lora_composer import LoRAComposerMixin

    pipe = LoRAComposerXLPipeline.from_pipe(ref_pipe)
    def stop(self, args, kwargs):
        raise _Called(kwargs)

    monkeypatch.setattr(LoRAComposerMixin, "_call_arguments", stop)
    concepts = [Concept(lora=files["cat"], prompt="a cat", box=[0, 0, 0.5, 1])]
    got = _kwargs_reaching(pipe, "a cat in a park", concepts=concepts, scale=0)
    assert got["negative_prompt"] == RELEASED_NEGATIVE and got["num_inference_steps"] == RELEASED_STEPS


def test_reference_tokens_line_up_with_prompt_embeddings(ref_pipe):
    """Prompt-major order (p0, p0, p1, p1 for 2 images per prompt), negatives first, as diffusers orders prompts."""
    uncond = torch.arange(2.0)[:, None, None].expand(2, 3, 4)
    cond = 10 + uncond
    ref_pipe._easyref_tokens = (uncond, cond)
    try:
        (embeds,) = ref_pipe.prepare_ip_adapter_image_embeds(None, None, "cpu", 2, True)
    finally:
        ref_pipe._easyref_tokens = None
    assert embeds.shape == (8, 1, 3, 4)
    assert embeds[:, 0, 0, 0].tolist() == [0, 0, 1, 1, 10, 10, 11, 11]
    out = run(ref_pipe, ["a cat", "a dog"], reference_images=[refs(1), refs(2)], num_images_per_prompt=2)
    assert out.shape == (4, 4, 16, 16)


def test_user_lora_coexists_with_the_easyref_lora(ref_pipe, files):
    ref_pipe.load_lora_weights(str(files["user"]), adapter_name="user")
    try:
        ref_pipe.set_adapters(["easyref", "user"], [1.0, 0.5])
        assert sorted(ref_pipe.unet.active_adapters()) == ["easyref", "user"]
        layer = ref_pipe.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn2.to_q")
        assert layer.scaling["user"] == pytest.approx(0.5) and layer.scaling["easyref"] == pytest.approx(1.0)
        both = run(ref_pipe, reference_images=refs(1))
        ref_pipe.set_adapters(["easyref", "user"], [1.0, 0.0])
        user_off = run(ref_pipe, reference_images=refs(1))
        ref_pipe.set_adapters(["easyref"], [1.0])
        only = run(ref_pipe, reference_images=refs(1))
    finally:
        ref_pipe.delete_adapters("user")
        ref_pipe.set_adapters(["easyref"], [1.0])
    torch.testing.assert_close(user_off, only)
    assert not torch.allclose(both, only)


def test_pipeline_bad_inputs_name_the_fix(ref_pipe, files, tmp_path):
    with pytest.raises(EasyRefInputError, match="reference_images=.*scale=0"):
        run(ref_pipe)
    broken = tmp_path / "ref.jpg"
    broken.write_text("text")
    with pytest.raises(EasyRefInputError, match="ref.jpg.*not a readable image"):
        run(ref_pipe, reference_images=[broken])
    with pytest.raises(EasyRefInputError, match="load_easyref"):
        run(_composer(), reference_images=refs(1))
    with pytest.raises(ValueError, match="Not an EasyRef checkpoint.*not a LoRA"):
        _composer().load_easyref(files["user"], encoder=ref_pipe.easyref_encoder)
    with pytest.raises(ValueError, match="save_easyref"):
        ref_pipe.save_pretrained(tmp_path / "folder")
    with pytest.raises(ValueError, match="already lost its last layer"):
        EasyRefEncoder(ref_pipe.easyref_encoder.mllm, ref_pipe.easyref_encoder.processor, WIDTH)


def _composer():
    from visadapt.pipelines import LoRAComposerXLPipeline

    pipe = LoRAComposerXLPipeline.from_pipe(tiny_pipeline("sdxl"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- composition -----------------------------------------------------------------------------------------------------

def test_composer_processor_sends_image_tokens_through_the_global_path_only(installed):
    """Outside the concept's box the composed layer is the IP-Adapter layer (text + λ·image branch); inside the box
    it is the concept's regional text, whatever λ is."""
    from visadapt.diffusion.composer.attention import ComposerAttnProcessor, Composition

    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"
    attn, ip = installed.get_submodule(name.rsplit(".processor", 1)[0]), installed.attn_processors[name]
    composer = ComposerAttnProcessor(name, ip)
    box = [0.0, 0.0, 0.5, 1.0]
    x, text, c = torch.randn(1, 64, attn.to_q.in_features), torch.randn(1, 77, WIDTH), torch.randn(1, TOKENS, WIDTH)
    outs = {}
    with torch.no_grad():
        for scale in (0.0, 1.0):
            set_easyref_scale(installed, scale)
            composition = Composition(adapter_names=["nobody"], weights=[1.0], boxes=[box],
                                      text_cond=torch.randn(1, 77, WIDTH, generator=torch.Generator().manual_seed(2)),
                                      isolate=False, latent_size=(16, 16))
            outs[scale] = (composer(attn, x, (text, [c[:, None]]), composition=composition),
                           ip(attn, x, (text, [c[:, None]])))
    set_easyref_scale(installed, 1.0)
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[:, :4] = True  # the 8x8 grid of this layer; the box is the left half
    inside = inside.flatten()
    composed, plain = outs[1.0]
    torch.testing.assert_close(composed[:, ~inside], plain[:, ~inside], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(composed[:, inside], outs[0.0][0][:, inside], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(plain, outs[0.0][1])  # λ does act on this layer


def test_composer_pipeline_takes_reference_images(ref_pipe, files):
    from visadapt.diffusion import ComposerConfig, Concept
    from visadapt.pipelines import LoRAComposerXLPipeline

    pipe = LoRAComposerXLPipeline.from_pipe(ref_pipe)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.easyref_encoder is ref_pipe.easyref_encoder
    concepts = [Concept(lora=files["cat"], prompt="a cat", box=[0, 0, 0.5, 1])]
    try:
        with_refs = run(pipe, "a cat in a park", concepts=concepts, reference_images=refs(2),
                        composer=ComposerConfig(max_refine_step=1))
        assert all(g > 0 for g in pipe.composition_log["grad_norms"])
        without = run(pipe, "a cat in a park", concepts=concepts, scale=0,
                      composer=ComposerConfig(max_refine_step=1))
    finally:
        pipe.delete_adapters("cat")
    assert torch.isfinite(with_refs).all() and not torch.allclose(with_refs, without)
    assert ref_pipe.unet.active_adapters() == ["easyref"]


def test_controlnet_sees_text_tokens_only(files):
    from diffusers import ControlNetModel

    from visadapt.pipelines import EasyRefControlNetPipeline

    base = tiny_pipeline("sdxl")
    controlnet = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(16, 32))  # 2x, as the VAE
    pipe = EasyRefControlNetPipeline(**base.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_easyref(files["official"], encoder=fresh_encoder())
    seen = []
    hook = controlnet.register_forward_pre_hook(lambda m, a, k: seen.append(k["encoder_hidden_states"]),
                                                with_kwargs=True)
    try:
        run(pipe, reference_images=refs(1), image=Image.new("RGB", (32, 32)))
    finally:
        hook.remove()
    assert seen and all(isinstance(e, torch.Tensor) and e.shape == (2, 77, WIDTH) for e in seen)
    assert not any(hasattr(p, "to_k_ip") for p in controlnet.attn_processors.values())


def test_saved_official_file_loads_the_way_the_released_code_loads_it(ref_pipe, files, tmp_path):
    """save_easyref(official=True) gives back the official file it was loaded from (names and shapes), and a fresh
    interpreter without visadapt loads it the released way: prefixes split, the projector and the one-layer MLLM
    copy strictly, the UNet part by processor names."""
    from conftest import run_python
    from safetensors.torch import load_file

    path = ref_pipe.save_easyref(tmp_path / "easyref.safetensors", official=True)
    saved = load_file(str(path))
    expected = {k: v for k, v in files["state"].items() if not k.startswith(("adapter_modules", "unet.conv_in"))}
    assert set(saved) == set(expected) and all(torch.equal(saved[k], expected[k]) for k in saved)
    ours = ref_pipe.save_easyref(tmp_path / "ours.safetensors")
    assert convert_official(saved).keys() == load_file(str(ours)).keys()
    run_python(f"""
import re

import torch
from safetensors import safe_open
from transformers import Qwen2VLTextConfig, Qwen2VLTextModel

parts = {{"image_proj_model": {{}}, "mllm_final_layer": {{}}, "unet": {{}}, "multimodal_llm": {{}}}}
with safe_open({str(path)!r}, framework="pt", device="cpu") as f:
    for key in f.keys():
        prefix, rest = key.split(".", 1)
        parts[prefix][rest] = f.get_tensor(key)
proj = torch.nn.Module()
proj.proj = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, {WIDTH}),
                                torch.nn.LayerNorm({WIDTH}))
proj.load_state_dict(parts["image_proj_model"], strict=True)
config = Qwen2VLTextConfig(vocab_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1)
final = Qwen2VLTextModel(config)
final.embed_tokens = torch.nn.Identity()
final.reference_tokens = torch.nn.Parameter(torch.zeros({TOKENS}, 32))
final.load_state_dict(parts["mllm_final_layer"], strict=True)
pattern = re.compile(r"[a-z_.0-9]+attn[12]\\.processor\\.(to_[kv]_ip|to_(q|k|v|out)_lora\\.(down|up))\\.weight")
assert all(pattern.fullmatch(key) for key in parts["unet"]), sorted(parts["unet"])[:3]
assert parts["unet"] and not parts["multimodal_llm"]
""", tmp_path)


# -- the app ---------------------------------------------------------------------------------------------------------

def _labels(app) -> set:
    return {c.get("props", {}).get("label") for c in app.config["components"]}


def test_app_shows_reference_images_for_sdxl_and_generates_with_them(ref_pipe, tmp_path):
    from visadapt.apps import composer
    from visadapt.pipelines import LoRAComposerXLPipeline

    pipe = LoRAComposerXLPipeline.from_pipe(ref_pipe)
    pipe.set_progress_bar_config(disable=True)
    assert "Reference images" in _labels(composer.build_app(pipe, output_dir=tmp_path))
    assert "Reference images" not in _labels(composer.build_app(tiny_pipeline("sd", pipeline_class=composer_sd()),
                                                                output_dir=tmp_path))
    paths = []
    for i, image in enumerate(refs(2)):
        paths.append(tmp_path / f"ref{i}.png")
        image.save(paths[-1])
    fast = dict(prompt="a cat", steps=2, width=32, height=32, latent_optimization=False, latent_reinit=False)
    image, settings = composer.generate(pipe, reference_images=[str(p) for p in paths], reference_scale=0.8, **fast)
    assert settings["references"] == {"images": ["ref0.png", "ref1.png"], "scale": 0.8}
    assert settings["negative_prompt"] == RELEASED_NEGATIVE  # the app's empty field: EasyRef's default, recorded
    plain, _ = composer.generate(pipe, **fast)
    assert image.tobytes() != plain.tobytes()
    with pytest.raises(ValueError, match="--easyref"):
        composer.generate(LoRAComposerXLPipeline.from_pipe(tiny_pipeline("sdxl")), reference_images=[str(paths[0])],
                          **fast)


def composer_sd():
    from visadapt.pipelines import LoRAComposerPipeline

    return LoRAComposerPipeline


def test_easyref_file_writes_tied_weights_as_copies(tmp_path):
    """Qwen2-VL-2B ties lm_head to the embedding: the one writer of EasyRef files must still write both names."""
    from safetensors.torch import load_file

    from visadapt.diffusion.easyref.files import save_easyref_file

    shared = torch.randn(4, 3)
    state = {"encoder.mllm.lm_head.weight": shared, "encoder.mllm.model.embed_tokens.weight": shared,
             "encoder.reference_tokens": torch.randn(2, 3)}
    path = save_easyref_file(state, tmp_path / "e.safetensors")
    loaded = load_file(str(path))
    assert set(loaded) == set(state)
    assert torch.equal(loaded["encoder.mllm.lm_head.weight"], shared)
