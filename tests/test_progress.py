"""Console progress (`common.progress`): plain lines without a TTY, silence when off, and the
`--quiet` flags of `lvd train` and `lvd sample`."""

from __future__ import annotations

import io
import re

import pytest

from common.progress import Progress, format_duration


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_lines_every_n_items_with_rate_and_eta_then_a_last_line_at_close() -> None:
    out = io.StringIO()
    progress = Progress("lvd train", "step", total=7, start=0, mode="auto", every=3, stream=out)
    for i in range(7):
        progress.update(loss=0.5 / (i + 1))
    progress.close()
    lines = out.getvalue().splitlines()
    assert [re.match(r"lvd train: step (\d+)/7 ", line).group(1) for line in lines] == ["3", "6", "7"]
    assert lines[0].startswith("lvd train: step 3/7 loss=0.1667 | ") and "ETA " in lines[0]
    assert re.search(r"\| [\d.e+]+ (step/s|s/step) \| ETA \S+$", lines[1]), lines[1]


def test_resumed_progress_counts_from_its_start_and_interval_lines_have_no_total() -> None:
    out = io.StringIO()
    progress = Progress("lvd train", "step", total=10, start=6, mode="lines", every=2, stream=out)
    for _ in range(4):
        progress.update()
    assert [line.split(" |")[0] for line in out.getvalue().splitlines()] == ["lvd train: step 8/10", "lvd train: step 10/10"]
    out = io.StringIO()
    calls = Progress("lvd sample", "denoising calls", mode="lines", interval=3600.0, stream=out)
    for _ in range(5):
        calls.update()
    assert out.getvalue() == ""  # not yet due
    calls.close()
    assert out.getvalue().startswith("lvd sample: denoising calls 5 | ")


def test_off_prints_nothing_and_a_tty_gets_a_bar_not_lines() -> None:
    out = io.StringIO()
    progress = Progress("lvd train", "step", total=4, mode="quiet", every=1, stream=out)
    for _ in range(4):
        progress.update(loss=1.0)
    progress.close()
    assert out.getvalue() == "" and progress.count == 4
    tty = FakeTTY()
    bar = Progress("lvd train", "step", total=4, mode="auto", every=1, stream=tty)
    assert bar.mode == "bar"
    bar.update(loss=1.0)
    bar.close()
    assert "lvd train" in tty.getvalue() and "lvd train: step" not in tty.getvalue()
    with pytest.raises(ValueError, match="'loud'"):
        Progress("x", "y", mode="loud")


def test_durations_read_as_people_write_them() -> None:
    assert [format_duration(s) for s in (4.2, 65, 3725, float("inf"))] == ["4s", "1m05s", "1h02m05s", "?"]


def test_quiet_flags_turn_progress_off(capsys: pytest.CaptureFixture[str]) -> None:
    from lvd.cli import main
    from sampler.cli import build_parser, config_from_args

    assert main(["train", "--quiet", "--print-config"]) == 0
    assert "progress: quiet}" in capsys.readouterr().out
    assert main(["train", "--print-config"]) == 0
    assert "progress: auto}" in capsys.readouterr().out
    args = build_parser().parse_args(["--model", "m", "--prompt", "p", "--out", "v.mp4", "--quiet"])
    assert config_from_args(args).progress is False
