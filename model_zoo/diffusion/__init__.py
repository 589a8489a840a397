"""Diffusion math as pure functions: `schedules` (β, ᾱ, DDIM timesteps), `objectives` (forward
process, ε/v/x0 targets, losses, LVDM mask conditioning and latent perturbation), `samplers`
(DDPM, DDIM and their single steps) and `guidance` (CFG and LVDM's unconditional guidance)."""
