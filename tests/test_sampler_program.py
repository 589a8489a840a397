"""`lvd sample` in one process on tiny random pipelines: every strategy end to end (frame counts,
decodable mp4, JSON) and its mechanism visible in the per-chunk state; state-folder checks."""

from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sampler.cli import build_parser, config_from_args, main
from sampler.config import SampleConfig
from sampler.distributed import World
from sampler.program import generate
from sampler.state import ParamsMismatch
from sampler.strategies import STRATEGIES
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


def base_config(pipelines: dict[str, str], tmp_path: Path, **given) -> SampleConfig:
    """A command on the tiny pipelines; `given` holds command-wide fields and the strategy's knobs."""
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
        strategy="ddim",
    )
    command_fields = {spec.name for spec in fields(SampleConfig)}
    command = {key: value for key, value in {**defaults, **given}.items() if key in command_fields}
    knobs = {key: value for key, value in given.items() if key not in command_fields}
    return SampleConfig(**command, strategy_config=STRATEGIES[command["strategy"]].config(**knobs))


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
        model2=pipelines["diffusion"],
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
    assert report["timings"]["refine"] > 0 and report["units_computed"] == 4 + 1 + 3  # + the upsampled video


def test_rerun_reuses_everything_and_refuses_other_parameters(pipelines, tmp_path):
    config = base_config(pipelines, tmp_path, strategy="vidrd", frames=16, clip_frames=4, overlap=2)
    run(config)
    first_bytes = Path(config.out).read_bytes()
    report = run(config)
    assert report["units_reused"] == 2 and report["units_computed"] == 0
    assert Path(config.out).read_bytes() == first_bytes
    with pytest.raises(ParamsMismatch, match="alpha"):
        generate(replace(config, strategy_config=replace(config.strategy_config, alpha=2.0)))


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


@pytest.mark.parametrize(
    "strategy, flags, knobs",
    [
        ("lvdm-autoregressive", ["--k", "2", "--s", "50", "--w", "0.2", "--N", "6"], dict(cond_frames=2, perturb_level=50, uncond_weight=0.2, clip_frames=6)),
        ("lvdm-hierarchical", ["--stride", "5", "--k", "2"], dict(keyframe_stride=5, cond_frames=2, clip_frames=4)),
        ("vidrd", ["--M", "3", "--alpha", "2", "--beta", "0.5"], dict(overlap=3, alpha=2.0, beta=0.5, clip_frames=8)),
        ("videofusion", ["--lambda", "0.3", "--N", "8"], dict(lam=0.3, clip_frames=8)),
        ("streaming", ["--F", "16", "--O", "4", "--refine-t", "500", "--no-refine"], dict(blend_frames=16, blend_overlap=4, refine_t=500, refine=False)),
        ("streaming", ["--refine-size", "512x384"], dict(refine_size="512x384", refine=True)),
        ("ddim", ["--N", "3", "--M", "3"], dict(clip_frames=3)),
        ("cmd", ["--N", "4", "--content-strength", "0.2"], dict(clip_frames=4, content_strength=0.2)),
    ],
)
def test_cli_paper_aliases_set_the_strategys_knobs(strategy, flags, knobs):
    argv = ["--model", "m", "--model2", "m2", "--prompt", "p", "--out", "o.mp4", "--strategy", strategy, *flags]
    config = config_from_args(build_parser().parse_args(argv))
    assert type(config.strategy_config) is STRATEGIES[strategy].config
    assert {name: getattr(config.strategy_config, name) for name in knobs} == knobs
    assert (config.height, config.width, config.steps, config.progress) == (256, 256, 50, True)


def test_the_flags_are_generated_and_repeat_no_default():
    """`lvd sample`'s options, as they were when the parser was written by hand; none carries a
    default of its own (the config dataclasses hold every default)."""
    actions = [action for action in build_parser()._actions if action.dest != "help"]
    assert {option for action in actions for option in action.option_strings} == {
        "--model", "--model2", "--strategy", "--frames", "--prompt", "--prompts", "--out", "--seed",
        "--nproc", "--steps", "--eta", "--sampler", "--shift", "--guidance", "--height", "--width", "--fps", "--device",
        "--decode-context", "--clip-frames", "--N", "--cond-frames", "--k", "--perturb-level", "--s",
        "--uncond-weight", "--w", "--keyframe-stride", "--stride", "--overlap", "--M", "--alpha",
        "--beta", "--lam", "--lambda", "--blend-frames", "--F", "--blend-overlap", "--O", "--refine-t",
        "--refine-size", "--no-refine", "--no-progress", "--quiet", "--content-strength", "--lora", "--lora-scale",
        "--no-blend", "--no-apm", "--no-noise-reversion", "--image", "--sp", "--sp-ring",
    }
    assert all(action.default is None for action in actions)


def test_hierarchical_tasks_list_every_unit_once_after_the_gaps_it_needs():
    from sampler.strategies.lvdm_hierarchical import hierarchical_tasks

    assert hierarchical_tasks(3, 4, 1) == [
        ("gap", 0),
        ("gap", 1),
        ("decode", 0),
        ("gap", 2),
        ("decode", 1),
        ("decode", 2),
        ("decode", 3),
    ]
    for num_gaps, num_pieces, ranks in [(14, 15, 2), (14, 14, 3), (1, 2, 4), (146, 147, 8)]:
        tasks = hierarchical_tasks(num_gaps, num_pieces, ranks)
        assert sorted(tasks) == sorted(
            [("gap", i) for i in range(num_gaps)] + [("decode", i) for i in range(num_pieces)]
        )
        for position, (kind, index) in enumerate(tasks):
            if kind == "decode":  # its gaps (i - 1 as context, and i) come at least `ranks` units before
                needed = [gap for gap in (index - 1, index) if 0 <= gap < num_gaps]
                assert all(tasks.index(("gap", gap)) < position for gap in needed)
                assert sum(kind == "gap" for kind, _ in tasks[:position]) >= min(index + ranks, num_gaps)


class OneAtATime(World):
    """Two ranks' worth of `World` run one after the other in this process: the collectives are
    no-ops, so each rank's part of `lvdm_hierarchical.run` can be run and inspected alone."""

    def barrier(self) -> None:
        pass

    def all_gather(self, value):
        return [value] * self.size

    def broadcast(self, value, src):
        return value


def test_hierarchical_ranks_fill_gaps_as_keyframes_appear_and_claim_each_unit_once(
    pipelines, tmp_path, monkeypatch
):
    import shutil

    import sampler.program as program
    from sampler.strategies import lvdm_hierarchical

    fields = dict(
        model=pipelines["lvdm_prediction"],
        model2=pipelines["lvdm_interpolation"],
        strategy="lvdm-hierarchical",
        frames=30,  # 15 latent frames, stride 3: keyframes 0, 3, ..., 15 in 2 clips (4, then 2)
        keyframe_stride=3,
    )
    reference = base_config(pipelines, tmp_path / "one", **fields)
    run(reference)
    ref_parts = Path(reference.out).with_suffix(".parts")
    assert part(Path(reference.out), "keyframes-00000")["latents"].shape[2] == 4

    config = base_config(pipelines, tmp_path / "two", **fields)
    parts = Path(config.out).with_suffix(".parts")
    parts.mkdir(parents=True)
    for name in ("params.json", "keyframes-00000.safetensors"):  # the owner is still on the second clip
        shutil.copy(ref_parts / name, parts / name)
    monkeypatch.setattr(lvdm_hierarchical, "UNIT_TIMEOUT", 1.0)
    monkeypatch.setattr(program, "init_world", lambda device: OneAtATime(rank=1, size=2))
    with pytest.raises(TimeoutError, match="keyframes-00001"):
        generate(config)
    # Rank 1 filled the gaps between the first clip's keyframes and decoded the first piece, while
    # the second keyframe clip did not exist yet; it then waited for that clip for gap 3.
    assert sorted(path.name for path in parts.glob("gap-*.safetensors")) == [
        f"gap-0000{i}.safetensors" for i in range(3)
    ]
    for index in range(3):
        name = f"gap-{index:05d}"
        assert part(Path(config.out), name)["latents"].equal(part(Path(reference.out), name)["latents"])
    assert [path.name for path in parts.glob("frames-*")] == ["frames-00000.safetensors"]
    claims = {path.name for path in parts.glob("*.claim")}
    assert claims == {f"gap-0000{i}.claim" for i in range(4)} | {"decode-00000.claim"}

    # The owner finishes the keyframe stage and everything left; its video is the one-rank video.
    shutil.copy(ref_parts / "keyframes-00001.safetensors", parts / "keyframes-00001.safetensors")
    monkeypatch.setattr(program, "init_world", lambda device: OneAtATime(rank=0, size=2))
    generate(config)
    assert Path(config.out).read_bytes() == Path(reference.out).read_bytes()
    report = json.loads(Path(config.out).with_suffix(".json").read_text())
    assert report["ranks"][0]["reused"] == 2 + 3  # both keyframe clips, the three gaps rank 1 saved
    assert report["ranks"][0]["computed"] == 2  # gaps 3 and 4
    assert not list(parts.glob("*.claim")) and not list(parts.glob("frames-*"))


def _claim_all(folder: str, names: list[str], queue) -> None:
    from sampler.state import PartsStore

    store = PartsStore(Path(folder))
    queue.put([name for name in names if store.claim(name)])


@pytest.mark.slow
def test_claims_hand_each_unit_to_exactly_one_of_racing_processes(tmp_path):
    import multiprocessing

    from sampler.state import PartsStore

    names = [f"gap-{index:05d}" for index in range(300)]
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    procs = [context.Process(target=_claim_all, args=(str(tmp_path), names, queue)) for _ in range(3)]
    for proc in procs:
        proc.start()
    won = [queue.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    assert sorted(name for claims in won for name in claims) == names  # none twice, none lost
    store = PartsStore(tmp_path)
    assert not store.claim(names[0])
    store.clear("*.claim")
    assert store.claim(names[0]) and not list(tmp_path.glob("*.tmp*"))


def test_kept_lengths_cut_the_pieces_to_the_video():
    from sampler.work import decoded_lengths, kept_lengths

    assert kept_lengths([7, 7, 7, 1], 16) == [7, 7, 2, 0]
    assert decoded_lengths([7, 7, 7, 1], 16) == [7, 7, 2]
    assert decoded_lengths([7] * 14 + [1], 96) == [7] * 13 + [5]


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


@pytest.mark.parametrize(
    "strategy, model, model2, needed",
    [
        ("lvdm-hierarchical", "diffusion", "lvdm_interpolation", "--model from a lvdm_prediction run"),
        ("lvdm-hierarchical", "lvdm_prediction", "diffusion", "--model2 from a lvdm_interpolation run"),
        ("vidrd", "lvdm_prediction", None, "--model from a diffusion run"),
        ("streaming", "diffusion", None, "--model from a streaming run"),
        ("ddim", "diffusion", "diffusion", "takes no --model2"),
    ],
)
def test_an_export_of_the_wrong_task_is_one_clear_error(pipelines, tmp_path, capsys, strategy, model, model2, needed):
    argv = ["--model", pipelines[model], "--strategy", strategy, "--prompt", "x", "--out", str(tmp_path / "v.mp4")]
    argv += ["--frames", "8", "--steps", "2", "--height", "32", "--width", "32", "--device", "cpu", "--no-progress"]
    argv += ["--model2", pipelines[model2]] if model2 else []
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--strategy {strategy}" in err[0] and needed in err[0], err
    if "needs --model " in needed:
        assert f"{pipelines[model]} is a '{model}' export" in err[0]
    assert not (tmp_path / "v.mp4").exists()


def test_text_guidance_acts_in_the_lvdm_strategies_and_g1_is_the_conditional_network(pipelines, tmp_path):
    """--guidance moves LVDM's keyframes and gaps; at g = 1 the masked network is the plain
    text-conditioned one, and at g > 1 it is CFG against the empty prompt on the same input."""
    from sampler.denoisers import lvdm_predict_fn
    from sampler.pipeline import load_pipeline

    parts = {}
    for g in (1.0, 3.0):
        config = base_config(
            pipelines, tmp_path / f"g{g}", model=pipelines["lvdm_prediction"], model2=pipelines["lvdm_interpolation"],
            strategy="lvdm-hierarchical", frames=12, keyframe_stride=3, guidance=g,
        )
        run(config)
        parts[g] = {name: part(Path(config.out), name)["latents"] for name in ("keyframes-00000", "gap-00000")}
    for name in ("keyframes-00000", "gap-00000"):
        assert not torch.allclose(parts[1.0][name], parts[3.0][name], atol=1e-4), name
    pipeline = load_pipeline(pipelines["lvdm_prediction"])
    net_input = torch.randn(1, 5, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, level = torch.tensor([500]), torch.tensor([100])
    with torch.no_grad():
        cond = pipeline.denoiser(net_input, t, context=pipeline.text_context("a red bicycle"), level=level)
        empty = pipeline.denoiser(net_input, t, context=pipeline.text_context(""), level=level)
        assert torch.equal(lvdm_predict_fn(pipeline, "a red bicycle", 1.0)(net_input, t, level), cond)
        torch.testing.assert_close(lvdm_predict_fn(pipeline, "a red bicycle", 3.0)(net_input, t, level), empty + 3.0 * (cond - empty))


def test_an_lvdm_export_without_its_no_condition_level_is_refused(pipelines, tmp_path, capsys):
    import shutil

    old = tmp_path / "old_pred"
    shutil.copytree(pipelines["lvdm_prediction"], old)
    index = json.loads((old / "model_index.json").read_text())
    del index["uncond_level"]
    (old / "model_index.json").write_text(json.dumps(index))
    argv = ["--model", str(old), "--strategy", "lvdm-autoregressive", "--prompt", "x", "--out", str(tmp_path / "v.mp4")]
    argv += ["--frames", "8", "--steps", "2", "--height", "32", "--width", "32", "--device", "cpu", "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert str(old / "model_index.json") in err and "'uncond_level'" in err and "retrain" in err
