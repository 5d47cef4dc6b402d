"""The HTML reports open in a real headless Chromium: every image renders, the page logs
no errors, a screenshot shows it. Debian's `chromium` is installed by `.ci/run`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from moesim.cli.main import app

runner = CliRunner()
TINY = {"model": {"preset": "deepseek-v3", "num_layers": 4}, "topology": "h800-cluster",
        "parallel": {"ep": 16, "tokens_per_gpu": 256}, "routing": {"max_devices": None}}


def invoke(*args: str) -> None:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, Path]:
    """A simulate, a sweep and a plan report of tiny scenarios."""
    root = tmp_path_factory.mktemp("reports")
    scenario = root / "tiny.yaml"
    scenario.write_text(yaml.safe_dump(TINY))
    invoke("simulate", str(scenario), "--out", str(root / "run"), "--report",
           "--what-if", "parallel.dispatch_kernel=nccl-alltoall")
    sweep = root / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"base": TINY, "axes": {"parallel.ep": [8, 16]},
                                     "seeds": 2}))
    invoke("sweep", str(sweep), "--out", str(root / "sweep"), "--workers", "1")
    invoke("report", str(root / "sweep"))
    plan = root / "plan.yaml"
    plan.write_text(yaml.safe_dump({"base": TINY, "search": {"parallel.ep": [8, 16],
                                                             "parallel.gpus": [16, 32]},
                                    "target": {"tokens_per_s": 1.0e5}}))
    invoke("plan", str(plan), "--out", str(root / "plan"), "--workers", "1")
    invoke("report", str(root / "plan"))
    return {kind: root / kind / "report.html" for kind in ("run", "sweep", "plan")}


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium")
    assert executable, "Debian's chromium is missing: .ci/run installs it (apt-get install " \
                       "chromium)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True,
                                    args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.mark.parametrize("kind", ["run", "sweep", "plan"])
def test_the_report_renders_in_chromium(kind, reports, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("requestfailed", lambda r: problems.append(f"failed to load {r.url}"))
    page.goto(reports[kind].as_uri())
    page.wait_for_load_state("load")
    images = page.eval_on_selector_all(
        "img", "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.src.slice(0, 22)])")
    assert images, "a report without figures"
    assert all(done and width > 100 and src == "data:image/png;base64,"
               for done, width, src in images), images
    assert page.title()
    shot = tmp_path / f"{kind}.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
    assert problems == []
    page.close()
