"""StreamingT2V randomised blending: chunking, shared overlap noise, per-step f_thr, rank split."""

from __future__ import annotations

import threading

import pytest
import torch

from model_zoo.diffusion.schedules import alphas_cumprod, ddim_timesteps, make_betas
from sampler.strategies.blending import (
    BlendingConfig,
    blend_overlap,
    boundary_chunks,
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


class Mailbox:
    """Ranks simulated by threads, one block of chunks each: `exchange(rank)` posts the rank's
    boundary overlaps, and its `finish()` waits for every rank's and hands over the neighbours'.
    `posted[step]` keeps every rank's pre-blend overlaps of each step."""

    def __init__(self, owned: dict[int, list[int]], total_chunks: int) -> None:
        self.owned, self.total = owned, total_chunks
        self.barrier = threading.Barrier(len(owned))
        self.current: dict[int, tuple[dict, dict]] = {}
        self.posted: list[tuple[dict, dict]] = []

    def exchange(self, rank: int):
        mine = set(self.owned[rank])

        def start(tails, heads):
            self.current[rank] = (dict(tails), dict(heads))

            def finish():
                self.barrier.wait()
                all_tails = {i: x for tails, _ in self.current.values() for i, x in tails.items()}
                all_heads = {i: x for _, heads in self.current.values() for i, x in heads.items()}
                if rank == 0:
                    self.posted.append((all_tails, all_heads))
                self.barrier.wait()
                far_tails = {i - 1: all_tails[i - 1] for i in mine if i > 0 and i - 1 not in mine}
                far_heads = {
                    i + 1: all_heads[i + 1] for i in mine if i + 1 < self.total and i + 1 not in mine
                }
                return far_tails, far_heads

            return finish

        return start


def run_ranks(owned: dict[int, list[int]], latents, setup, seed: int, total: int):
    """Each rank's chunks after every step ({rank: [chunks after step 0, ...]}), and the mailbox."""
    mailbox = Mailbox(owned, total)
    pieces = split_chunks(latents, CONFIG)
    history: dict[int, list[dict]] = {rank: [] for rank in owned}
    draws: list[int] = []

    def run_rank(rank: int) -> None:
        chunks = {i: noised_chunk(pieces[i], i, setup, CONFIG, seed) for i in owned[rank]}
        for step in range(setup.num_steps):
            chunks, f_thr = refine_step(
                rolling_denoiser,
                chunks,
                step,
                total_chunks=total,
                setup=setup,
                config=CONFIG,
                seed=seed,
                exchange=mailbox.exchange(rank),
            )
            history[rank].append(chunks)
            if rank == 0:
                draws.append(f_thr)

    threads = [threading.Thread(target=run_rank, args=(rank,)) for rank in owned]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return history, mailbox, draws


def test_f_thr_is_drawn_per_step_and_overlaps_are_blended():
    setup = make_setup(num_steps=12)
    # One chunk per simulated rank: every chunk is a boundary chunk, so every overlap is posted.
    history, mailbox, draws = run_ranks({0: [0], 1: [1], 2: [2]}, low_res_latents(56), setup, 2, 3)
    assert len(mailbox.posted) == 12
    for step, f_thr in enumerate(draws):
        tails, heads = mailbox.posted[step]
        chunks = {i: history[i][step][i] for i in range(3)}
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


def test_boundary_chunks_are_the_ones_with_a_neighbour_elsewhere():
    assert boundary_chunks([0, 1, 2, 3], 8) == [3]
    assert boundary_chunks([4, 5, 6, 7], 8) == [4]
    assert boundary_chunks([2, 3, 4], 8) == [2, 4]
    assert boundary_chunks([5], 8) == [5]
    assert boundary_chunks(list(range(8)), 8) == []
    with pytest.raises(ValueError, match="neighbour elsewhere"):
        local_exchange({3: torch.zeros(1)}, {})


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_two_simulated_ranks_equal_one_process(eta):
    """Rank 0 owns chunks {0, 1}, rank 1 owns {2}; threads exchange boundary overlaps."""
    setup, num_frames, seed = make_setup(num_steps=6, eta=eta), 50, 4
    latents = low_res_latents(num_frames)
    reference = randomized_blending(rolling_denoiser, latents, setup=setup, config=CONFIG, seed=seed)
    history, mailbox, _ = run_ranks({0: [0, 1], 1: [2]}, latents, setup, seed, 3)
    # only the boundary chunks' overlaps travel: chunk 1 (rank 0) and chunk 2 (rank 1)
    assert all(set(tails) == {1, 2} and set(heads) == {1, 2} for tails, heads in mailbox.posted)
    final = {**history[0][-1], **history[1][-1]}
    merged = merge_chunks([final[i] for i in range(3)], num_frames, CONFIG)
    assert torch.equal(merged, reference)
    assert reference.shape == (1, 2, 50, 2, 2)


def test_config_rejects_overlapping_head_and_tail():
    with pytest.raises(ValueError):
        BlendingConfig(blend_frames=16, blend_overlap=8)


def test_no_blend_refines_each_chunk_alone_on_its_own_noise():
    """--no-blend (the paper's naive concatenation): every chunk is SDEdit-refined as if it were
    alone, with its own noise, and the video concatenates the chunks past their overlaps."""
    setup, seed, num_frames = make_setup(num_steps=6), 5, 56
    config = BlendingConfig(blend=False)
    latents = low_res_latents(num_frames)
    first, second = shared_noise_chunk(0, setup, config, seed), shared_noise_chunk(1, setup, config, seed)
    assert not torch.equal(first[:, :, 16:], second[:, :, :8])
    video = randomized_blending(rolling_denoiser, latents, setup=setup, config=config, seed=seed)
    pieces = split_chunks(latents, config)
    alone = []
    for index, piece in enumerate(pieces):
        chunk = noised_chunk(piece, index, setup, config, seed)
        for step in range(setup.num_steps):  # η = 0: the step noise's generator does not matter
            chunk = refine_step(
                rolling_denoiser, {0: chunk}, step, total_chunks=1, setup=setup, config=config, seed=seed
            )[0][0]
        alone.append(chunk)
    torch.testing.assert_close(video, merge_chunks(alone, num_frames, config))
    assert not torch.allclose(alone[0][:, :, 16:], alone[1][:, :, :8])  # the seams are not blended
    blended = randomized_blending(rolling_denoiser, latents, setup=setup, config=CONFIG, seed=seed)
    assert not torch.allclose(video, blended)
