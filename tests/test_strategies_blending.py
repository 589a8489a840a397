"""StreamingT2V randomised blending: chunking, shared overlap noise, per-step f_thr, rank split."""

from __future__ import annotations

import threading

import pytest
import torch

from model_zoo.diffusion.schedules import alphas_cumprod, ddim_timesteps, make_betas
from sampler.strategies.blending import (
    BlendingConfig,
    blend_overlap,
    local_exchange,
    merge_chunks,
    noised_chunk,
    num_chunks,
    randomized_blending,
    refine_step,
    shared_noise_chunk,
    split_chunks,
)
from sampler.strategies.common import SamplingSetup

CONFIG = BlendingConfig()  # F = 24, O = 8
SCHEDULE = alphas_cumprod(make_betas("scaled_linear"))


def make_setup(num_steps: int = 12, eta: float = 0.0) -> SamplingSetup:
    timesteps = ddim_timesteps(1000, 2 * num_steps)[num_steps:]  # SDEdit: the second half of the schedule
    return SamplingSetup(timesteps=timesteps, alphas_cumprod=SCHEDULE, frame_shape=(1, 2, 2, 2), eta=eta)


def rolling_denoiser(x, t):
    """Each frame's output depends on its neighbour, so chunks disagree on their overlaps."""
    return torch.tanh(0.7 * x + 0.4 * x.roll(1, dims=2) + t.float().view(-1, 1, 1, 1, 1) / 1000)


def low_res_latents(num_frames: int) -> torch.Tensor:
    return torch.randn(1, 2, num_frames, 2, 2, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("num_frames", "expected_chunks"), [(24, 1), (40, 2), (56, 3), (50, 3)])
def test_split_and_merge_round_trip(num_frames, expected_chunks):
    latents = low_res_latents(num_frames)
    chunks = split_chunks(latents, CONFIG)
    assert len(chunks) == num_chunks(num_frames, CONFIG) == expected_chunks
    assert all(chunk.shape[2] == 24 for chunk in chunks)
    torch.testing.assert_close(merge_chunks(chunks, num_frames, CONFIG), latents)


def test_overlap_frames_share_noise():
    setup = make_setup()
    first, second = shared_noise_chunk(0, setup, CONFIG, seed=1), shared_noise_chunk(1, setup, CONFIG, seed=1)
    assert torch.equal(first[:, :, 16:], second[:, :, :8])
    assert not torch.equal(first[:, :, :8], second[:, :, 8:16])
    chunks = split_chunks(low_res_latents(40), CONFIG)
    noised = [noised_chunk(chunk, i, setup, CONFIG, seed=1) for i, chunk in enumerate(chunks)]
    assert torch.equal(noised[0][:, :, 16:], noised[1][:, :, :8])


def test_blend_overlap_takes_f_thr_frames_from_the_left_chunk():
    left, right = torch.ones(1, 1, 8, 1, 1), torch.zeros(1, 1, 8, 1, 1)
    for f_thr in range(9):
        assert blend_overlap(left, right, f_thr).flatten().tolist() == [1.0] * f_thr + [0.0] * (8 - f_thr)


def test_f_thr_is_drawn_per_step_and_overlaps_are_blended():
    setup = make_setup(num_steps=12)
    seen: list[tuple[dict, dict]] = []

    def recording_exchange(tails, heads):
        seen.append((dict(tails), dict(heads)))
        return local_exchange(tails, heads)

    chunks = {
        i: noised_chunk(c, i, setup, CONFIG, 2)
        for i, c in enumerate(split_chunks(low_res_latents(56), CONFIG))
    }
    draws = []
    for step in range(12):
        chunks, f_thr = refine_step(
            rolling_denoiser,
            chunks,
            step,
            total_chunks=3,
            setup=setup,
            config=CONFIG,
            seed=2,
            exchange=recording_exchange,
        )
        draws.append(f_thr)
        tails, heads = seen[-1]
        for i in (1, 2):
            # before blending the chunks disagree; after, both hold the blend
            assert not torch.allclose(tails[i - 1], heads[i])
            torch.testing.assert_close(chunks[i][:, :, :f_thr], tails[i - 1][:, :, :f_thr])
            torch.testing.assert_close(chunks[i][:, :, f_thr:8], heads[i][:, :, f_thr:])
            assert torch.equal(chunks[i - 1][:, :, 16:], chunks[i][:, :, :8])
    assert all(0 <= f <= 8 for f in draws) and len(set(draws)) >= 4
    replay = []
    randomized_blending(
        rolling_denoiser,
        low_res_latents(56),
        setup=setup,
        config=CONFIG,
        seed=2,
        callback=lambda step, f_thr, chunks: replay.append(f_thr),
    )
    assert replay == draws
    other = []
    randomized_blending(
        rolling_denoiser,
        low_res_latents(56),
        setup=setup,
        config=CONFIG,
        seed=3,
        callback=lambda step, f_thr, chunks: other.append(f_thr),
    )
    assert other != draws


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_two_simulated_ranks_equal_one_process(eta):
    """Rank 0 owns chunks {0, 1}, rank 1 owns {2}; threads exchange overlaps through a barrier."""
    setup, num_frames, seed = make_setup(num_steps=6, eta=eta), 50, 4
    latents = low_res_latents(num_frames)
    reference = randomized_blending(rolling_denoiser, latents, setup=setup, config=CONFIG, seed=seed)

    pieces = split_chunks(latents, CONFIG)
    mailbox: dict[int, tuple[dict, dict]] = {}
    barrier = threading.Barrier(2)
    results: dict[int, dict] = {}

    def run_rank(rank: int, owned: list[int]):
        def exchange(tails, heads):
            mailbox[rank] = (dict(tails), dict(heads))
            barrier.wait()
            all_tails = {**mailbox[0][0], **mailbox[1][0]}
            all_heads = {**mailbox[0][1], **mailbox[1][1]}
            barrier.wait()
            return all_tails, all_heads

        chunks = {i: noised_chunk(pieces[i], i, setup, CONFIG, seed) for i in owned}
        for step in range(setup.num_steps):
            chunks, _ = refine_step(
                rolling_denoiser,
                chunks,
                step,
                total_chunks=3,
                setup=setup,
                config=CONFIG,
                seed=seed,
                exchange=exchange,
            )
        results[rank] = chunks

    threads = [
        threading.Thread(target=run_rank, args=(0, [0, 1])),
        threading.Thread(target=run_rank, args=(1, [2])),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    merged = merge_chunks([{**results[0], **results[1]}[i] for i in range(3)], num_frames, CONFIG)
    assert torch.equal(merged, reference)
    assert reference.shape == (1, 2, 50, 2, 2)


def test_config_rejects_overlapping_head_and_tail():
    with pytest.raises(ValueError):
        BlendingConfig(chunk_frames=16, overlap_frames=8)
