"""Official LoRAT checkpoints: a synthetic state dict with the official names and shapes lands completely."""

import pytest
import timm
import torch
from safetensors.torch import save_file

from visadapt.tracking.checkpoint import load_official, read_state_dict
from visadapt.tracking.model import LoRAT, add_adapter, lorat_adapter_config, merge

C, R, DEPTH, Z, X = 32, 4, 2, (2, 2), (4, 4)
SWIGLU_RATIO = 5.5  # packed fc1 = w12: C -> 176 (gate | value), fc2 = w3: 88 -> C


def tiny_vit(swiglu: bool = False) -> torch.nn.Module:
    extra = dict(mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU, mlp_ratio=SWIGLU_RATIO) if swiglu else {}
    return timm.models.VisionTransformer(img_size=84, patch_size=14, embed_dim=C, depth=DEPTH, num_heads=2,
                                         init_values=1.0, num_classes=0, **extra)


def official_state_dict(swiglu: bool = False, alpha=None) -> dict[str, torch.Tensor]:
    """Names and shapes as the official LoRAT_DINOv2 + enable_lora_ state_dict writes them (r = R)."""
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    hidden = 4 * C
    sd = {"patch_embed.proj.weight": t(C, 3, 14, 14), "patch_embed.proj.bias": t(C),
          "pos_embed": t(1, X[0] * X[1], C), "token_type_embed": t(3, C), "norm.weight": t(C), "norm.bias": t(C)}
    fc1, fc2 = ("w12", "w3") if swiglu else ("fc1", "fc2")
    fc1_out, fc2_in = (int(C * SWIGLU_RATIO), int(C * SWIGLU_RATIO) // 2) if swiglu else (hidden, hidden)
    for i in range(DEPTH):
        b = f"blocks.{i}."
        for n in ("norm1", "norm2"):
            sd[b + n + ".weight"], sd[b + n + ".bias"] = t(C), t(C)
        sd[b + "ls1.gamma"], sd[b + "ls2.gamma"] = t(C), t(C)
        sites = {f"attn.qkv.{p}": (C, C) for p in "qkv"}
        sites |= {"attn.proj": (C, C), f"mlp.{fc1}": (fc1_out, C), f"mlp.{fc2}": (C, fc2_in)}
        for site, (d_out, d_in) in sites.items():
            sd[f"{b}{site}.linear.weight"], sd[f"{b}{site}.linear.bias"] = t(d_out, d_in), t(d_out)
            sd[f"{b}{site}.lora.A"], sd[f"{b}{site}.lora.B"] = t(R, d_in), t(d_out, R)
    for branch, k in (("cls_mlp", 1), ("reg_mlp", 4)):
        for j, d_out in enumerate((C, C, k)):
            sd[f"head.{branch}.layers.{j}.weight"], sd[f"head.{branch}.layers.{j}.bias"] = t(d_out, C), t(d_out)
    if alpha is not None:
        sd["lora_alpha"], sd["use_rslora"] = torch.tensor(float(alpha)), torch.tensor(False)
    return sd


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 3, 28, 28, generator=g), torch.randn(1, 3, 56, 56, generator=g), torch.tensor([[[0, 1],
                                                                                                       [1, 1]]])


@pytest.mark.parametrize("swiglu", [False, True])
def test_every_tensor_lands_in_the_adapted_and_the_plain_model(swiglu):
    sd = official_state_dict(swiglu)
    adapted = add_adapter(LoRAT(tiny_vit(swiglu), Z, X), lorat_adapter_config(r=R, lora_alpha=R))
    plain = LoRAT(tiny_vit(swiglu), Z, X)
    assert load_official(adapted, sd) == {"tensors": len(sd), "adapters": DEPTH * 6}
    assert load_official(plain, sd)["adapters"] == DEPTH * 6
    qkv = adapted.blocks[1].attn.qkv
    torch.testing.assert_close(qkv.base_layer.weight[C:2 * C], sd["blocks.1.attn.qkv.k.linear.weight"])
    torch.testing.assert_close(qkv.base_layer.bias[2 * C:], sd["blocks.1.attn.qkv.v.linear.bias"])
    factors = next(iter(qkv.adapter_factors.values()))["v"]
    torch.testing.assert_close(factors.lora_A, sd["blocks.1.attn.qkv.v.lora.A"])
    fc2 = "w3" if swiglu else "fc2"
    expected = sd[f"blocks.0.mlp.{fc2}.linear.weight"] + sd[f"blocks.0.mlp.{fc2}.lora.B"] @ sd[
        f"blocks.0.mlp.{fc2}.lora.A"]
    torch.testing.assert_close(plain.blocks[0].mlp.fc2.weight, expected)
    torch.testing.assert_close(plain.token_type_embed, sd["token_type_embed"])
    torch.testing.assert_close(plain.head.reg_mlp.layers[2].bias, sd["head.reg_mlp.layers.2.bias"])
    a, p = adapted.eval()(*inputs()), plain.eval()(*inputs())
    torch.testing.assert_close(a["boxes"], p["boxes"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(merge(adapted)(*inputs())["score_map"], p["score_map"], atol=1e-5, rtol=1e-4)


def test_lora_alpha_in_the_checkpoint_scales_the_delta():
    sd = official_state_dict(alpha=2 * R)
    plain = LoRAT(tiny_vit(), Z, X)
    load_official(plain, sd)
    expected = sd["blocks.0.attn.proj.linear.weight"] + 2 * sd["blocks.0.attn.proj.lora.B"] @ sd[
        "blocks.0.attn.proj.lora.A"]
    torch.testing.assert_close(plain.blocks[0].attn.proj.weight, expected)
    with pytest.raises(ValueError, match="scaling"):
        load_official(add_adapter(LoRAT(tiny_vit(), Z, X), lorat_adapter_config(r=R, lora_alpha=R)), sd)


def test_leftover_or_missing_tensors_raise():
    sd = official_state_dict()
    with pytest.raises(ValueError, match="without a place.*mask_token"):
        load_official(LoRAT(tiny_vit(), Z, X), sd | {"mask_token": torch.zeros(1, C)})
    del sd["norm.bias"]
    with pytest.raises(ValueError, match="without a value.*norm.bias"):
        load_official(LoRAT(tiny_vit(), Z, X), sd)
    with pytest.raises(ValueError, match="variant"):  # a 378 checkpoint into a 224 model
        load_official(LoRAT(tiny_vit(), Z, (5, 5)), official_state_dict())
    with pytest.raises(ValueError, match="plain LoRA"):
        load_official(add_adapter(LoRAT(tiny_vit(), Z, X), lorat_adapter_config("comp-lora", r=R, lora_alpha=R, k=2)),
                      official_state_dict())


def test_files_load_without_unpickling(tmp_path):
    sd = official_state_dict()
    save_file(sd, tmp_path / "base.bin")
    torch.save(sd, tmp_path / "pickled.bin")
    for name in ("base.bin", "pickled.bin"):
        assert read_state_dict(tmp_path / name).keys() == sd.keys()
    torch.save({"weights": sd, "fn": print}, tmp_path / "evil.bin")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        read_state_dict(tmp_path / "evil.bin")


@pytest.mark.parametrize("variant, dim, depth, fc1_out, fc2_in", [
    ("B-224", 768, 12, 3072, 3072),
    ("g-378", 1536, 40, 8192, 4096),  # DINOv2 giant2: SwiGLUFFNFused w12 (C → 2·4096), w3 (4096 → C)
])
def test_official_names_and_shapes_map_onto_the_full_size_variants(variant, dim, depth, fc1_out, fc2_in):
    from visadapt.tracking.checkpoint import convert_official
    from visadapt.tracking.model import build_lorat, get_variant

    grid = get_variant(variant).x_grid
    ffn = ("w12", "w3") if variant.startswith("g") else ("fc1", "fc2")
    with torch.device("meta"):
        shapes = {"patch_embed.proj.weight": (dim, 3, 14, 14), "patch_embed.proj.bias": (dim,),
                  "pos_embed": (1, grid[0] * grid[1], dim), "token_type_embed": (3, dim), "norm.weight": (dim,),
                  "norm.bias": (dim,)}
        for i in range(depth):
            b = f"blocks.{i}."
            shapes |= {b + n: (dim,) for n in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
                                               "ls1.gamma", "ls2.gamma")}
            sites = {f"attn.qkv.{p}": (dim, dim) for p in "qkv"}
            sites |= {"attn.proj": (dim, dim), f"mlp.{ffn[0]}": (fc1_out, dim), f"mlp.{ffn[1]}": (dim, fc2_in)}
            for site, (d_out, d_in) in sites.items():
                shapes |= {f"{b}{site}.linear.weight": (d_out, d_in), f"{b}{site}.linear.bias": (d_out,),
                           f"{b}{site}.lora.A": (64, d_in), f"{b}{site}.lora.B": (d_out, 64)}
        for branch, k in (("cls_mlp", 1), ("reg_mlp", 4)):
            for j, d_out in enumerate((dim, dim, k)):
                shapes |= {f"head.{branch}.layers.{j}.weight": (d_out, dim), f"head.{branch}.layers.{j}.bias": (d_out,)}
        state = {k: torch.empty(s) for k, s in shapes.items()}
        state |= {"lora_alpha": torch.tensor(64.0, device="cpu"), "use_rslora": torch.tensor(False, device="cpu")}
        plain, lora = convert_official(state)
        model = build_lorat(variant, lora=False)
    target = model.state_dict()
    assert plain.keys() == target.keys()
    assert all(plain[k].shape == target[k].shape for k in target)
    assert len(lora) == depth * 6
