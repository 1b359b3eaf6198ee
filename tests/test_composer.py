"""LoRA-Composer and DECOR on tiny random SD and SDXL pipelines, with LoRA files the tests write.

The port checks of the spec (diffusion.md §1.8c): no concepts is the base pipeline; one full-canvas concept without
optimisation equals that LoRA's cross-attention K/V/O (+ text encoder) applied the plain way; isolation blocks
attention between boxes; refinement gives finite, non-zero latent gradients; DECOR α=1 removes the undesired
directions and α=0 changes nothing; kohya and peft files load alike; every bad input raises its error.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from visadapt.diffusion import ComposerConfig, Concept, Decor, LoraFileError
from visadapt.diffusion.composer.attention import ComposerAttnProcessor, Composition
from visadapt.diffusion.composer.decor import DecorProjector, undesired_rows
from visadapt.diffusion.tiny import save_random_lora, tiny_pipeline
from visadapt.pipelines import DecorPipeline, LoRAComposerPipeline, LoRAComposerXLPipeline

PLAIN = ComposerConfig(latent_optimization=False, latent_reinit=False)
SIZE = dict(height=32, width=64)


def generate(pipe, steps=3, **kwargs):
    kwargs = {**SIZE, **kwargs}
    if "prompt_embeds" not in kwargs:
        kwargs.setdefault("prompt", "a cat and a dog in a park")
    return pipe(num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(0),
                **kwargs).images


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    sd, sdxl = tiny_pipeline("sd"), tiny_pipeline("sdxl")
    return {
        "a": save_random_lora(sd, folder / "a.safetensors", seed=1),
        "b": save_random_lora(sd, folder / "b.safetensors", seed=2),
        "a_kohya": save_random_lora(sd, folder / "a_kohya.safetensors", seed=1, kohya=True),
        "xl_a": save_random_lora(sdxl, folder / "xl_a.safetensors", seed=3),
        "xl_b": save_random_lora(sdxl, folder / "xl_b.safetensors", seed=4, kohya=True),
        "folder": folder,
    }


@pytest.fixture()
def pipe():
    return tiny_pipeline("sd", pipeline_class=LoRAComposerPipeline)


def two_concepts(loras, **kw):
    return [Concept(lora=loras["a"], prompt="a photo of a cat", box=[0, 0, 0.5, 1], tokens=["cat"], **kw),
            Concept(lora=loras["b"], prompt="a photo of a dog", box=[0.5, 0, 1, 1], tokens=["dog"], **kw)]


# -- port checks -------------------------------------------------------------------------------------------------

def test_no_concepts_is_the_base_pipeline_and_composing_leaves_it_so(pipe, loras):
    base = tiny_pipeline("sd")
    expected = generate(base)
    assert torch.equal(generate(pipe), expected)
    composed = generate(pipe, concepts=two_concepts(loras), composer=PLAIN)
    assert (composed - expected).abs().max() > 1e-3  # the concepts did act
    assert torch.equal(generate(pipe), expected)  # processors and adapter states are restored
    assert torch.equal(generate(pipe, concepts=[]), expected)


def _attn2_kv_o_and_text_encoder(src, dst):
    keep = re.compile(r"^(unet\..*attn2\.(to_k|to_v|to_out\.0)\.|text_encoder(_2)?\.)")
    save_file({k: v for k, v in load_file(str(src)).items() if keep.match(k)}, str(dst))
    return dst


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_full_canvas_concept_equals_its_lora_applied_the_plain_way(kind, loras, tmp_path):
    cls = LoRAComposerPipeline if kind == "sd" else LoRAComposerXLPipeline
    lora = loras["a" if kind == "sd" else "xl_a"]
    prompt = "a photo of a cat"
    composer = tiny_pipeline(kind, pipeline_class=cls)
    # SDXL's pooled embedding comes from the global prompt, so the global prompt is the regional one here.
    composed = generate(composer, prompt=prompt, concepts=[Concept(lora=lora, prompt=prompt, box=[0, 0, 1, 1])],
                        composer=PLAIN)

    plain = tiny_pipeline(kind)
    plain.load_lora_weights(str(_attn2_kv_o_and_text_encoder(lora, tmp_path / "kvo.safetensors")),
                            adapter_name="kvo")
    inputs = {"prompt": prompt}
    if kind == "sdxl":  # the global prompt (LoRA off) gives SDXL's pooled embedding, the LoRA gives the sequence
        embeds, negative, _, _ = plain.encode_prompt(prompt, device="cpu")
        plain.disable_lora()
        _, _, pooled, negative_pooled = plain.encode_prompt(prompt, device="cpu")
        plain.enable_lora()
        inputs = dict(prompt_embeds=embeds, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
                      negative_pooled_prompt_embeds=negative_pooled)
    expected = generate(plain, **inputs)
    plain.disable_lora()
    without = generate(plain, prompt=prompt)
    assert (expected - without).abs().max() > 1e-3
    torch.testing.assert_close(composed, expected, atol=2e-5, rtol=1e-4)


def test_isolation_blocks_attention_between_boxes(pipe):
    name = next(n for n in pipe.unet.attn_processors if n.endswith("attn1.processor"))
    attn = pipe.unet.get_submodule(name.removesuffix(".processor"))
    hidden = torch.randn(1, 16 * 16, attn.to_q.in_features)
    boxes = [[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]]
    mass = {}
    for isolate in (True, False):
        composition = Composition(adapter_names=["x", "y"], weights=[1, 1], boxes=boxes,
                                  text_cond=torch.zeros(2, 77, 32), isolate=isolate, latent_size=(16, 16),
                                  loss_downsample=1, capture=True)
        ComposerAttnProcessor(name)(attn, hidden, composition=composition)
        probs = composition.self_maps[name][0]  # (N, N), rows sum to 1
        in_a, in_b = (composition.masks(256, probs.device)[i] for i in (0, 1))
        mass[isolate] = probs[in_a][:, in_b].sum(1).max()
        assert torch.allclose(probs.sum(1), torch.ones(256))
    assert mass[True] < 1e-6
    assert mass[False] > 0.05


def test_refinement_gives_finite_nonzero_latent_gradients(pipe, loras):
    refined = generate(pipe, concepts=two_concepts(loras), composer=ComposerConfig(latent_reinit=False))
    log = pipe.composition_log
    assert len(log["grad_norms"]) == 3  # one refinement per step while within the window
    assert all(0 < g < float("inf") for g in log["grad_norms"])
    assert all(0 < loss < float("inf") for loss in log["losses"])
    plain = generate(pipe, concepts=two_concepts(loras), composer=PLAIN)
    assert pipe.composition_log["grad_norms"] == []
    assert torch.isfinite(refined).all() and (refined - plain).abs().max() > 1e-4


def test_latent_reinit_moves_patches_and_keeps_statistics(pipe, loras):
    reinit = generate(pipe, steps=1, concepts=two_concepts(loras),
                      composer=ComposerConfig(latent_optimization=False))
    plain = generate(pipe, steps=1, concepts=two_concepts(loras), composer=PLAIN)
    assert torch.isfinite(reinit).all() and (reinit - plain).abs().max() > 1e-4


def test_kohya_and_peft_files_give_the_same_image(pipe, loras):
    box = [0.25, 0, 1, 1]
    peft = generate(pipe, concepts=[Concept(lora=loras["a"], prompt="a cat", box=box)], composer=PLAIN)
    kohya = generate(pipe, concepts=[Concept(lora=loras["a_kohya"], prompt="a cat", box=box)], composer=PLAIN)
    torch.testing.assert_close(kohya, peft, atol=1e-5, rtol=1e-4)


def test_sdxl_composes_two_files_with_every_part_on(loras):
    pipe = tiny_pipeline("sdxl", pipeline_class=LoRAComposerXLPipeline)
    concepts = [Concept(lora=loras["xl_a"], prompt="a cat", box=[0, 0, 0.5, 1]),
                Concept(lora=loras["xl_b"], prompt="a dog", box=[0.5, 0, 1, 1], weight=0.7)]
    out = generate(pipe, steps=2, concepts=concepts, decor=Decor(["grass"], strength=(1.0, 0.5)))
    assert torch.isfinite(out).all()
    assert all(g > 0 for g in pipe.composition_log["grad_norms"])


def test_user_adapters_stay_active_around_a_composition(pipe, loras):
    pipe.load_lora_weights(str(loras["b"]), adapter_name="style")
    pipe.set_adapters("style", 0.5)
    styled = generate(pipe)
    generate(pipe, concepts=[Concept(lora=loras["a"], prompt="a cat", box=[0, 0, 0.5, 1])], composer=PLAIN)
    assert torch.equal(generate(pipe), styled)
    assert pipe.unet.active_adapters() == ["style"]


def test_from_pipe_shares_modules_and_runs_an_already_loaded_adapter(loras):
    base = tiny_pipeline("sd")
    base.load_lora_weights(str(loras["a"]), adapter_name="cat")
    pipe = LoRAComposerPipeline.from_pipe(base)
    assert pipe.unet is base.unet
    out = generate(pipe, concepts=[Concept(lora="cat", prompt="a cat", box=[0, 0, 0.5, 1])], composer=PLAIN)
    assert torch.isfinite(out).all()


# -- DECOR -------------------------------------------------------------------------------------------------------

def test_decor_full_strength_removes_the_undesired_directions(pipe):
    decor = Decor(["dog", "grass"], strength=1.0)
    embeds = pipe.encode_prompt("a dog on the grass", "cpu", 1, False)[0]
    projector = pipe.fit_decor(decor, embeds.shape[-1])
    basis = projector.bases[0]
    assert basis.shape[1] >= 2
    torch.testing.assert_close(basis.T @ basis, torch.eye(basis.shape[1]), atol=1e-5, rtol=0)
    projected = projector.apply(embeds, [1.0])
    assert (embeds @ basis).abs().max() > 1e-2
    assert (projected @ basis).abs().max() < 1e-5
    assert torch.equal(projector.apply(embeds, [0.0]), embeds)


def test_decor_zero_strength_changes_nothing_and_one_changes_the_image():
    pipe = tiny_pipeline("sd", pipeline_class=DecorPipeline)
    base = generate(pipe)
    assert torch.equal(generate(pipe, decor=Decor(["park"], strength=0.0)), base)
    assert (generate(pipe, decor=Decor(["park"], strength=1.0)) - base).abs().max() > 1e-4


def test_decor_sdxl_projects_each_text_encoder_block_separately():
    pipe = tiny_pipeline("sdxl", pipeline_class=LoRAComposerXLPipeline)
    embeds = pipe.encode_prompt("a dog", device="cpu", do_classifier_free_guidance=False)[0]
    decor = Decor(["dog"], strength=(1.0, 0.0))
    projected = pipe.apply_decor(embeds, decor)
    first = pipe.text_encoder.config.hidden_size
    assert torch.equal(projected[..., first:], embeds[..., first:])
    rows = undesired_rows(lambda t: pipe.encode_prompt(t, device="cpu", do_classifier_free_guidance=False)[0],
                          pipe.tokenizer, decor)
    basis = DecorProjector.fit(rows, [first, embeds.shape[-1] - first]).bases[0]
    assert (projected[..., :first] @ basis).abs().max() < 1e-5


# -- bad input ---------------------------------------------------------------------------------------------------

def test_unreadable_non_lora_and_pickled_files_are_refused(pipe, loras, tmp_path):
    garbage = tmp_path / "broken.safetensors"
    garbage.write_bytes(b"\x00\x01 not a safetensors file")
    not_lora = tmp_path / "weights.safetensors"
    save_file({"conv.weight": torch.zeros(2, 2)}, str(not_lora))
    pickled = tmp_path / "lora.ckpt"
    pickled.write_bytes(b"x")
    cases = [(garbage, "not a readable safetensors"), (not_lora, "holds no LoRA weights"),
             (pickled, "only .safetensors"), (tmp_path / "missing.safetensors", "not found")]
    for path, message in cases:
        with pytest.raises(LoraFileError, match=message):
            pipe(prompt="x", concepts=[Concept(lora=path, prompt="a cat", box=[0, 0, 1, 1])], **SIZE)


def test_lora_for_another_base_model_names_the_layers_that_differ(pipe, loras):
    with pytest.raises(LoraFileError, match=r"does not fit this base model.*\n.*(no such layer|size)"):
        pipe(prompt="x", concepts=[Concept(lora=loras["xl_a"], prompt="a cat", box=[0, 0, 1, 1])], **SIZE)


@pytest.mark.parametrize("box, message", [([0, 0, 1.2, 1], "outside the canvas"), ([-0.1, 0, 0.5, 1], "outside"),
                                          ([0.5, 0, 0.5, 1], "empty"), ([0, 0, 1], "four")])
def test_bad_boxes(box, message, loras):
    with pytest.raises(ValueError, match=message):
        Concept(lora=loras["a"], prompt="a cat", box=box)


def test_long_regional_prompt_duplicate_names_and_unknown_adapter(pipe, loras):
    long = Concept(lora=loras["a"], prompt="a cat " * 60, box=[0, 0, 1, 1])
    with pytest.raises(ValueError, match="at most 77"):
        pipe(prompt="x", concepts=[long], **SIZE)
    twice = [Concept(lora=loras["a"], prompt="a cat", box=[0, 0, 0.5, 1]),
             Concept(lora=loras["b"], prompt="a dog", box=[0.5, 0, 1, 1], name="a")]
    with pytest.raises(ValueError, match="share the name 'a'"):
        pipe(prompt="x", concepts=twice, **SIZE)
    with pytest.raises(ValueError, match="neither a LoRA file nor an adapter"):
        pipe(prompt="x", concepts=[Concept(lora="nobody", prompt="a cat", box=[0, 0, 1, 1])], **SIZE)
    with pytest.raises(ValueError, match="not in the regional prompt"):
        pipe(prompt="x", concepts=[Concept(lora=loras["a"], prompt="a cat", box=[0, 0, 1, 1], tokens=["dog"])],
             **SIZE)


# -- faithfulness to the official code (issue 14) --------------------------------------------------------------

def _official_gaussian_smoothing_kernel(size: int, sigma: float) -> torch.Tensor:
    """The official ``GaussianSmoothing`` kernel (region_lora/utils/gaussian_smoothing.py), written from its formula:
    product over axes of 1/(σ√(2π))·exp(−((x−μ)/(2σ))²), normalised to sum 1."""
    import math

    grids = torch.meshgrid([torch.arange(size, dtype=torch.float32)] * 2, indexing="ij")
    kernel = torch.ones(size, size)
    for grid in grids:
        mean = (size - 1) / 2
        kernel = kernel * 1 / (sigma * math.sqrt(2 * math.pi)) * torch.exp(-((grid - mean) / (2 * sigma)) ** 2)
    return kernel / kernel.sum()


def _loss_composition(seed=0):
    gen = torch.Generator().manual_seed(seed)
    composition = Composition(adapter_names=["x", "y"], weights=[1, 1], boxes=[[0, 0, 0.5, 1], [0.5, 0, 1, 1]],
                              text_cond=torch.zeros(2, 77, 32), latent_size=(16, 32), loss_downsample=4)
    composition.cross_maps["l"] = torch.randn(1, 2, 32, 77, generator=gen).mul(3).softmax(-1)
    composition.self_maps["l"] = torch.randn(1, 32, 32, generator=gen).softmax(-1)
    return composition


def test_attention_blur_is_the_official_kernel():
    from torchvision.transforms.v2.functional import gaussian_blur

    from visadapt.diffusion.composer.refinement import composer_loss, smooth, smoothing_kernel

    kernel = smoothing_kernel(3, 0.5)
    torch.testing.assert_close(kernel, _official_gaussian_smoothing_kernel(3, 0.5))
    assert abs(float(kernel[1, 1]) - 0.332) < 1e-3
    maps = torch.rand(2, 4, 8)
    official = F.conv2d(F.pad(maps[:, None], (1, 1, 1, 1), mode="reflect"), _official_gaussian_smoothing_kernel(3, 0.5)
                        [None, None])[:, 0]
    torch.testing.assert_close(smooth(maps, kernel), official)
    # "gaussian" is torchvision's kernel; the official one is that kernel with σ·√2.
    torch.testing.assert_close(smooth(maps, smoothing_kernel(3, 0.5, "gaussian")),
                               gaussian_blur(maps[:, None], [3, 3], [0.5, 0.5])[:, 0])
    torch.testing.assert_close(smoothing_kernel(3, 0.5), smoothing_kernel(3, 0.5 * 2 ** 0.5, "gaussian"))

    composition, positions = _loss_composition(), [[3, 4], [5]]
    default = composer_loss(composition, positions, ComposerConfig())
    wider = ComposerConfig(smooth_sigma=0.5 * 2 ** 0.5, smooth_form="gaussian")
    official = composer_loss(composition, positions, wider)
    sharper = composer_loss(composition, positions, ComposerConfig(smooth_form="gaussian"))
    torch.testing.assert_close(default, official)
    assert abs(float(default - sharper)) > 1e-4


def _official_isolation_bias(masks: torch.Tensor) -> torch.Tensor:
    """The official self-attention mask (multi_lora_sample.py): for each box k, every query in it gets −1e6 on the
    keys of each other box, summed."""
    n_tokens = masks.shape[1]
    bias = torch.zeros(n_tokens, n_tokens, dtype=torch.float64)
    for k, mask in enumerate(masks):
        for j, other in enumerate(masks):
            if j != k:
                bias[mask != 0, :] += other.to(torch.float64) * -1e6
    return bias


def test_isolation_keeps_overlap_queries_isolated_when_boxes_cover_the_canvas(pipe):
    name = next(n for n in pipe.unet.attn_processors if n.endswith("attn1.processor"))
    attn = pipe.unet.get_submodule(name.removesuffix(".processor"))
    hidden = torch.randn(1, 16 * 16, attn.to_q.in_features, generator=torch.Generator().manual_seed(0))
    boxes = [[0, 0, 0.625, 1], [0.375, 0, 1, 1]]  # overlap in the middle, no background
    composition = Composition(adapter_names=["x", "y"], weights=[1, 1], boxes=boxes,
                              text_cond=torch.zeros(2, 77, 32), latent_size=(16, 16), loss_downsample=1, capture=True)
    ComposerAttnProcessor(name)(attn, hidden, composition=composition)
    probs = composition.self_maps[name][0].double()
    masks = composition.masks(256, torch.device("cpu"))
    overlap = masks[0] & masks[1]
    assert overlap.any() and masks.any(0).all()
    # Queries in the overlap see keys of either box alone, never the overlap (blocked twice), as in the official code.
    assert probs[overlap][:, overlap].sum(1).max() < 1e-6
    with torch.no_grad():
        q, k = (attn.to_q(hidden).double(), attn.to_k(hidden).double())
        q, k = (x.unflatten(-1, (attn.heads, -1)).transpose(1, 2) for x in (q, k))
        reference = (q @ k.transpose(-1, -2) * attn.scale + _official_isolation_bias(masks)).softmax(-1).mean(1)[0]
    torch.testing.assert_close(probs, reference, atol=1e-5, rtol=1e-4)
    bias = composition.isolation_mask(256, torch.float16, torch.device("cpu"))
    assert torch.isfinite(bias).all() and bool((bias == 0).any(1).all())


def _official_box_masks(boxes, height: int, width: int) -> torch.Tensor:
    """The official box → cells rule (multi_lora_sample.py): rows ceil(ymin·h) to floor(ymax·h), half-open, columns
    likewise, with no snapping and no fallback for thin boxes; (n, height·width) bool."""
    import math

    masks = torch.zeros(len(boxes), height, width, dtype=torch.bool)
    for mask, (xmin, ymin, xmax, ymax) in zip(masks, boxes):
        mask[math.ceil(ymin * height):math.floor(ymax * height), math.ceil(xmin * width):math.floor(xmax * width)] = 1
    return masks.flatten(1)


def _official_self_attention(attn, hidden: torch.Tensor, masks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The official concept-isolated self-attention in ``dtype``: softmax(Q Kᵀ·scale + the summed −1e6 bias) V, then
    to_out. hidden (B, N, C), masks (n, N) → (B, N, C) float64."""
    def linear(layer, x):
        return F.linear(x, layer.weight.to(dtype), None if layer.bias is None else layer.bias.to(dtype))

    x = hidden.to(dtype)
    q, k, v = (linear(p, x).unflatten(-1, (attn.heads, -1)).transpose(1, 2) for p in (attn.to_q, attn.to_k, attn.to_v))
    probs = (_official_isolation_bias(masks).to(dtype) + q @ k.transpose(-1, -2) * attn.scale).softmax(-1)
    return linear(attn.to_out[0], (probs @ v).transpose(1, 2).flatten(2)).double()


@pytest.mark.parametrize("capture", [False, True])  # fused SDPA, and the explicit softmax of the refinement steps
def test_isolation_output_is_the_official_with_three_overlapping_boxes_covering_the_canvas(pipe, capture):
    name = next(n for n in pipe.unet.attn_processors if n.endswith("attn1.processor"))
    attn = pipe.unet.get_submodule(name.removesuffix(".processor"))
    hidden = torch.randn(2, 16 * 16, attn.to_q.in_features, generator=torch.Generator().manual_seed(0))
    boxes = [[0, 0, 0.625, 0.625], [0.375, 0, 1, 0.625], [0, 0.375, 1, 1]]  # each overlaps both others, no background
    masks = _official_box_masks(boxes, 16, 16)
    composition = Composition(adapter_names=["x", "y", "z"], weights=[1, 1, 1], boxes=boxes, capture=capture,
                              text_cond=torch.zeros(3, 77, 32), latent_size=(16, 16), loss_downsample=1)
    with torch.no_grad():
        ours = ComposerAttnProcessor(name)(attn, hidden, composition=composition).double()
        exact = _official_self_attention(attn, hidden, masks, torch.float64)
        official = _official_self_attention(attn, hidden, masks, torch.float32)
    assert masks.any(0).all() and (masks.sum(0) == 3).any()
    open_rows = (_official_isolation_bias(masks) == 0).any(1)  # queries with at least one unblocked key
    assert open_rows.any() and not open_rows.all()
    torch.testing.assert_close(ours, exact, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours[:, open_rows], official[:, open_rows], atol=1e-6, rtol=1e-5)
    # Rows with every key blocked: the official fp32 scores carry −1e6 per blocking box, so they are rounded to
    # 1/16 (1/8 past 2e6) before the softmax; ours subtracts the row's smallest count first (README, LoRA-Composer).
    gap = (ours - official)[:, ~open_rows].abs().max() / official.abs().max()
    assert 1e-3 < gap < 3e-2


def test_default_concept_tokens_are_the_content_words(pipe):
    from visadapt.diffusion.composer.concepts import content_words, token_positions

    assert content_words("a photo of a cat") == ["cat"]
    assert content_words("A close photo of a fluffy <cat1> cat, on the grass") == ["close", "fluffy", "<cat1>", "cat",
                                                                                    "grass"]
    assert token_positions(pipe.tokenizer, "a photo of a cat", None) == token_positions(
        pipe.tokenizer, "a photo of a cat", ["cat"]) == [5]
    assert token_positions(pipe.tokenizer, "a cat and a cat", ["cat", "cat"]) == [2, 5]
    assert token_positions(pipe.tokenizer, "a photo of", None) == [1, 2, 3]  # only stop words: all of them


def test_user_adapters_condition_the_global_branch_only(pipe, loras, tmp_path):
    # A user adapter on exactly what a full-canvas concept replaces (attn2 K/V/O and the text encoder) changes nothing.
    user = _attn2_kv_o_and_text_encoder(loras["b"], tmp_path / "user.safetensors")
    full = [Concept(lora=loras["a"], prompt="a photo of a cat", box=[0, 0, 1, 1])]
    alone = generate(pipe, concepts=full, composer=PLAIN)
    pipe.load_lora_weights(str(user), adapter_name="style")
    pipe.set_adapters("style")
    pipe.enable_lora()  # the composition before left the (then concept-only) adapters disabled
    assert torch.equal(generate(pipe, concepts=full, composer=PLAIN), alone)
    leaky = ComposerConfig(latent_optimization=False, latent_reinit=False, user_adapters_in_concepts=True)
    assert (generate(pipe, concepts=full, composer=leaky) - alone).abs().max() > 1e-3
    half = [Concept(lora=loras["a"], prompt="a photo of a cat", box=[0, 0, 0.5, 1])]
    styled = generate(pipe, concepts=half, composer=PLAIN)
    pipe.disable_lora()
    assert (generate(pipe, concepts=half, composer=PLAIN) - styled).abs().max() > 1e-3  # the global branch has it


# -- the refinement's cost levers (issue 30) ----------------------------------------------------------------------

LEVERS_OFF = dict(refine_early_exit=False, reuse_constants=False)


def _sd15_layout_pipeline():
    """SD-1.5's UNet layout in miniature: cross-attention on three of four levels, so at 64 px (32×32 latent) the
    loss layers (latent / 4) are down_blocks.2 and up_blocks.1 and up_blocks.2/3 run after them, as in SD."""
    from visadapt.diffusion.tiny import sd15_layout_unet

    tiny = tiny_pipeline("sd")
    pipe = LoRAComposerPipeline(**{**tiny.components, "unet": sd15_layout_unet()})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    pipe = _sd15_layout_pipeline()
    folder = tmp_path_factory.mktemp("sd15_loras")
    files = [save_random_lora(pipe, folder / f"c{i}.safetensors", seed=i + 1) for i in range(3)]
    concepts = [Concept(lora=f, prompt=f"a photo of a thing{i}", box=[i / 3, 0.1, (i + 1) / 3, 0.9],
                        tokens=[f"thing{i}"]) for i, f in enumerate(files)]
    return pipe, concepts


def _composed(pipe, concepts, steps=3, **config):
    from visadapt.utils.measure import BlockCalls

    with BlockCalls.unet_blocks(pipe.unet) as calls:
        out = pipe(prompt="things side by side", height=64, width=64, num_inference_steps=steps, output_type="latent",
                   generator=torch.Generator().manual_seed(0), concepts=concepts,
                   composer=ComposerConfig(**config)).images
    return out, dict(pipe.composition_log), calls


@pytest.mark.parametrize("checkpointing", [True, False])
@pytest.mark.parametrize("lever", ["refine_early_exit", "reuse_constants"])
def test_each_refinement_lever_keeps_the_loss_and_latent_update(sd15, lever, checkpointing):
    pipe, concepts = sd15
    off, log_off, calls_off = _composed(pipe, concepts, gradient_checkpointing=checkpointing, **LEVERS_OFF)
    on, log_on, calls_on = _composed(pipe, concepts, gradient_checkpointing=checkpointing,
                                     **{**LEVERS_OFF, lever: True})
    assert len(log_on["losses"]) == 3
    torch.testing.assert_close(log_on["losses"], log_off["losses"], rtol=1e-6, atol=0)
    torch.testing.assert_close(log_on["grad_norms"], log_off["grad_norms"], rtol=1e-5, atol=0)
    torch.testing.assert_close(on, off, rtol=1e-5, atol=1e-6)
    assert calls_on.backward == calls_off.backward  # autograd never went through the blocks after the loss layers
    if lever == "refine_early_exit":  # the re-init pass and 3 refinement passes skip up_blocks.2 and up_blocks.3
        for name, count in calls_off.forward.items():
            assert calls_on.forward[name] == count - (4 if name in ("up_blocks.2", "up_blocks.3") else 0), name
    else:
        assert calls_on.forward == calls_off.forward


def test_block_calls_count_forwards_and_the_backward_path(sd15):
    from visadapt.utils.measure import BlockCalls

    pipe, concepts = sd15
    with BlockCalls.unet_blocks(pipe.unet) as calls:
        pipe(prompt="things", height=64, width=64, num_inference_steps=2, output_type="latent")
    assert len(calls.forward) == 9 and set(calls.forward.values()) == {2}  # one CFG-batched pass per step
    assert calls.totals() == (18, 0)
    _, log, calls = _composed(pipe, concepts, steps=2, **LEVERS_OFF)
    # 2 sampling passes, the re-init pass and 2 refinement passes; backward only from the loss layers to the latent
    assert set(calls.forward.values()) == {5} and len(log["losses"]) == 2
    assert dict(calls.backward) == {name: 2 for name in ("down_blocks.0", "down_blocks.1", "down_blocks.2",
                                                         "down_blocks.3", "mid_block", "up_blocks.0", "up_blocks.1")}


def test_loss_layers_come_from_the_loss_resolution_not_from_names():
    from visadapt.diffusion.composer.refinement import exit_modules, loss_layers

    unet = _sd15_layout_pipeline().unet
    layers = loss_layers(unet, 4)
    assert {n.split(".attentions")[0] for n in layers} == {"down_blocks.2", "up_blocks.1"}
    assert len(layers) == 2 * (1 + 2)  # attn1 and attn2 of 1 down and 2 up transformers (layers_per_block 1)
    xl = tiny_pipeline("sdxl").unet  # cross-attention on level 1 only: down_blocks.1, the mid block, up_blocks.0
    assert {n.split(".attentions")[0] for n in loss_layers(xl, 2)} == {"down_blocks.1", "mid_block", "up_blocks.0"}
    exits = exit_modules(xl, loss_layers(xl, 2))
    expected = [*xl.down_blocks[1].attentions, *xl.mid_block.attentions, *xl.up_blocks[0].attentions]
    assert {id(m) for m in exits} == {id(m) for m in expected}  # the pass stops once all of these have run


def test_sdxl_early_exit_keeps_the_loss(loras):
    pipe = tiny_pipeline("sdxl", pipeline_class=LoRAComposerXLPipeline)
    concepts = [Concept(lora=loras["xl_a"], prompt="a cat", box=[0, 0, 0.5, 1]),
                Concept(lora=loras["xl_b"], prompt="a dog", box=[0.5, 0, 1, 1])]
    runs = []
    for early_exit in (False, True):
        out = generate(pipe, steps=2, concepts=concepts, composer=ComposerConfig(refine_early_exit=early_exit))
        runs.append((out, pipe.composition_log["losses"]))
    torch.testing.assert_close(runs[1][1], runs[0][1], rtol=1e-6, atol=0)
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_bf16_refinement_stays_close_and_the_sampling_pass_keeps_its_dtype(sd15, guidance):
    pipe, concepts = sd15
    seen = []
    hook = pipe.unet.conv_out.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    try:  # without guidance both passes have batch 1: cached K/V must not cross from the autocast pass
        out = pipe(prompt="things", height=64, width=64, num_inference_steps=3, output_type="latent",
                   guidance_scale=guidance, generator=torch.Generator().manual_seed(0), concepts=concepts,
                   composer=ComposerConfig(refine_autocast="bf16")).images
        log_bf16 = dict(pipe.composition_log)
    finally:
        hook.remove()
    assert seen == [torch.float32] * 3  # sampling passes only: the refinement stops before conv_out
    ref = pipe(prompt="things", height=64, width=64, num_inference_steps=3, output_type="latent",
               guidance_scale=guidance, generator=torch.Generator().manual_seed(0), concepts=concepts).images
    assert torch.isfinite(out).all()
    torch.testing.assert_close(log_bf16["losses"], pipe.composition_log["losses"], rtol=1e-3, atol=0)
    assert not torch.equal(out, ref)  # bf16 does round: it is an option, not a free lever


def test_text_kv_cache_reprojects_a_new_context():
    comp = _loss_composition()
    comp.cache_text_kv = True
    attn = torch.nn.Module()
    attn.norm_cross, attn.heads = False, 2
    attn.to_k, attn.to_v = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    first = torch.randn(1, 5, 8)
    k1, _ = comp.text_kv("layer", attn, first)
    assert comp.text_kv("layer", attn, first)[0] is k1  # same tensor: projected once
    second = first + 1
    k2, _ = comp.text_kv("layer", attn, second)
    torch.testing.assert_close(k2, attn.to_k(second).unflatten(-1, (2, -1)).transpose(1, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert comp.text_kv("layer", attn, second)[0].dtype == torch.bfloat16
    assert comp.text_kv("layer", attn, second)[0] is k2


def test_refine_autocast_names_the_choices():
    with pytest.raises(ValueError, match="None .* or 'bf16'"):
        ComposerConfig(refine_autocast="fp8")
