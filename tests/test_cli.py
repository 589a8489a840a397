"""The `lvd` entry point, run as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_lvd

from lvd.cli import SUBCOMMANDS

REPO = Path(__file__).resolve().parent.parent
CONFIG_FILES = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml"))


OWN_OPTIONS = {
    "shard": ("{videos,images,latents}",),
    "train": ("--config", "--nproc", "--print-config", "section.key=value"),
    "export": ("--run", "--out", "--ema", "--step"),
    "sample": ("--model", "--strategy", "lvdm-hierarchical", "vidrd", "--frames", "--nproc"),
    "eval": ("--video", "--reference", "--metrics"),
    "submit": ("{train,shard,sample}", "--nodes", "--dry-run"),
    "plan": ("--config", "--nodes", "--gpu", "--json"),
    "demo": ("--out", "--quick", "--quiet"),
    "data": ("{stats,preview}", "--buckets", "--json", "--out", "--clips", "--seed"),
}
"""Options each subcommand's help must list: its own parser answers, not a generic one."""


def test_top_level_help_lists_every_subcommand_with_its_summary():
    result = run_lvd("--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: lvd ")
    for name, (summary, _) in SUBCOMMANDS.items():
        assert f"  {name:<8} {summary}" in result.stdout, name
    bare = run_lvd()
    assert bare.returncode == 2 and bare.stdout == result.stdout  # no subcommand: the help, as a usage error


def test_every_subcommand_is_listed_with_its_options():
    assert set(OWN_OPTIONS) == set(SUBCOMMANDS)


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_every_subcommand_help_shows_its_own_options(name, capsys):
    from lvd.cli import main

    try:
        code = main([name, "--help"])
    except SystemExit as exit_:  # argparse's --help exits; some subcommands return its code instead
        code = exit_.code
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: lvd {name} "), out[:200]
    missing = [option for option in OWN_OPTIONS[name] if option not in out]
    assert not missing, f"lvd {name} --help lacks {missing}"


@pytest.mark.parametrize("name", ["train", "export", "plan", "submit"])
def test_help_of_cluster_side_commands_does_not_import_torch(name):
    """On a login node `--help` must answer at once: torch (3 s) and deepspeed or open_clip (10 s
    more here) load only when the command runs."""
    import subprocess
    import sys

    probe = (
        "import sys\nfrom lvd.cli import main\n"
        f"try:\n    main([{name!r}, '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'deepspeed', 'open_clip') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: lvd {name} ") and OWN_OPTIONS[name][0] in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_unknown_subcommand_is_usage_error():
    result = run_lvd("frobnicate")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_every_subcommand_resolves_to_a_function(name):
    import importlib

    module, func = SUBCOMMANDS[name][1].split(":")
    assert callable(getattr(importlib.import_module(module), func))


@pytest.mark.parametrize("config", CONFIG_FILES)
def test_unknown_key_exits_2_naming_it(config, capsys, monkeypatch):
    from lvd.cli import main

    monkeypatch.chdir(REPO)  # in-process through the entry point's main: one process for all configs
    assert main(["train", "--config", config, "bogus.key=1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lvd train: config error: bogus.key: unknown key"), lines


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("train.steps=abc",), "train.steps: expected int, got 'abc'"),
        (("train.zero_stage=7",), "train.zero_stage: must be 0, 1, 2 or 3"),
    ],
)
def test_bad_value_exits_2_naming_it(args, needle):
    result = run_lvd("train", "--config", "configs/tiny/unet3d.yaml", *args)
    assert result.returncode == 2
    assert needle in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_config_file_exits_2():
    result = run_lvd("train", "--config", "configs/tiny/nope.yaml")
    assert result.returncode == 2
    assert "config file not found: configs/tiny/nope.yaml" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_key_in_file_names_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  frame: 3\n")
    result = run_lvd("train", "--config", str(bad))
    assert result.returncode == 2
    assert "data.frame: unknown key" in result.stderr and str(bad) in result.stderr


def test_print_config_shows_resolved_values():
    result = run_lvd("train", "--config", "configs/tiny/dit.yaml", "train.steps=7", "--print-config")
    assert result.returncode == 0, result.stderr
    assert "steps: 7" in result.stdout
    assert "family: dit" in result.stdout
    assert "zero_stage: 0" in result.stdout


def test_launcher_stops_the_other_ranks_and_names_the_dead_one(capfd):
    """`--nproc` ranks: one killed (SIGKILL) while the other would wait a minute; the launcher stops
    the survivor at once, exits 128 + 9 and says which rank died."""
    import time

    from common.launch import launch_local

    rank = "import os, signal, time\nif os.environ['RANK'] == '1':\n    time.sleep(0.5)\n    os.kill(os.getpid(), signal.SIGKILL)\ntime.sleep(60)"
    started = time.monotonic()
    assert launch_local(["-c", rank], nproc=2) == 128 + 9
    assert time.monotonic() - started < 30
    assert "lvd: rank 1 of 2 was killed by SIGKILL; stopping rank(s) 0" in capfd.readouterr().err


def test_deepspeeds_world_group_clone_takes_the_collective_timeout():
    """DeepSpeed reduces gradients and gathers ZeRO-3 parameters in its own clone of the world
    group; built with a plain new_group it would wait torch's 30 minutes for a hung rank, whatever
    LVD_COLLECTIVE_TIMEOUT says. After `init_distributed` both groups carry the set timeout."""
    probe = (
        "import torch, torch.distributed as dist, deepspeed\n"
        "from trainer.engine import init_distributed\n"
        "init_distributed()\n"
        "for pg in (dist.group.WORLD, deepspeed.utils.groups._clone_world_group()):\n"
        "    print(pg._get_backend(torch.device('cpu')).options._timeout.total_seconds())\n"
    )
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "LVD_COLLECTIVE_TIMEOUT": "7"}
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(key, None)
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["7.0", "7.0"], result.stdout


def test_collective_timeout_reads_seconds_or_keeps_the_default(monkeypatch):
    import datetime

    from common.launch import collective_timeout

    default = datetime.timedelta(hours=12)
    monkeypatch.delenv("LVD_COLLECTIVE_TIMEOUT", raising=False)
    assert collective_timeout(default) == default
    monkeypatch.setenv("LVD_COLLECTIVE_TIMEOUT", "90.5")
    assert collective_timeout(default) == datetime.timedelta(seconds=90.5)
    for bad in ("0", "-3", "ten", "nan", "inf", "1e400", "1e-7"):
        monkeypatch.setenv("LVD_COLLECTIVE_TIMEOUT", bad)
        with pytest.raises(ValueError, match=r"^LVD_COLLECTIVE_TIMEOUT: must be a positive number of seconds"):
            collective_timeout(default)
