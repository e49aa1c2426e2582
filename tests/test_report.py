"""The report files exist and hold the tables, numbers and images."""

import json
import re

import torch
from PIL import Image

from lit_restore.lines import line_stats
from lit_restore.report import (BIQAResult, Conventions, EvalResult, TaskResult, before_after_grid,
                                write_report)


def make_result(with_extras: bool = True) -> EvalResult:
    tasks = [
        TaskResult("noise_15", 3, 31.234, 0.8812, 24.5, 0.61, lpips=0.1234, types=["noise"]),
        TaskResult("blur|jpeg", 3, 27.5, 0.7701, 26.0, 0.70, types=["blur", "jpeg"]),
        TaskResult("rain_real", 2, float("inf"), 1.0, 20.0, 0.5, kind="real", types=["rain"]),
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
        result.grids = {t.task: before_after_grid(gt * 0.5, gt * 0.9, gt) for t in tasks[:2]}
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
    assert "| task | kind | images | PSNR | SSIM | LPIPS |" in md
    assert "| noise_15 | synthetic | 3 | 31.23 | 0.8812 | 0.1234 | 24.50 | 0.6100 | 30.00 | 32.00 | yes | no |" in md
    assert "| blur\\|jpeg |" in md  # pipes in names are escaped
    assert "| PSNR | 2 | 0 | 0.500 | 0.000 |" in md
    assert "| noise | 4 | 1.000 |" in md and "| all | 14 | 0.786 |" in md
    assert "65.481" in md and "4 pixel(s)" in md  # conventions paragraph
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert "plots/psnr_lines.png" in links and "plots/confusion.png" in links and "grids/blur_jpeg.png" in links
    for link in links:
        assert Image.open(tmp_path / link).size[0] > 0

    page = (tmp_path / "report.html").read_text()
    assert page.count("<table>") == 3 and "<td>noise_15</td>" in page and "blur|jpeg" in page
    assert page.count("src='data:image/png;base64,") == len(links)  # self-contained
    grid = Image.open(tmp_path / "grids/noise_15.png")
    assert grid.size == (3 * 16 + 4 * 2, 2 * 16 + 3 * 2)  # 3 columns, 2 images, 2-pixel padding


def test_report_without_lines_biqa_or_grids(tmp_path):
    paths = write_report(tmp_path, make_result(with_extras=False))
    assert "confusion_plot" not in paths and not (tmp_path / "plots/confusion.png").exists()
    md = (tmp_path / "report.md").read_text()
    assert "AR/ER/RPR not computed" in md and "| accepted | excellent |" in md
    assert "| noise_15 | synthetic | 3 | 31.23 | 0.8812 | 0.1234 | 24.50 | 0.6100 | – | – | – | – |" in md
    assert json.loads((tmp_path / "metrics.json").read_text())["biqa"] is None
