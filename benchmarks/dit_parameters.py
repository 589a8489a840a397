"""Where the parameters of the 1B-class DiTs go: the old `dit/1b` (per-block adaLN-Zero) against
the new `video_dit/1.3b` (shared adaLN + per-block offsets), and the new one with per-block adaLN.

Counted on the `meta` device (nothing allocated), with the context width the scale configs give
them (OpenCLIP ViT-H: 1024). Prints a table per model, then one JSON line: the share of the
parameters in adaLN modulation for each, and what the shared modulation saves.

    python benchmarks/dit_parameters.py
"""

from __future__ import annotations

import json
from collections import Counter

from torch import nn

import model_zoo

CONTEXT_DIM = 1024
"""Text width of configs/scale (OpenCLIP ViT-H-14)."""
COMPONENTS = [
    ("adaLN modulation", ("modulation", "shared.", "final.offset")),
    ("QK-norm", ("q_norm", "k_norm")),
    ("self-attention", (".attn.", ".video.out.")),
    ("cross-attention", ("cross_attn", "cross_out", "norm_cross")),
    ("MLP", (".mlp.",)),
    ("embeddings (patch, time, text, pos.)", ("patch_embed", "time_embed", "text_embed", "cond_embed")),
    ("final layer", ("final.",)),
]
"""(component, name fragments): a parameter goes to the first component whose fragment it holds."""


def components(model: nn.Module) -> Counter[str]:
    """Parameters per component of `COMPONENTS` (unmatched names under 'other')."""
    counts: Counter[str] = Counter()
    for name, param in model.named_parameters():
        group = next((label for label, parts in COMPONENTS if any(part in name for part in parts)), "other")
        counts[group] += param.numel()
    return counts


def main() -> None:
    models = {
        "dit/1b": model_zoo.build_model("dit", "1b", device="meta", context_dim=CONTEXT_DIM),
        "video_dit/1.3b": model_zoo.build_model("video_dit", "1.3b", device="meta", context_dim=CONTEXT_DIM),
        "video_dit/1.3b per-block adaLN": model_zoo.build_model(
            "video_dit", "1.3b", device="meta", context_dim=CONTEXT_DIM, modulation="per_block"
        ),
    }
    shares = {}
    for name, model in models.items():
        counts = components(model)
        total = sum(counts.values())
        print(f"{name}: {total:,} parameters")
        for label, count in counts.most_common():
            print(f"  {label:<40} {count:>15,}  {count / total:6.1%}")
        shares[name] = (counts["adaLN modulation"], total)
    saved = shares["video_dit/1.3b per-block adaLN"][1] - shares["video_dit/1.3b"][1]
    print(
        json.dumps(
            {
                "name": "video_dit_1.3b_adaln_share",
                "value": shares["video_dit/1.3b"][0] / shares["video_dit/1.3b"][1],
                "unit": "fraction of parameters",
                "goal": 0.05,
                "better": "lower",
                "adaln_share": {name: adaln / total for name, (adaln, total) in shares.items()},
                "parameters": {name: total for name, (_, total) in shares.items()},
                "saved_by_shared_modulation": saved,
            }
        )
    )


if __name__ == "__main__":
    main()
