"""Two real ranks on gloo over 3 uneven shards: equal batch counts, no hang, exact resume."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from data_pipeline.shard_cli import main
from data_pipeline.tario import iter_samples, tar_bytes

REPO = Path(__file__).resolve().parent.parent

RANK_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, os, sys
    import torch, torch.distributed as dist
    from data_pipeline.config import DataConfig
    from data_pipeline.loader import build_loader

    def main():
        shards, out = sys.argv[1], sys.argv[2]
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        cfg = DataConfig(shards=shards, frames=4, frame_stride=2, height=32, width=32, shuffle_buffer=3, random_crop=True, workers=0)
        loader = build_loader(cfg, rank=rank, world_size=world, batch_size=2, seed=11, tokenizer=None)

        def digest(batch):
            keys = ",".join(meta["__key__"] for meta in batch["meta"])
            return keys + ":" + hashlib.sha1(batch["video"].numpy().tobytes()).hexdigest()

        def step(batch, count):
            # A collective per batch: a rank that ran dry would hang here (the test has a timeout).
            total = torch.tensor([float(batch["video"].shape[0])])
            dist.all_reduce(total)
            return count + 1

        record = {"rank": rank}
        count = 0
        for _ in range(5):
            count = step(next(loader), count)
        torch.save(loader.state_dict(), f"{out}/state{rank}.pt")
        digests = []
        for _ in range(10):
            batch = next(loader)
            digests.append(digest(batch))
            count = step(batch, count)
        # A new loader restored from the saved file (what a restarted job does).
        resumed = build_loader(cfg, rank=rank, world_size=world, batch_size=2, seed=11, tokenizer=None)
        resumed.load_state_dict(torch.load(f"{out}/state{rank}.pt", weights_only=False))
        record.update(count=count, digests=digests, resumed=[digest(next(resumed)) for _ in range(10)])
        counts = [None] * world
        dist.all_gather_object(counts, record.get("count"))
        record["all_counts"] = counts
        with open(f"{out}/rank{rank}.json", "w") as handle:
            json.dump(record, handle)
        dist.destroy_process_group()

    if __name__ == "__main__":  # DataLoader workers (forkserver) import the script again
        main()
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(script: Path, shards: str, out: Path) -> None:
    port = _free_port()
    processes = []
    for rank in range(2):
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            WORLD_SIZE="2",
            OMP_NUM_THREADS="1",
        )
        env["PYTHONPATH"] = str(REPO)
        processes.append(
            subprocess.Popen(
                [sys.executable, str(script), shards, str(out)], env=env, stderr=subprocess.PIPE, text=True
            )
        )
    for process in processes:
        try:
            _, err = process.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            pytest.fail("a rank hung")
        assert process.returncode == 0, err[-3000:]


@pytest.fixture(scope="module")
def three_uneven_shards(media_dir, tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("ranks")
    (root / "in").mkdir()
    os.symlink(media_dir / "videos" / "carphone_pristine.mp4", root / "in" / "carphone.mp4")
    assert (
        main(
            [
                "videos",
                "--input",
                str(root / "in"),
                "--out",
                str(root / "all"),
                "--clip-frames",
                "8",
                "--size",
                "48",
            ]
        )
        == 0
    )
    samples = [
        (sample.key, sample.files)
        for path in sorted((root / "all").glob("shard-*.tar"))
        for sample in iter_samples(path)
    ]
    assert len(samples) == 15
    for number, (start, stop) in enumerate([(0, 9), (9, 11), (11, 15)]):  # 9, 2 and 4 samples
        (root / f"part-{number}.tar").write_bytes(tar_bytes(samples[start:stop]))
    return str(root / "part-{0..2}.tar")


@pytest.mark.multirank
def test_two_ranks_three_shards_equal_batches_and_exact_resume(three_uneven_shards, tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    _launch(script, three_uneven_shards, tmp_path)
    runs = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    # 15 batches of 2 per rank is two passes over 15 samples: far past the 9-sample shard of one rank.
    assert runs[0]["all_counts"] == [15, 15]
    for rank in range(2):
        assert runs[rank]["resumed"] == runs[rank]["digests"], f"rank {rank} resumed differently"
    assert runs[0]["digests"] != runs[1]["digests"]
