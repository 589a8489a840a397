"""`lvd sample` in one process on tiny random pipelines: every strategy end to end (frame counts,
decodable mp4, JSON) and its mechanism visible in the per-chunk state; state-folder checks."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sampler.cli import build_parser, config_from_args, main
from sampler.config import SampleConfig
from sampler.program import generate
from sampler.state import ParamsMismatch
from sampler.tiny import tiny_pipeline
from sampler.video_io import count_frames

TASKS = ("diffusion", "lvdm_prediction", "lvdm_interpolation", "videofusion", "streaming")


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("pipelines")
    return {task: str(tiny_pipeline(root / task, task, seed=index)) for index, task in enumerate(TASKS)}


def run(config: SampleConfig) -> dict:
    written = generate(config)
    assert written == [Path(config.out), Path(config.out).with_suffix(".json")]
    report = json.loads(Path(config.out).with_suffix(".json").read_text())
    assert count_frames(Path(config.out)) == config.frames
    return report


def part(out: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(out.with_suffix(".parts") / f"{name}.safetensors"))


def base_config(pipelines: dict[str, str], tmp_path: Path, **fields) -> SampleConfig:
    defaults = dict(
        model=pipelines["diffusion"],
        frames=12,
        prompts=("a red bicycle",),
        out=str(tmp_path / "video.mp4"),
        steps=3,
        height=32,
        width=32,
        progress=False,
        device="cpu",
    )
    return SampleConfig(**{**defaults, **fields})


def test_ddim_writes_mp4_and_report(pipelines, tmp_path):
    report = run(base_config(pipelines, tmp_path, strategy="ddim", frames=7))
    assert report["latent_frames"] == 4  # tiny video VAE halves time: ceil(7 / 2)
    assert report["units_computed"] == 1 and report["units_reused"] == 0
    assert report["model"]["task"] == "diffusion" and set(report["model"]["components"]) >= {
        "denoiser",
        "vae",
    }
    assert report["params"]["steps"] == 3 and report["seed"] == 0
    assert report["timings"]["chunk"] > 0


def test_lvdm_autoregressive_conditions_on_last_k_frames(pipelines, tmp_path):
    config = base_config(
        pipelines,
        tmp_path,
        model=pipelines["lvdm_prediction"],
        strategy="lvdm-autoregressive",
        frames=22,
        cond_frames=1,
    )
    report = run(config)
    out = Path(config.out)
    # l = 4 then l - k = 3 new latent frames per clip: 4 + 3 + 3 + 3 >= 11 latent frames.
    assert report["units_computed"] == 4
    first, second = part(out, "chunk-00000"), part(out, "chunk-00001")
    assert first["latents"].shape[2] == 4 and second["latents"].shape[2] == 3
    assert torch.equal(first["context"], first["latents"][:, :, -1:])


def test_lvdm_hierarchical_keyframes_then_gaps(pipelines, tmp_path):
    config = base_config(
        pipelines,
        tmp_path,
        model=pipelines["lvdm_prediction"],
        model2=pipelines["lvdm_interpolation"],
        strategy="lvdm-hierarchical",
        frames=20,
        keyframe_stride=3,
    )
    report = run(config)
    out = Path(config.out)
    # 10 latent frames, stride 3 -> keyframes at 0, 3, 6, 9 and three gaps of 2 frames each.
    keyframes = part(out, "keyframes-00000")["latents"]
    assert keyframes.shape[2] == 4
    gaps = [part(out, f"gap-{index:05d}")["latents"] for index in range(3)]
    assert all(gap.shape[2] == 2 for gap in gaps)
    assert report["units_computed"] == 4
    assert not torch.equal(gaps[0], gaps[1])


def test_vidrd_reuses_reversed_noise_and_guides(pipelines, tmp_path):
    config = base_config(pipelines, tmp_path, strategy="vidrd", frames=16, clip_frames=4, overlap=2, steps=5)
    run(config)
    out = Path(config.out)
    first, second = part(out, "chunk-00000"), part(out, "chunk-00001")
    # FNR: the first M initial noises of clip 1 are clip 0's last M, reversed.
    torch.testing.assert_close(
        second["initial_noise"][:, :, :2], first["initial_noise"].flip(2)[:, :, :2], rtol=0, atol=0
    )
    # PNS: the other frames follow the previous clip's noise with weight alpha / sqrt(1 + alpha^2).
    correlation = torch.corrcoef(
        torch.stack(
            [second["initial_noise"][:, :, 2:].flatten(), first["initial_noise"].flip(2)[:, :, 2:].flatten()]
        )
    )[0, 1]
    assert correlation > 0.9
    # DSG: beta = 0.4 of 5 steps -> frame 0 is copied during 2 steps, which the trajectory records.
    assert first["guide_trajectory"].shape[0] == 2 and first["guide_trajectory"].shape[3] == 2


def test_videofusion_windows_share_base_noise(pipelines, tmp_path):
    common = dict(model=pipelines["videofusion"], strategy="videofusion", frames=16, clip_frames=4)
    shared = base_config(pipelines, tmp_path / "shared", lam=1.0, **common)
    mixed = base_config(pipelines, tmp_path / "mixed", lam=0.5, **common)
    run(shared), run(mixed)
    # lambda = 1: every window starts from the same (base) noise, so windows coincide.
    assert torch.equal(
        part(Path(shared.out), "chunk-00000")["latents"], part(Path(shared.out), "chunk-00001")["latents"]
    )
    assert not torch.equal(
        part(Path(mixed.out), "chunk-00000")["latents"], part(Path(mixed.out), "chunk-00001")["latents"]
    )


def test_streaming_cam_apm_state_and_blended_overlaps(pipelines, tmp_path):
    config = base_config(
        pipelines,
        tmp_path,
        model=pipelines["streaming"],
        strategy="streaming",
        frames=28,
        clip_frames=4,
        blend_frames=6,
        blend_overlap=2,
        steps=4,
        refine_t=600,
    )
    report = run(config)
    out = Path(config.out)
    chunks = [part(out, f"stream-{index:05d}") for index in range(4)]
    # CAM reads the last F_cond = 2 latent frames of the previous chunk; APM one anchor for all chunks.
    assert torch.equal(chunks[1]["cond"], chunks[1]["latents"][:, :, -2:])
    assert all(torch.equal(chunk["anchor"], chunks[0]["anchor"]) for chunk in chunks)
    # 14 latent frames in chunks of F = 6 overlapping by O = 2: ceil((14 - 2) / 4) = 3 chunks.
    refined = [part(out, f"refined-{index:05d}")["latents"] for index in range(3)]
    for left, right in zip(refined, refined[1:]):
        assert torch.equal(left[:, :, -2:], right[:, :, :2])  # blending leaves the overlaps equal
    assert report["timings"]["refine"] > 0 and report["units_computed"] == 4 + 3


def test_rerun_reuses_everything_and_refuses_other_parameters(pipelines, tmp_path):
    config = base_config(pipelines, tmp_path, strategy="vidrd", frames=16, clip_frames=4, overlap=2)
    run(config)
    first_bytes = Path(config.out).read_bytes()
    report = run(config)
    assert report["units_reused"] == 2 and report["units_computed"] == 0
    assert Path(config.out).read_bytes() == first_bytes
    with pytest.raises(ParamsMismatch, match="alpha"):
        generate(replace(config, alpha=2.0))


def test_several_prompts_give_one_video_each(pipelines, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\n")
    out = tmp_path / "many.mp4"
    argv = ["--model", pipelines["diffusion"], "--prompts", str(prompts), "--out", str(out), "--frames", "4"]
    argv += ["--steps", "2", "--height", "32", "--width", "32", "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    for index, prompt in enumerate(["a cat", "a dog"]):
        video = tmp_path / f"many-{index:03d}.mp4"
        assert count_frames(video) == 4
        report = json.loads(video.with_suffix(".json").read_text())
        assert report["prompt"] == prompt and report["seed"] == index


def test_cli_paper_aliases():
    args = build_parser().parse_args(
        [
            "--model",
            "m",
            "--prompt",
            "p",
            "--out",
            "o.mp4",
            "--k",
            "2",
            "--M",
            "3",
            "--lambda",
            "0.3",
            "--F",
            "16",
        ]
    )
    config = config_from_args(args)
    assert (config.cond_frames, config.overlap, config.lam, config.blend_frames) == (2, 3, 0.3, 16)


def test_each_hierarchical_gap_is_filled_by_one_rank_that_decodes_next_to_it():
    from sampler.program import OWNER_DECODE_SHARE, decode_block, decoded_lengths, decoding_ranks, gap_ranks

    for num_gaps, size, owner in [(13, 2, 0), (13, 2, 1), (7, 3, 2), (2, 4, 0), (1, 2, 0)]:
        kept = decoded_lengths([4] * num_gaps + [1], 4 * num_gaps)  # the last keyframe is cut
        assert len(kept) == num_gaps
        decoders = decoding_ranks(kept, size, owner)
        owners = gap_ranks(decoders, num_gaps)
        assert len(owners) == num_gaps and set(owners) <= set(range(size))
        for position in range(size):
            block = decode_block(kept, position, size, OWNER_DECODE_SHARE)
            rank = (owner + position) % size
            assert all(decoders[index] == rank for index in block)
            if len(block) and block.start > 0:
                # the piece before a block is this rank's decoder context: it fills that gap itself
                assert owners[block.start - 1] == rank
            # every other gap of its block but the last is its own as well
            assert all(owners[index] == rank for index in block if index + 1 in block and index < num_gaps)


def test_hierarchical_blocks_balance_gap_filling_and_decoding_per_rank():
    """Gaps cost more than decoding (steps x guided calls): weighted blocks give every rank the same
    number of gaps to within one, where frame-balanced blocks gave rank 1 two more (6 vs 8 of 14)."""
    from sampler.program import decoded_lengths, decoding_ranks, gap_ranks, hierarchical_weights

    kept = decoded_lengths([7] * 14 + [1], 96)  # benchmarks/sampler_scaling.py: 192 frames, stride 7
    assert hierarchical_weights(kept, 14, 0.0) == kept
    weights = hierarchical_weights(kept, 14, 24.0)
    assert sum(weights) == sum(kept) + 24.0 * 14
    assert (
        weights[0] == kept[0] and weights[-1] == kept[-1] + 2 * 24.0
    )  # the last piece: its gap and the one before

    def gaps_per_rank(decoders: list[int], size: int) -> list[int]:
        owners = gap_ranks(decoders, 14)
        return [owners.count(rank) for rank in range(size)]

    assert gaps_per_rank(decoding_ranks(kept, 2, 0), 2) == [6, 8]  # by frames alone
    for size, owner in [(2, 0), (2, 1), (3, 0), (4, 2)]:
        counts = gaps_per_rank(decoding_ranks(weights, size, owner), size)
        assert sum(counts) == 14 and max(counts) - min(counts) <= 1, (size, owner, counts)


def test_decode_blocks_partition_the_pieces_by_frames():
    from sampler.program import decode_block, kept_lengths

    assert kept_lengths([7, 7, 7, 1], 16) == [7, 7, 2, 0]
    lengths = [7] * 8 + [1]
    blocks = [decode_block(lengths, position, 2) for position in range(2)]
    assert blocks == [range(0, 4), range(4, 9)]  # 28 and 29 latent frames
    blocks = [decode_block([8, 6, 6, 6], position, 3) for position in range(3)]
    assert [index for block in blocks for index in block] == [0, 1, 2, 3]
    assert sorted(len(decode_block([5], position, 2)) for position in range(2)) == [0, 1]  # one rank idles
    # The owner (block 0) also encodes: with first_share < 1 its block holds fewer frames.
    shared = [decode_block([7] * 14, position, 2, first_share=0.8) for position in range(2)]
    assert shared == [range(0, 6), range(6, 14)]
    assert [decode_block([7] * 14, position, 2, first_share=1.0) for position in range(2)] == [
        range(0, 7),
        range(7, 14),
    ]


def test_text_tokens_are_encoded_once_per_prompt(pipelines):
    from sampler.pipeline import TEXT_CACHE_SIZE, load_pipeline

    pipeline = load_pipeline(pipelines["streaming"])
    encoder = pipeline.networks["text_encoder"]
    calls = []
    encoder.register_forward_hook(lambda module, args, out: calls.append(1))
    first = pipeline.text_context("a red bicycle")
    again = pipeline.text_context("a red bicycle")
    assert len(calls) == 1 and torch.equal(first, again)
    assert torch.equal(first, encoder.encode_prompts(["a red bicycle"]))
    for index in range(TEXT_CACHE_SIZE):  # the oldest prompt leaves the cache, the newest stay
        pipeline.text_context(f"prompt {index}")
    assert len(pipeline.text_cache) == TEXT_CACHE_SIZE and "a red bicycle" not in pipeline.text_cache
