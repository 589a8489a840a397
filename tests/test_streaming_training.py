"""StreamingT2V's CAM/APM training over a frozen base, through `lvd train` (one process, DeepSpeed)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from test_trainer_tasks import _config, _random_base

import trainer.loop as loop
from trainer.loop import train

CAM_APM_PARTS = (
    "cam.frame_encoder.",  # E_cond
    "cam.fuse.",  # zero-initialised conv after the copy's first temporal block
    "cam.encoder.input_conv.",  # the copy of the U-Net's encoder ...
    "cam.encoder.encoder.",
    "cam.encoder.middle.",  # ... up to and including the middle block
    "cam.inject.",  # GN, P_in, T-MHA (P_Q, P_K, P_V) and P_out of every long skip
    "apm.expand.",
    "apm.project.",  # (L + k) tokens -> L
    "apm.norm.",
)
"""Every component the paper trains; together with the α_l of the base's cross-attentions, all of them."""


def test_streaming_training_moves_only_cam_apm_and_alpha_and_never_the_base(
    tmp_path, video_shards, monkeypatch
):
    base_dir = _random_base(tmp_path / "base")
    cfg = _config(
        "streaming.yaml",
        tmp_path / "run",
        video_shards,
        "train.steps=3",
        "train.checkpoint_every=0",
        f"model.base={base_dir}",
    )
    seen = {}
    original_step = loop.train_step

    def spy(session, micro_batches):
        if not seen:
            network = session.engines["model"].module
            seen["network"] = network
            seen["before"] = {n: p.detach().clone() for n, p in network.named_parameters()}
            optimizer = session.engines["model"].optimizer
            seen["optimized"] = {id(p) for group in optimizer.param_groups for p in group["params"]}
        return original_step(session, micro_batches)

    monkeypatch.setattr(loop, "train_step", spy)
    assert train(cfg) == 0

    network, before = seen["network"], seen["before"]
    params = dict(network.named_parameters())
    cam_apm_alpha = {n for n in params if n.startswith(("cam.", "apm.")) or n.endswith(".alpha")}
    assert all(any(n.startswith(part) for n in params) for part in CAM_APM_PARTS)
    assert all(n.startswith(CAM_APM_PARTS) for n in cam_apm_alpha if not n.endswith(".alpha"))
    assert {n for n, p in params.items() if id(p) in seen["optimized"]} == cam_apm_alpha
    base = {n for n in params if n.startswith("base.") and not n.endswith(".alpha")}
    assert base and base | cam_apm_alpha == set(params)
    # The trained text-to-video U-Net given as model.base, as saved on disk.
    saved = load_file(str(base_dir / "model.safetensors"))
    assert {n.removeprefix("base.") for n in base} == set(saved)
    moved = sorted(n for n in base if not torch.equal(params[n].detach(), saved[n.removeprefix("base.")]))
    assert not moved, f"frozen base tensors moved: {moved[:5]}"
    stayed = sorted(n for n in cam_apm_alpha if torch.equal(params[n].detach(), before[n]))
    assert not stayed, f"CAM/APM tensors that did not train in 3 steps: {stayed[:5]}"
