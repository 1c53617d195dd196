"""fedlora.report.pages: the HTML and Markdown pages, and a report over runs that differ in many keys
as headless Chromium lays it out at 1400 px (no page overflow, short legends, every plot)."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from fedlora.report import write_report
from fedlora.report.data import MAX_LABEL
from fedlora.report.plots import PLOTS, legend_labels
from tests.report_runs import MANY_KEYS, make_run, many_key_runs

CHROMIUM = Path("/usr/bin/chromium")
WIDTH = 1400


@pytest.fixture(scope="module")
def many_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pages")
    many_key_runs(root / "runs")
    write_report([root / "runs"], root / "report", "fedlora compare: seven keys")
    return root / "report"


class Page(HTMLParser):
    """Tables (rows of cell texts), figure ids and image sources of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.figures: list[str] = []
        self.images: list[str] = []
        self.pre: list[str] = []
        self._cell: list[str] | None = None
        self._in_pre = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "figure":
            self.figures.append(attributes.get("id") or "")
        elif tag == "img":
            self.images.append(attributes.get("src") or "")
        elif tag == "pre":
            self._in_pre = True
            self.pre.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "pre":
            self._in_pre = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._in_pre:
            self.pre[-1] += data


def parse(html: str) -> Page:
    page = Page()
    page.feed(html)
    return page


def md_tables(markdown: str) -> list[list[list[str]]]:
    tables: list[list[list[str]]] = []
    previous = ""
    for line in markdown.splitlines():
        if line.startswith("|"):
            if not previous.startswith("|"):
                tables.append([])
            if not re.fullmatch(r"\|(:?---:?\|)+", line):
                tables[-1].append(
                    [cell.strip().removeprefix("**").removesuffix("**").replace("\\|", "|") for cell in line[1:-1].split(" | ")]
                )
        previous = line
    return tables


def test_the_html_and_the_markdown_show_the_same_tables_and_plots(many_report: Path) -> None:
    html = (many_report / "report.html").read_text()
    markdown = (many_report / "report.md").read_text()
    page = parse(html)
    assert page.tables == md_tables(markdown)
    assert page.figures == [f"plot-{key}" for key in PLOTS]
    for key, src in zip(PLOTS, page.images):
        assert f"]({key}.png)" in markdown
        assert base64.b64decode(src.split(",", 1)[1]) == (many_report / f"{key}.png").read_bytes()
    assert "<script" not in html and "http://" not in html and "https://" not in html


def test_a_keyed_report_has_the_variants_table_and_every_key_in_it(many_report: Path) -> None:
    page = parse((many_report / "report.html").read_text())
    keyed = next(table for table in page.tables if table[0][0] == "variant" and "baseline" not in table[0])
    assert set(keyed[0][1:]) == set(MANY_KEYS[0]) and len(keyed[0]) == 1 + len(MANY_KEYS[0])
    assert [row[0] for row in keyed[1:]] == [f"V{i}" for i in range(1, 7)]


def test_a_one_run_report_says_one_run_and_claims_no_winner(tmp_path: Path) -> None:
    make_run(tmp_path / "only", [])
    files = write_report([tmp_path / "only"], tmp_path / "report")
    markdown = files.markdown.read_text()
    assert "1 run in 1 variant · seed 7 ·" in markdown and "1 runs" not in markdown and "1 variants" not in markdown
    assert "winner" not in markdown.lower() and "The run's final figures." in markdown
    assert "One run: nothing to rank." in markdown


# --- the report as a browser lays it out ------------------------------------------------------

MEASURE = """<script>
window.addEventListener("load", () => {
  const scrolls = [...document.querySelectorAll(".scroll")].map((d) => [d.scrollWidth, d.clientWidth]);
  const figures = [...document.querySelectorAll("figure img")].map((i) => [i.naturalWidth, i.getBoundingClientRect().right]);
  const out = document.createElement("pre");
  out.id = "measured";
  out.textContent = JSON.stringify({
    scrollWidth: document.documentElement.scrollWidth,
    clientWidth: document.documentElement.clientWidth,
    scrolls, figures,
  });
  document.body.appendChild(out);
});
</script>"""


def chromium(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--virtual-time-budget=10000",
    ]  # fmt: skip
    return subprocess.run([str(CHROMIUM), *flags, *extra, url], capture_output=True, text=True, timeout=180)


def test_a_report_over_runs_differing_in_seven_keys_fits_1400_px_with_short_legends_and_every_plot(
    many_report: Path, tmp_path: Path
) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"chromium not installed: {CHROMIUM} is missing (apt-get install chromium; .ci/run does)")
    html = (many_report / "report.html").read_text()
    measured_copy = tmp_path / "measured.html"  # the report plus a script that measures the layout
    measured_copy.write_text(html.replace("</body>", MEASURE + "</body>"))
    dumped = chromium(measured_copy.as_uri(), tmp_path / "profile-dom", f"--window-size={WIDTH},1000", "--dump-dom")
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    page = parse(dumped.stdout)
    layout = json.loads(page.pre[-1])
    assert layout["scrollWidth"] <= WIDTH, layout  # no horizontal overflow of the page
    summary_scroll = layout["scrolls"][0]
    assert summary_scroll[0] <= summary_scroll[1], "the summary table needs no sideways scrolling at 1400 px"
    assert page.figures == [f"plot-{key}" for key in PLOTS]  # every plot, DP and detection included
    assert len(layout["figures"]) == len(PLOTS)
    for natural_width, right in layout["figures"]:
        assert natural_width >= 800 and right <= layout["clientWidth"]
    for src in page.images:
        legend = legend_labels(base64.b64decode(src.split(",", 1)[1]))
        assert legend and max(len(text) for text in legend) <= MAX_LABEL, legend
    summary = page.tables[0]
    assert summary[0][:3] == ["rank", "variant", "seeds"] and summary[1][0] == "1 ★ winner" and summary[1][1] == "V1"

    shot = tmp_path / "report.png"
    taken = chromium(
        (many_report / "report.html").as_uri(), tmp_path / "profile-shot", f"--screenshot={shot}", f"--window-size={WIDTH},5600"
    )
    assert shot.exists(), taken.stderr[-2000:]
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    assert image.size == (WIDTH, 5600)
    assert len(image.getcolors(1 << 24)) > 200  # text, shading and plot lines, not a blank page
    if os.environ.get("FEDLORA_KEEP_SCREENSHOT"):  # for a person to look at
        Path(os.environ["FEDLORA_KEEP_SCREENSHOT"]).write_bytes(shot.read_bytes())
