"""Lines CSV round trip and AR/ER/RPR on a hand-made lines file."""

import math

import pytest

from lit_restore.lines import LinesError, line_stats, read_lines, save_lines, write_lines

LINES_CSV = """task,acceptance_psnr,excellence_psnr,acceptance_ssim,excellence_ssim
t1,28,30,0.80,0.85
t2,25,26,0.70,0.75
t3,30,30.05,0.90,0.95
t3b,31,31,0.90,0.95
t4,20,22,0.60,0.605
t5,27,29,,
t6,26,,,
"""

# t3 and t3b sit next to each other with lines closer than 0.1 dB: both must go.
SCORES = {"t1": 29.0, "t2": 24.0, "t3": 31.0, "t3b": 20.0, "t4": 23.0, "t5": 27.0, "t6": 30.0, "t7": 40.0}


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@pytest.fixture
def lines(tmp_path):
    path = tmp_path / "lines.csv"
    path.write_text(LINES_CSV)
    return read_lines(path)


def test_read_lines_keeps_empty_cells_missing(lines):
    assert lines["t1"] == {"acceptance_psnr": 28.0, "excellence_psnr": 30.0,
                           "acceptance_ssim": 0.80, "excellence_ssim": 0.85}
    assert lines["t5"] == {"acceptance_psnr": 27.0, "excellence_psnr": 29.0}
    assert lines["t6"] == {"acceptance_psnr": 26.0}


def test_psnr_stats_by_hand(lines):
    s = line_stats(SCORES, lines, "psnr")
    # Counted: t1 (m-A=1, E-A=2), t2 (-1, 1), t4 (3, 2), t5 (0, 2). Dropped: t3, t3b. No lines: t6, t7.
    assert (s.n_cases, s.n_dropped, s.n_without_lines) == (4, 2, 2)
    assert s.ar == 3 / 4  # t1, t4, t5 (equal to A counts as accepted)
    assert s.er == 1 / 4  # t4
    r1, r2, r4, r5 = sig(0.5), sig(-1.0), sig(1.5), 0.5
    assert s.rpr_mean == pytest.approx((r1 + r2 + r4 + r5) / 4)
    # Sorted r2 < r5 < r1 < r4; linear quartiles of 4 values sit at positions 0.75 and 2.25.
    q1 = r2 + 0.75 * (r5 - r2)
    q3 = r1 + 0.25 * (r4 - r1)
    assert s.rpr_iqr == pytest.approx(q3 - q1)
    assert s.rpr_accepted == pytest.approx((r1 + r4 + r5) / 3)
    assert s.rpr_rejected == pytest.approx(r2)
    assert set(s.per_task) == {"t1", "t2", "t4", "t5"}
    assert s.per_task["t4"] == {"rpr": pytest.approx(r4), "accepted": True, "excellent": True}
    assert s.per_task["t2"]["accepted"] is False


def test_ssim_stats_use_their_own_gap(lines):
    ssim_scores = {"t1": 0.86, "t2": 0.70, "t4": 0.7}
    s = line_stats(ssim_scores, lines, "ssim")
    # t4's lines are 0.005 apart (< 0.01): dropped.
    assert (s.n_cases, s.n_dropped) == (2, 1)
    assert s.ar == 1.0 and s.er == 0.5
    assert s.rpr_rejected is None
    assert s.rpr_accepted == pytest.approx((sig(0.06 / 0.05) + 0.5) / 2)


def test_no_countable_task_gives_none(lines):
    assert line_stats({"t3": 31.0, "t7": 1.0}, lines, "psnr") is None


def test_save_lines_merges_two_roles(tmp_path):
    path = tmp_path / "lines.csv"
    save_lines(path, "acceptance", {"a": {"psnr": 25.5, "ssim": 0.7}, "b": {"psnr": 30.25, "ssim": float("nan")}})
    save_lines(path, "excellence", {"a": {"psnr": 27.0, "ssim": 0.75}, "c": {"psnr": 33.0}})
    got = read_lines(path)
    assert got == {
        "a": {"acceptance_psnr": 25.5, "excellence_psnr": 27.0, "acceptance_ssim": 0.7, "excellence_ssim": 0.75},
        "b": {"acceptance_psnr": 30.25},
        "c": {"excellence_psnr": 33.0},
    }
    assert path.read_text().splitlines()[0] == "task,acceptance_psnr,excellence_psnr,acceptance_ssim,excellence_ssim"
    # Saving the same role again replaces that column only.
    save_lines(path, "acceptance", {"a": {"psnr": 26.0}})
    assert read_lines(path)["a"]["acceptance_psnr"] == 26.0 and read_lines(path)["a"]["excellence_psnr"] == 27.0
    with pytest.raises(ValueError, match="acceptance, excellence"):
        save_lines(path, "baseline", {})


def test_write_lines_round_trips_floats_exactly(tmp_path):
    lines = {"x": {"acceptance_psnr": 0.1 + 0.2, "excellence_psnr": 1 / 3}}
    write_lines(tmp_path / "l.csv", lines)
    assert read_lines(tmp_path / "l.csv") == lines


@pytest.mark.parametrize(
    "text, message",
    [
        ("name,acceptance_psnr\nx,1\n", "no 'task' column"),
        ("task,acceptance_psnr,baseline\nx,1,2\n", "unknown column"),
        ("task,acceptance_psnr\nx,1\nx,2\n", "listed twice"),
        ("task,acceptance_psnr\nx,abc\n", "not a number"),
    ],
)
def test_bad_csv_gives_one_line_error(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(LinesError, match=message) as e:
        read_lines(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
