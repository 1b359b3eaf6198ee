"""``report.md`` of a hyperspectral run."""

from __future__ import annotations


def run_summary(results: dict) -> str:
    """Markdown: the scores, the per-class table and what produced them."""
    lines = [
        f"## {results['model']} on {results['dataset']}",
        "",
        f"{results['num_train']} training / {results['num_val']} validation / {results['num_test']} test pixels, "
        f"{results['pca_components']} PCA components, {results['patch_size']}×{results['patch_size']} patches; "
        f"LoRA {results['lora_placement']} ({'gated' if results['lora_gate_residual'] else 'plain'}, "
        f"{results['lora_backend']}), freezing {results['freeze']}: {results['trainable_params']:,} of "
        f"{results['total_params']:,} parameters trained for {results['epochs']} epochs "
        f"({results['train_wall_time_s']:.0f} s on {results['device']}, {results['train_samples_per_s']:.0f} "
        f"samples/s; test inference {results['test_inference_samples_per_s']:.0f} samples/s).",
        "",
        "| OA (%) | AA (%) | κ (×100) |",
        "|---|---|---|",
        f"| {results['OA']:.2f} | {results['AA']:.2f} | {results['kappa']:.2f} |",
    ]
    if results.get("val"):
        v = results["val"]
        lines += ["", f"Validation split: OA {v['OA']:.2f}, AA {v['AA']:.2f}, κ {v['kappa']:.2f}."]
    lines += ["", "| class | test pixels | accuracy (%) | F1 (%) |", "|---|---|---|---|"]
    for name, n, a, f in zip(results["class_names"], results["support"], results["per_class_accuracy"],
                             results["per_class_f1"]):
        lines.append(f"| {name} | {n} | {a:.2f} | {f:.2f} |")
    return "\n".join(lines)
