"""Paper fidelity: each method's mechanism against its own ablation, on models trained on the
real demo media. Prints, as its last line, a JSON list with one entry per measurement.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.fidelity --demo-out demo_out [--work DIR] [--quick]

--demo-out is the folder of a FULL `lvd demo` (read only): its shards, its VAE, its text-to-video
export (`export/t2v`) and its LVDM prediction export. The demo trains no StreamingT2V CAM/APM
model and no VideoFusion model, so this script trains both (one process each, side by side) on
the demo's training clips at the demo's size, over the demo's VAE and text encoder, CAM/APM over
the frozen demo text-to-video U-Net; into --work (default <demo-out>/fidelity), where a rerun
reuses them. No text-to-video model at twice the size exists, so the StreamingT2V refiner is the
demo text-to-video export at its own size (`--model2 export/t2v --refine-size 32x32`): both
sides of the blending comparison refine the same stage-1 video, so only the blending differs.

The runs, recipes and result lines are in `benchmarks/paper_fidelity/runs.py`, the comparisons
in `benchmarks/paper_fidelity/cases.py`. Every comparison is two `lvd sample` runs of the same
model, seed, prompts (the demo's captions; one for the LVDM rollout) and DDIM steps that differ
only in the ablation's flags:

| name | mechanism | ablation | measurement | paper |
|---|---|---|---|---|
| streaming_blending_scuts | randomised blending | `--no-blend` (chunks refined alone, concatenated) | PySceneDetect cuts per video | lower |
| streaming_blending_seam_mawe_ratio | same | same | seam MAWE / interior MAWE at the refinement seams | lower |
| vidrd_seam_warp_error | FNR + PNS + DSG | `--no-noise-reversion --alpha 0 --beta 0` (naive chunking) | warp error W across clip seams | lower |
| videofusion_interframe_correlation | shared base noise (the model's λ) | `--lambda 0` (independent noise) | Pearson correlation of consecutive frames | higher |
| lvdm_feature_drift | perturbation s and unconditional guidance w | `--perturb-level 0 --uncond-weight 0` | per-chunk Inception-feature drift from chunk 0 | lower |
| streaming_apm_anchor_similarity | APM (stage 1, `--no-refine`) | `--no-apm` | Inception cosine similarity of the last chunk to the anchor frame | higher |

Each entry has name, value (mechanism), ablation_value, unit, better (the paper's direction),
goal (= ablation_value, so `python -m benchmarks`' "met" reads "this run shows the paper's
direction"), shows_paper_direction, and detail (per video, flags, sizes). The list also goes
to <work>/fidelity.json. `python -m benchmarks` leaves this script out: it needs a FULL demo
folder and about 20 minutes of the 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks.paper_fidelity.cases import COMPARISONS, Inputs
from benchmarks.paper_fidelity.runs import FULL, QUICK, Runner, train_models

NEEDED = (
    "export/t2v/model_index.json",
    "export/lvdm_prediction/model_index.json",
    "export/vae/vae",
    "shards/train/manifest.json",
    "samples/prompts.txt",
)
"""What this script reads from the demo folder."""


def captions(demo: Path) -> list[str]:
    """The demo's distinct captions, in the order of its prompt file."""
    lines = (demo / "samples" / "prompts.txt").read_text().splitlines()
    return list(dict.fromkeys(line.strip() for line in lines if line.strip()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--demo-out", type=Path, default=Path("demo_out"), help="a FULL `lvd demo` folder (read only)"
    )
    parser.add_argument(
        "--work",
        type=Path,
        help="trained models, videos, logs (default: <demo-out>/fidelity, or fidelity-quick)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke test of the chain (figures meaningless)"
    )
    args = parser.parse_args()
    demo = args.demo_out.resolve()
    missing = [needed for needed in NEEDED if not (demo / needed).exists()]
    if missing:
        raise SystemExit(
            f"fidelity: {demo} lacks {', '.join(missing)}: --demo-out must be a FULL `lvd demo` folder"
        )
    recipe = QUICK if args.quick else FULL
    work = (args.work or demo / ("fidelity-quick" if args.quick else "fidelity")).resolve()
    start, runner = time.perf_counter(), Runner(work)
    inputs = Inputs(runner, demo, train_models(runner, demo, recipe), captions(demo), recipe)
    results = [line for compare in COMPARISONS for line in compare(inputs)]
    for line in results:
        line["detail"].update(mode="quick" if args.quick else "full", recipe=asdict(recipe))
        line["detail"]["seconds_total"] = round(time.perf_counter() - start, 1)
    (work / "fidelity.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
