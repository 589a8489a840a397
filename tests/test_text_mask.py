"""A T5 text encoder's padding is not attended: the token mask goes from the encoder through the
task (and the sampler's guidance branches) into every denoiser's cross-attention, so what the
padded positions hold changes neither the training loss nor the denoiser's output."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hf_checkpoints import write_t5

import model_zoo
from common.config import load_config
from trainer.config import TrainJobConfig
from trainer.tasks import build_task
from trainer.tasks.interface import Batch

REPO = Path(__file__).resolve().parent.parent
CAPTIONS = ["a red car on the mat", "a dog", ""]


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_t5(tmp_path_factory.mktemp("t5"))


def _randomise(module: torch.nn.Module) -> None:
    """Every tensor random (zero-initialised output layers too), so the text path reaches the output."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def _loss(task, batch: Batch, perturb: torch.Tensor | None) -> torch.Tensor:
    """The task's loss on `batch` (a fixed draw), with `perturb` (B, L) added to the text encoder's
    hidden states where it is nonzero."""
    encoder = task.encoders.text_encoder
    hook = None
    if perturb is not None:
        hook = encoder.register_forward_hook(lambda module, args, out: out + perturb[..., None] * torch.ones_like(out))
    try:
        out = task.losses(task.trained, batch, torch.Generator().manual_seed(0), 0)
    finally:
        if hook is not None:
            hook.remove()
    return out.losses[0][1].detach()


@pytest.mark.parametrize("config", ["unet3d.yaml", "dit.yaml"])
def test_padded_t5_positions_do_not_change_the_training_loss(config: str, t5_folder: Path, tmp_path: Path) -> None:
    cfg = load_config(
        TrainJobConfig,
        REPO / "configs" / "tiny" / config,
        ["data.shards=unused.tar", f"run.dir={tmp_path}", f"model.text_encoder={t5_folder}"],
    )
    task = build_task(cfg, torch.device("cpu"))
    _randomise(task.trained["model"])
    tokens = task.tokenizer()(CAPTIONS)
    padded = tokens == 0  # the T5 tokenizer's <pad>
    padded[2, 0] = False  # the empty prompt keeps its first token
    assert padded.any(dim=1).all() and (~padded).any(dim=1).all()
    video = torch.rand(len(CAPTIONS), 3, 4, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    batch = Batch(captions=CAPTIONS, tokens=tokens, video=video)
    clean = _loss(task, batch, None)
    in_padding = _loss(task, batch, padded.float() * 5.0)
    in_real_tokens = _loss(task, batch, (~padded).float() * 5.0)
    assert torch.isfinite(clean)
    torch.testing.assert_close(in_padding, clean, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(in_real_tokens, clean, rtol=1e-4)


def _family_inputs(family: str) -> tuple[torch.nn.Module, torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = model_zoo.build_model(family, "tiny").eval()
    _randomise(model)
    x = model.example_input(2)
    return model, x, model.example_inputs(x)


@pytest.mark.parametrize("family", ["unet3d", "dit", "video_dit", "videofusion", "streaming_t2v"])
def test_masked_context_positions_do_not_reach_the_denoiser_output(family: str) -> None:
    model, x, inputs = _family_inputs(family)
    context = inputs["context"]
    mask = torch.ones(context.shape[:2], dtype=torch.bool)
    mask[1, context.shape[1] // 2 :] = False
    inputs["context_mask"] = mask
    garbage = inputs | {"context": torch.where(mask[..., None], context, torch.randn_like(context) * 3)}
    with torch.no_grad():
        clean, perturbed = model(x, **inputs), model(x, **garbage)
        unmasked = model(x, **(garbage | {"context_mask": None}))
    torch.testing.assert_close(perturbed, clean, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unmasked[1], clean[1], atol=1e-4)


def test_the_sampler_binds_each_guidance_branch_with_its_own_prompt_mask(t5_folder: Path) -> None:
    from model_zoo.importers.folders import load
    from sampler.denoisers import with_text_guidance

    encoder, _ = load(t5_folder, "text_encoder")

    class Pipeline:  # the one method the guidance reads, of a pipeline holding this encoder
        networks = {"text_encoder": encoder}

        from sampler.pipeline import Pipeline as _real

        text_context = _real.text_context
        text_inputs = _real.text_inputs
        text_cache: dict = {}

    seen = []

    def branch(text):
        seen.append(text)
        return lambda x, t: x

    with_text_guidance(branch, Pipeline(), "a dog", 7.5)
    cond, uncond = seen
    assert cond["context_mask"].tolist()[0][:3] == [True, True, False]
    assert uncond["context_mask"].tolist()[0][:2] == [True, False]
    assert cond["context"].shape == (1, 77, 32)


def test_a_latent_caches_token_mask_is_the_denoisers_context_mask() -> None:
    """On cached text embeddings the mask stored beside them is what the cross-attention gets (the
    text encoder is not asked: the cache may hold no tokens)."""
    from trainer.tasks.encoders import LatentEncoders

    class NoTokens(torch.nn.Module):
        def token_mask(self, tokens: torch.Tensor) -> torch.Tensor:
            raise AssertionError("the text encoder was asked for a mask the cache holds")

    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    batch = Batch(captions=["a b", "a"], latents=torch.zeros(2, 4, 2, 4, 4), text_emb=torch.randn(2, 3, 8), text_mask=mask)
    given = LatentEncoders(text_encoder=NoTokens(), vae=None).mask_input(batch, torch.device("cpu"))
    assert torch.equal(given["context_mask"], mask.bool())
    assert torch.equal(batch.head(1).text_mask, mask[:1])
