"""Latent-space math of the long-video strategies (SPEC §4), as pure functions.

Every strategy is written against a generic denoiser (`denoise_fn(x (B, C, T, h, w), t) -> ε`,
conditioning bound beforehand) and calls `model_zoo.diffusion.samplers` for each denoising step.
Randomness comes from `seeding.unit_generator(seed, stream, index)`, a pure function of the unit
of work, so any split of units over ranks (and any resume point) draws the same numbers.
No file I/O and no torch.distributed here: the sampler program owns both.
"""
