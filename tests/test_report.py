"""The report files exist and hold the tables, numbers and images."""

import json
import re

import torch
from PIL import Image

from lit_restore.lines import line_stats
from lit_restore.report import (BIQAResult, Conventions, EvalResult, TaskResult, contact_sheet, summary_rows,
                                write_report)


def make_result(with_extras: bool = True) -> EvalResult:
    tasks = [
        TaskResult("noise_15", 3, 31.234, 0.8812, 24.5, 0.61, lpips=0.1234, types=["noise"]),
        TaskResult("blur|jpeg", 3, 27.5, 0.7701, 26.0, 0.70, types=["blur", "jpeg"], level="ood"),
        TaskResult("rain_real", 2, float("inf"), 1.0, 20.0, 0.5, kind="real", types=["rain"], level="ood"),
    ]
    result = EvalResult(weights="weights/tiny", method="feed-forward restorer",
                        conventions=Conventions(crop_border=4, y_channel=True, lpips="not computed (no weights)"),
                        tasks=tasks)
    if with_extras:
        result.lines = {"noise_15": {"acceptance_psnr": 30.0, "excellence_psnr": 32.0},
                        "blur|jpeg": {"acceptance_psnr": 28.0, "excellence_psnr": 29.0}}
        result.line_stats = {"psnr": line_stats({t.task: t.psnr for t in tasks}, result.lines, "psnr")}
        result.biqa = BIQAResult(classes=["no", "noise", "blur"], confusion=[[5, 1, 0], [0, 4, 0], [0, 2, 2]])
        g = torch.Generator().manual_seed(0)
        gt = torch.rand(2, 3, 16, 16, generator=g)
        result.grids = {t.task: contact_sheet(["input", "output", "clean"],
                                              [[(gt[i] * 0.5, "20.00 dB"), (gt[i] * 0.9, "30.00 dB"), (gt[i], "clean")]
                                               for i in range(2)], min_side=16) for t in tasks[:2]}
    return result


def test_report_files_hold_tables_and_images(tmp_path):
    paths = write_report(tmp_path, make_result())
    for key in ("metrics", "markdown", "html", "psnr_plot", "confusion_plot"):
        assert paths[key].is_file(), key

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [t["task"] for t in metrics["tasks"]] == ["noise_15", "blur|jpeg", "rain_real"]
    assert metrics["tasks"][0]["psnr"] == 31.234 and metrics["tasks"][2]["psnr"] is None  # inf → null
    assert metrics["line_stats"]["psnr"]["ar"] == 0.5 and metrics["line_stats"]["psnr"]["er"] == 0.0
    assert metrics["conventions"]["y_channel"] is True
    assert metrics["biqa"]["confusion"][2] == [0, 2, 2]

    md = (tmp_path / "report.md").read_text()
    assert "| task | kind | level | images | input PSNR | PSNR | gain (dB) | SSIM |" in md
    assert "| noise_15 | synthetic | id | 3 | 24.50 | 31.23 | +6.73 | 0.8812 | 0.6100 | 0.1234 | 30.00 | 32.00 | yes | no |" in md
    assert "| blur\\|jpeg |" in md  # pipes in names are escaped
    assert "| PSNR | 2 | 0 | 0.500 | 0.000 |" in md
    assert "No lines given" not in md and "not computed" not in md.split("## Acceptance")[1].split("##")[0]
    assert "| noise | 4 | 1.000 |" in md and "| all | 14 | 0.786 |" in md
    assert "65.481" in md and "4 pixel(s)" in md  # conventions paragraph
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert "plots/psnr_lines.png" in links and "plots/confusion.png" in links and "grids/blur_jpeg.png" in links
    for link in links:
        assert Image.open(tmp_path / link).size[0] > 0

    page = (tmp_path / "report.html").read_text()
    assert page.count("<table>") == 4 and "<td>noise_15</td>" in page and "blur|jpeg" in page
    assert page.count("src='data:image/png;base64,") == len(links)  # self-contained
    grid = Image.open(tmp_path / "grids/noise_15.png")
    assert grid.size[0] == 3 * 16 + 4 * 4  # 3 columns of 16 px, 4-pixel padding


def test_report_without_lines_biqa_or_grids(tmp_path):
    paths = write_report(tmp_path, make_result(with_extras=False))
    assert "confusion_plot" not in paths and not (tmp_path / "plots/confusion.png").exists()
    md = (tmp_path / "report.md").read_text()
    assert "AR/ER/RPR not computed" in md and "| accepted | excellent |" in md
    assert "| noise_15 | synthetic | id | 3 | 24.50 | 31.23 | +6.73 | 0.8812 | 0.6100 | 0.1234 | – | – | – | – |" in md
    assert json.loads((tmp_path / "metrics.json").read_text())["biqa"] is None


def test_summary_gives_gain_per_type_and_per_level(tmp_path):
    tasks = [TaskResult("noise_a", 1, 30.0, 0.9, 25.0, 0.5, types=["noise"]),
             TaskResult("noise_b", 1, 20.0, 0.9, 22.0, 0.5, types=["noise"], level="ood"),
             TaskResult("haze_a", 1, 25.0, 0.9, 15.0, 0.5, types=["haze"])]
    groups = dict(summary_rows(tasks))
    assert [t.task for t in groups["type noise"]] == ["noise_a", "noise_b"]
    assert [t.task for t in groups["out-of-distribution"]] == ["noise_b"] and len(groups["all"]) == 3
    result = EvalResult(weights="w", method="m", conventions=Conventions(), tasks=tasks)
    md = (write_report(tmp_path, result)["markdown"]).read_text()
    # noise: gains +5 and -2 → mean +1.5, worst -2, one of two worse than its input
    assert "| type noise | 2 | 23.50 | 25.00 | +1.50 | -2.00 | 1 of 2 |" in md
    assert "| in-distribution | 2 | 20.00 | 27.50 | +7.50 | +5.00 | 0 of 2 |" in md


def test_inverted_lines_are_named_and_left_out_of_the_verdicts(tmp_path):
    tasks = [TaskResult("noise_a", 1, 30.0, 0.9, 25.0, 0.5, types=["noise"]),
             TaskResult("haze_a", 1, 10.0, 0.9, 15.0, 0.5, types=["haze"])]
    lines = {"noise_a": {"acceptance_psnr": 28.0, "excellence_psnr": 31.0},
             "haze_a": {"acceptance_psnr": 20.0, "excellence_psnr": 5.0}}  # a worse model drew the "excellence" line
    stats = line_stats({t.task: t.psnr for t in tasks}, lines, "psnr")
    assert stats.n_cases == 1 and stats.n_dropped == 1
    result = EvalResult(weights="w", method="m", conventions=Conventions(), tasks=tasks, lines=lines,
                        line_stats={"psnr": stats})
    md = write_report(tmp_path, result)["markdown"].read_text()
    assert "| lines inverted | lines inverted |" in md and "left out of AR/ER: haze_a" in md
    assert "No lines given" not in md  # they were given; one task's are inverted
    only_inverted = EvalResult(weights="w", method="m", conventions=Conventions(), tasks=tasks[1:],
                               lines={"haze_a": lines["haze_a"]})
    md = write_report(tmp_path / "inverted", only_inverted)["markdown"].read_text()
    assert "No lines given" not in md and "or inverted; AR/ER/RPR not computed" in md


def test_contact_sheet_holds_every_size_enlarged_with_captions():
    small, big = torch.zeros(3, 20, 30), torch.ones(3, 40, 24)
    sheet = contact_sheet(["input", "clean"], [[(small, "1 dB"), (small, "")], [(big, "2 dB"), (big, "")]], min_side=80)
    factor = 2  # the largest side (40) enlarged by whole pixels to at least 80
    cell_w, cell_h = 30 * factor, 40 * factor
    assert sheet.shape[0] == 3 and sheet.shape[2] == 2 * (cell_w + 4) + 4
    assert sheet.shape[1] > 2 * cell_h  # two rows of cells plus the header and captions
    # the white (1.0) big image fills an enlarged 48 x 80 block in the second row
    assert float(sheet[:, -60:-30, 4:4 + 48].min()) == 1.0


def test_large_images_give_a_bounded_sheet_of_one_to_one_centre_crops_and_a_small_html(tmp_path):
    g = torch.Generator().manual_seed(0)
    big = torch.randint(0, 256, (3, 2160, 3840), generator=g, dtype=torch.uint8)
    rows = [[(big, "20.00 dB"), (big, "30.00 dB"), (big, "clean")] for _ in range(4)]
    sheet = contact_sheet(["input", "--fast", "clean"], rows)
    assert max(sheet.shape[1:]) <= 1600
    pixels = (sheet * 255).round().to(torch.uint8)
    # The first cell holds the image's centre, pixel for pixel.
    line, pad = 16 + 8, 4
    top = 2 * line  # the crop note and the column names
    cell_w, cell_h = (1600 - pad) // 3 - pad, (1600 - 2 * line - pad) // 4 - line - pad
    y, x = (2160 - cell_h) // 2, (3840 - cell_w) // 2
    cell = pixels[:, top + pad: top + pad + cell_h, pad:pad + cell_w]
    assert torch.equal(cell, big[:, y:y + cell_h, x:x + cell_w])
    # Sheets beyond the embedding budget are linked, not embedded.
    tasks = [TaskResult(task=f"t{i}", n_images=4, psnr=30.0, ssim=0.9, input_psnr=20.0, input_ssim=0.5)
             for i in range(5)]
    result = EvalResult(weights="w", method="m", conventions=Conventions(), tasks=tasks,
                        grids={t.task: sheet for t in tasks})
    html = write_report(tmp_path, result)["html"]
    pngs = sum(p.stat().st_size for p in (tmp_path / "grids").glob("*.png"))
    assert pngs > 10 << 20 and html.stat().st_size < 12 << 20
    text = html.read_text()
    assert "src='grids/t4.png'" in text and "file grids/t4.png beside this report" in text
