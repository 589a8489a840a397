"""The causal video VAE (`causal_vae`): an image is a one-frame video, chunked encode/decode
equal the full pass with flat memory, 4x8x8 compression into 16 channels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from model_zoo import build_model
from model_zoo.causal_vae import CausalConv3d


def _vae() -> nn.Module:
    torch.manual_seed(0)
    vae = build_model("causal_vae", "tiny")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return vae.eval()


def _video(frames: int, seed: int = 0) -> Tensor:
    return torch.randn(1, 3, frames, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_encoding_an_image_equals_encoding_the_first_frame_of_a_video_that_starts_with_it() -> None:
    vae = _vae()
    video = _video(9)
    with torch.no_grad():
        image = vae.encode(video[:, :, :1]).mean  # (1, 16, 1, 4, 4)
        clip = vae.encode(video).mean  # (1, 16, 3, 4, 4)
        other = vae.encode(torch.cat([video[:, :, :1], _video(8, seed=5)], dim=2)).mean
    assert image.shape == (1, 16, 1, 4, 4) and clip.shape == (1, 16, 3, 4, 4)
    torch.testing.assert_close(clip[:, :, :1], image, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(other[:, :, :1], image, atol=1e-6, rtol=1e-6)
    assert (other[:, :, 1:] - clip[:, :, 1:]).abs().amax() > 1e-3  # later latents do see later frames
    with torch.no_grad():
        decoded = vae.decode(image)
    assert decoded.shape == (1, 3, 1, 32, 32)


@pytest.mark.parametrize("chunk", [1, 2])
def test_chunked_encode_and_decode_equal_the_full_pass(chunk: int) -> None:
    vae = _vae()
    video = _video(13)
    with torch.no_grad():
        full = vae.encode(video).mean
        chunked = vae.encode(video, chunk=chunk).mean
        torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-5)
        decoded = vae.decode(full)
        torch.testing.assert_close(vae.decode(full, chunk=chunk), decoded, atol=1e-5, rtol=1e-5)
    assert decoded.shape == video.shape
    # The streaming state is gone afterwards: a full pass again gives the same result.
    with torch.no_grad():
        torch.testing.assert_close(vae.encode(video).mean, full, atol=0, rtol=0)


def test_chunked_memory_stays_flat_in_the_clip_length() -> None:
    vae = _vae()

    def largest_conv_input(run: callable) -> int:
        sizes: list[int] = []
        hooks = [
            m.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].numel()))
            for m in vae.modules()
            if isinstance(m, CausalConv3d)
        ]
        with torch.no_grad():
            run()
        for hook in hooks:
            hook.remove()
        return max(sizes)

    short, long = _video(9), _video(33)
    z_short, z_long = torch.randn(1, 16, 3, 4, 4), torch.randn(1, 16, 9, 4, 4)
    assert largest_conv_input(lambda: vae.encode(short, chunk=1)) == largest_conv_input(
        lambda: vae.encode(long, chunk=1)
    )
    assert largest_conv_input(lambda: vae.decode(z_short, chunk=1)) == largest_conv_input(
        lambda: vae.decode(z_long, chunk=1)
    )
    assert largest_conv_input(lambda: vae.encode(long)) > largest_conv_input(lambda: vae.encode(short))


def test_compression_factors_and_clear_errors() -> None:
    vae = build_model("causal_vae", "16ch", device="meta")
    assert vae.downsample_factors == (4, 8, 8) and vae.latent_channels == 16
    assert vae.latent_frames(81) == 21 and vae.latent_frames(1) == 1
    posterior = vae.encode(torch.empty(1, 3, 17, 64, 96, device="meta"))
    assert posterior.mean.shape == (1, 16, 5, 8, 12)
    assert vae.decode(posterior.mean).shape == (1, 3, 17, 64, 96)
    with pytest.raises(ValueError, match="1 \\+ 4k frames"):
        _vae().encode(_video(8))
    with pytest.raises(ValueError, match="temporal_down"):
        build_model("causal_vae", "tiny", temporal_down=(True,))


def test_the_samplers_chunk_decoder_keeps_each_chunks_own_frames_of_a_causal_vae() -> None:
    from sampler.video_io import ChunkDecoder, to_uint8_frames

    vae = _vae()
    z = torch.randn(1, 16, 5, 4, 4, generator=torch.Generator().manual_seed(3))
    decoder = ChunkDecoder(vae, vae.downsample_factors[0], max_frames=17, context=1)
    first, second = decoder.decode(z[:, :, :3]), decoder.decode(z[:, :, 3:])
    assert first.shape[0] == 9 and second.shape[0] == 8  # 1 + 4*(5 - 1) = 17 frames in all
    with torch.no_grad():
        expected = to_uint8_frames(vae.from_latents(z[:, :, 2:])[:, :, 1:])  # z3, z4 after context z2
    assert np.abs(second.astype(int) - expected.astype(int)).max() <= 1


def test_the_sampler_asks_a_causal_vae_for_one_plus_ceil_of_the_rest_latent_frames() -> None:
    from sampler.pipeline import latent_frames_for

    causal, plain = build_model("causal_vae", "tiny"), build_model("video_vae", "tiny")  # ft = 4, 2
    assert [latent_frames_for(causal, f) for f in (1, 5, 9, 16, 17)] == [1, 2, 3, 5, 5]
    assert [latent_frames_for(plain, f) for f in (1, 8, 9, 16)] == [1, 4, 5, 8]
