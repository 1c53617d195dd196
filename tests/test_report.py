"""`fedlora compare` and `fedlora report`: sweeps, resume after a kill, and the report's numbers,
tables and plots checked against the run histories (and, where Chromium exists, as a browser shows them)."""

from __future__ import annotations

import base64
import copy
import csv
import io
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from fedlora.config import load_config
from fedlora.report import config_toml
from fedlora.results import TIMING_FIELDS, RoundRecord, RunRecorder, read_history
from fedlora.sweep import load_sweep
from tests.conftest import TINY, run_cli

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# The sweeps here start Ray themselves, as `fedlora compare` does: the tests count its starts.
pytestmark = pytest.mark.usefixtures("own_ray")


def write_sweep_config(path: Path, sweep: dict[str, list[Any]], rounds: int = 2) -> Path:
    """The conftest tiny experiment (3 clients) as a TOML file with a [sweep] section."""
    tree = copy.deepcopy(TINY)
    tree["federation"]["rounds"] = rounds
    tree["output"] = {"dir": str(path.parent / "runs")}
    tree["sweep"] = sweep
    path.write_text(config_toml(tree))
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def md_table(markdown: str, heading: str) -> list[dict[str, str]]:
    """The first pipe table after a `## heading` line, as dicts."""
    lines = markdown.splitlines()
    start = lines.index(f"## {heading}")
    rows = []
    for line in lines[start + 1 :]:
        if line.startswith("## "):
            break
        if line.startswith("|"):
            rows.append([cell.strip().strip("*") for cell in line.strip("|").split(" | ")])
        elif rows:
            break
    header, _, *body = rows
    return [dict(zip(header, row)) for row in body]


# --- a real tiny sweep: 2 strategies x 2 seeds, 2 rounds, 3 clients, killed and resumed ---------


# The keyword arguments of every ray.init call the resumed tiny sweep made (Flower's RayBackend
# calls it when Ray is not running): a sweep's variants should share one Ray instance.
TINY_SWEEP_RAY_INITS: list[dict[str, Any]] = []


@dataclass
class ResumedSweep:
    """The tiny sweep as `fedlora compare` left it after a kill and a second run of the same command."""

    out: Path
    first: str  # the variant the killed process finished
    second_finished_at_kill: bool
    first_files_at_kill: dict[str, int]  # name: mtime (ns)
    first_files_after: dict[str, int]
    resumed_output: str


def file_times(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def resumed_sweep(tmp_path_factory: pytest.TempPathFactory) -> ResumedSweep:
    """One sweep for the module's end-to-end tests (each sweep starts Ray and its client actors,
    tens of CPU-seconds): a first `fedlora compare`, in a process of its own, is killed with its Ray
    once its first variant has finished; the same command, in this process, runs the other three."""
    import ray

    base = tmp_path_factory.mktemp("compare")
    config = write_sweep_config(base / "tiny_compare.toml", {"strategy.name": ["fedit", "ffa_lora"], "seed": [0, 1]})
    out = base / "out"
    first, second = (variant.name for variant in load_sweep(config).variants[:2])
    command = [sys.executable, "-m", "fedlora.cli", "compare", str(config), "--out", str(out)]
    log = (base / "first.log").open("w")
    # Its own session, so the kill reaches the Ray processes it started and nothing else.
    killed = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    finished = out / first / "summary.json"
    deadline = time.monotonic() + 400
    while not finished.exists():
        assert killed.poll() is None, (base / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the first run did not finish in time"
        time.sleep(0.1)
    time.sleep(0.3)  # let it finish writing summary.json
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    second_finished = (out / second / "summary.json").exists()
    kept = file_times(out / first)

    real_init = ray.init

    def counted_init(*args, **kwargs):
        TINY_SWEEP_RAY_INITS.append(kwargs)
        return real_init(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ray, "init", counted_init)
        code, output = run_cli("compare", str(config), "--out", str(out))  # in this process: no interpreter start-up
    assert code == 0, output[-3000:]
    assert str(out / "report.html") in output
    return ResumedSweep(out, first, second_finished, kept, file_times(out / first), output)


@pytest.fixture(scope="module")
def tiny_sweep(resumed_sweep: ResumedSweep) -> Path:
    """The finished sweep's folder."""
    return resumed_sweep.out


@pytest.mark.e2e
def test_a_sweep_starts_ray_once_and_each_run_records_what_it_records_alone(tiny_sweep: Path, tmp_path: Path) -> None:
    import ray
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    from fedlora.simulation import simulate

    # The three variants run in this process started one Ray (the killed process had its own).
    assert len(TINY_SWEEP_RAY_INITS) == 1 and TINY_SWEEP_RAY_INITS[0].get("include_dashboard") is False
    assert not ray.is_initialized() and RayBackend.terminate.__name__ == "terminate"  # all undone after the sweep
    last = load_sweep(tiny_sweep.parent / "tiny_compare.toml").variants[-1]
    simulate(last.config, tmp_path / "alone")  # with a Ray of its own
    for ours, alone in zip(read_history(tiny_sweep / last.name), read_history(tmp_path / "alone"), strict=True):
        assert {k: v for k, v in ours.items() if k not in TIMING_FIELDS} == {
            k: v for k, v in alone.items() if k not in TIMING_FIELDS
        }


@pytest.mark.e2e
def test_results_csv_has_one_row_per_run_with_the_figures_of_its_history(tiny_sweep: Path) -> None:
    rows = read_csv(tiny_sweep / "results.csv")
    assert sorted((r["strategy.name"], r["seed"]) for r in rows) == [
        ("fedit", "0"),
        ("fedit", "1"),
        ("ffa_lora", "0"),
        ("ffa_lora", "1"),
    ]
    for row in rows:
        history = read_history(Path(row["run_dir"]))
        assert Path(row["run_dir"]).parent == tiny_sweep
        assert [r["round"] for r in history] == [0, 1, 2] and row["rounds"] == "2"
        assert float(row["final_accuracy"]) == history[-1]["accuracy"]
        assert float(row["best_accuracy"]) == max(r["accuracy"] for r in history)
        assert int(row["bytes_up"]) == sum(r["bytes_up"] for r in history) > 0
        assert int(row["bytes_down"]) == sum(r["bytes_down"] for r in history) > 0
        assert float(row["server_seconds_per_round"]) == pytest.approx(statistics.fmean(r["server_seconds"] for r in history[1:]))
        assert float(row["client_seconds_per_round"]) == pytest.approx(statistics.fmean(r["client_seconds"] for r in history[1:]))
        assert row["final_epsilon"] == row["tpr"] == row["fpr"] == ""
    # FFA-LoRA sends B only: half of FedIT's factor bytes (the head aside), visible in the table.
    up = {r["strategy.name"]: int(r["bytes_up"]) for r in rows}
    assert up["ffa_lora"] < up["fedit"]


@pytest.mark.e2e
def test_the_summary_table_is_the_mean_and_std_over_seeds_sorted_with_the_winner_marked(tiny_sweep: Path) -> None:
    rows = read_csv(tiny_sweep / "results.csv")
    finals: dict[str, list[float]] = {}
    for row in rows:
        finals.setdefault(row["strategy.name"], []).append(read_history(Path(row["run_dir"]))[-1]["accuracy"])
    markdown = (tiny_sweep / "report.md").read_text()
    summary = md_table(markdown, "Summary")
    assert [r["strategy.name"] for r in summary] == sorted(finals, key=lambda s: -statistics.fmean(finals[s]))
    for line in summary:
        values = finals[line["strategy.name"]]
        assert line["final accuracy"] == f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"
        assert line["seeds"] == "2"  # how many seeds; the runs table lists them
    best = max(statistics.fmean(v) for v in finals.values())
    for line in summary:  # the winner is marked; variants tied with it too (a tiny model may tie)
        assert ("★" in line["rank"]) == (statistics.fmean(finals[line["strategy.name"]]) == best)
    runs = md_table(markdown, "Runs")
    assert len(runs) == 4
    for line in runs:
        history = read_history(tiny_sweep / line["run"])
        assert line["final accuracy"] == f"{history[-1]['accuracy']:.4f}"
    html = (tiny_sweep / "report.html").read_text()
    for line in summary:
        assert line["final accuracy"] in html
    assert "No run used differential privacy" in markdown and "No run recorded detection rates" in markdown


@pytest.mark.e2e
def test_the_plots_exist_beside_the_markdown_and_inside_the_html(tiny_sweep: Path) -> None:
    markdown = (tiny_sweep / "report.md").read_text()
    html = (tiny_sweep / "report.html").read_text()
    for name in ("accuracy", "loss", "accuracy_uplink", "bytes", "time"):
        png = (tiny_sweep / f"{name}.png").read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 10_000
        assert f"]({name}.png)" in markdown
        assert base64.b64encode(png).decode() in html  # the same image, embedded
    assert not (tiny_sweep / "epsilon.png").exists() and not (tiny_sweep / "detection.png").exists()
    assert "http://" not in html and "https://" not in html and "<link" not in html and "<script" not in html


@pytest.mark.e2e
def test_config_toml_and_the_listed_overrides_reproduce_every_runs_exact_config(tiny_sweep: Path) -> None:
    import json

    for row in read_csv(tiny_sweep / "results.csv"):
        rebuilt = load_config(tiny_sweep / "config.toml", shlex.split(row["overrides"])).model_dump(mode="json")
        recorded = json.loads((Path(row["run_dir"]) / "config.json").read_text())
        rebuilt.pop("output")
        recorded.pop("output")
        assert rebuilt == recorded
    markdown = (tiny_sweep / "report.md").read_text()
    assert "| flwr |" in markdown and "| torch |" in markdown  # package versions


@pytest.mark.e2e
def test_fedlora_report_rerenders_the_same_results_from_the_sweep_directory(tiny_sweep: Path, tmp_path: Path) -> None:
    code, output = run_cli("report", str(tiny_sweep), "--out", str(tmp_path / "again"))
    assert code == 0, output
    assert (tmp_path / "again" / "results.csv").read_text() == (tiny_sweep / "results.csv").read_text()
    runs = sorted(p for p in tiny_sweep.iterdir() if (p / "summary.json").exists())
    code, output = run_cli("report", *map(str, runs[:2]), "--out", str(tmp_path / "two"))
    assert code == 0, output
    assert len(read_csv(tmp_path / "two" / "results.csv")) == 2


# --- the report in a real browser -------------------------------------------------------------


class _DomReader(HTMLParser):
    """Tables (rows of cell texts) and image sources of a DOM dump."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.images: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(dict(attrs).get("src") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def chromium(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}",
    ]  # fmt: skip
    return subprocess.run([str(CHROMIUM), *flags, *extra, url], capture_output=True, text=True, timeout=180)


def png_image(data: bytes):
    from PIL import Image

    assert data.startswith(PNG_MAGIC)
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


@pytest.mark.e2e
def test_report_html_renders_in_headless_chromium_with_plots_and_filled_tables(tiny_sweep: Path, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"chromium not installed: {CHROMIUM} is missing (apt-get install chromium; .ci/run does)")
    url = (tiny_sweep / "report.html").as_uri()
    dumped = chromium(url, tmp_path / "profile-dom", "--dump-dom")
    assert dumped.returncode == 0 and "<table" in dumped.stdout, dumped.stderr[-2000:]
    dom = _DomReader()
    dom.feed(dumped.stdout)
    # The ranking, the paired differences against the baseline, every run, then provenance tables.
    summary, paired, runs = dom.tables[:3]
    assert summary[0][:3] == ["rank", "strategy.name", "seeds"] and len(summary) == 3
    assert paired[0][:2] == ["variant", "baseline"] and len(paired) == 2
    assert len(runs) == 5
    for table in (summary, runs):
        column = table[0].index("final accuracy")
        for row in table[1:]:
            assert all(row) and len(row) == len(table[0])
            assert re.fullmatch(r"\d\.\d{4}( ± \d\.\d{4})?", row[column]), row
    assert len(dom.images) == 5  # accuracy, loss, accuracy against uplink, bytes, time (no DP, no attack)
    for src in dom.images:
        assert src.startswith("data:image/png;base64,")
        image = png_image(base64.b64decode(src.split(",", 1)[1]))
        assert image.width >= 800 and image.height >= 300
        assert len(image.getcolors(1 << 20) or []) > 30  # lines, bands, text: not a blank canvas

    shot = tmp_path / "report.png"
    taken = chromium(url, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1280,2000")
    assert shot.exists(), taken.stderr[-2000:]
    image = png_image(shot.read_bytes())
    assert image.size == (1280, 2000)
    colours = image.getcolors(1 << 24)
    assert len(colours) > 50  # text, table shading and plot lines, not one flat colour
    white = max(count for count, colour in colours if colour == max(c for _, c in colours))
    assert white < 0.97 * image.width * image.height  # mostly page background, but far from empty
    if os.environ.get("FEDLORA_KEEP_SCREENSHOT"):  # for a person to look at
        Path(os.environ["FEDLORA_KEEP_SCREENSHOT"]).write_bytes(shot.read_bytes())


# --- resume after a kill --------------------------------------------------------------------


@pytest.mark.e2e
def test_a_killed_sweep_resumes_without_rerunning_its_finished_runs(resumed_sweep: ResumedSweep) -> None:
    assert not resumed_sweep.second_finished_at_kill
    assert "1 already finished" in resumed_sweep.resumed_output
    assert resumed_sweep.first_files_after == resumed_sweep.first_files_at_kill
    rows = read_csv(resumed_sweep.out / "results.csv")
    assert sorted((r["strategy.name"], r["seed"]) for r in rows) == [
        ("fedit", "0"),
        ("fedit", "1"),
        ("ffa_lora", "0"),
        ("ffa_lora", "1"),
    ]
    index = json.loads((resumed_sweep.out / "sweep.json").read_text())
    assert [r["status"] for r in index["runs"]] == ["finished"] * 4


# --- sweeps without the simulation engine -------------------------------------------------------


def test_a_sweep_expands_the_product_seed_slowest_with_stable_names(tmp_path: Path) -> None:
    config = write_sweep_config(
        tmp_path / "s.toml", {"strategy.name": ["fedit", "ffa_lora"], "privacy.enabled": [False, True], "seed": [0, 1]}
    )
    sweep = load_sweep(config)
    names = [v.name for v in sweep.variants]
    assert len(names) == len(set(names)) == 8
    assert names[0] == "strategy.name-fedit__privacy.enabled-false__seed-0"
    assert [v.config.seed for v in sweep.variants] == [0] * 4 + [1] * 4
    assert {(v.config.strategy.name, v.config.privacy.enabled) for v in sweep.variants[:4]} == {
        ("fedit", False),
        ("fedit", True),
        ("ffa_lora", False),
        ("ffa_lora", True),
    }
    assert sweep.default_out() == tmp_path / "runs" / "compare-s"
    fixed = load_sweep(config, ["seed=1", 'sweep.strategy.name=["ffa_lora"]', "federation.lr=0.01"])
    assert [v.name for v in fixed.variants] == [
        "strategy.name-ffa_lora__privacy.enabled-false__seed-1",
        "strategy.name-ffa_lora__privacy.enabled-true__seed-1",
    ]
    assert all(v.config.federation.lr == 0.01 for v in fixed.variants)


@pytest.mark.parametrize(
    ("sweep", "names"),
    [
        ({"federation.clients_per_round": [2, 5]}, ["federation.clients_per_round-5", "num_clients"]),
        ({"strategy.name": ["fedit", "fedmagic"]}, ["strategy.name-fedmagic", "unknown strategy"]),
        ({"model.lora_rnak": [2]}, ["lora_rnak", "unknown key"]),
        ({"seed": []}, ["[sweep] seed", "empty"]),
        ({"seed": 3}, ["[sweep] seed", "list"]),
        ({"output.dir": ["a", "b"]}, ["output", "cannot be swept"]),
    ],
)
def test_a_bad_sweep_is_refused_in_one_line_before_anything_runs(tmp_path: Path, sweep: dict, names: list[str]) -> None:
    config = write_sweep_config(tmp_path / "bad.toml", sweep)
    code, output = run_cli("compare", str(config), "--out", str(tmp_path / "out"))
    assert code == 2, output
    assert len(output.strip().splitlines()) == 1 and "Traceback" not in output
    for name in names:
        assert name in output
    assert not (tmp_path / "out").exists()


def test_report_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    code, output = run_cli("report", str(tmp_path / "nowhere"))
    assert code == 2 and "no such run or sweep directory" in output and len(output.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    code, output = run_cli("report", str(tmp_path / "empty"))
    assert code == 2 and "neither a run directory" in output
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.json").write_text("{}")
    code, output = run_cli("report", str(tmp_path / "unfinished"))
    assert code == 2 and "no finished runs" in output


def fake_simulate(config, run_dir, on_round=None, overwrite=False, stop=None):
    """A stand-in for the simulation engine (as run_sweep calls it): a made-up history with DP and
    detection figures; seed 1 of ffa_lora fails."""
    if config.strategy.name == "ffa_lora" and config.seed == 1:
        raise RuntimeError("client 2 ran out of memory")
    recorder = RunRecorder(run_dir, config)
    offset = 0.1 if config.strategy.name == "fedit" else 0.0
    for round_ in range(config.federation.rounds + 1):
        record = RoundRecord(
            round=round_,
            accuracy=0.2 + offset + 0.1 * round_ + 0.01 * config.seed,
            loss=1.0 / (round_ + 1),
            bytes_up=1000 * round_,
            bytes_down=2000 * round_,
            server_seconds=0.5,
            client_seconds=1.5,
            epsilon_max=0.8 * round_ if config.privacy.enabled and round_ else None,
            clients=[0, 1] if round_ else [],
            extra={"flagged": [2], "malicious": [2]} if round_ else {},
        )
        recorder.record(record)
        if on_round:
            on_round(record)
    return recorder.finish(1.0, {"strategy": config.strategy.name})


def test_a_failed_run_is_recorded_the_sweep_goes_on_and_the_report_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    import fedlora.simulation

    monkeypatch.setattr(fedlora.simulation, "simulate", fake_simulate)
    config = write_sweep_config(
        tmp_path / "f.toml", {"strategy.name": ["fedit", "ffa_lora"], "privacy.enabled": [True], "seed": [0, 1]}
    )
    out = tmp_path / "out"
    code, output = run_cli("compare", str(config), "--out", str(out))
    assert code == 1 and "1 run(s) failed" in output
    failed = out / "strategy.name-ffa_lora__privacy.enabled-true__seed-1"
    assert "client 2 ran out of memory" in (failed / "error.txt").read_text()
    index = json.loads((out / "sweep.json").read_text())
    assert [r["status"] for r in index["runs"]] == ["finished", "finished", "finished", "failed"]
    rows = [row for row in read_csv(out / "results.csv") if not row["not_included"]]
    (failed_row,) = [row for row in read_csv(out / "results.csv") if row["not_included"]]
    assert len(rows) == 3 and "client 2 ran out of memory" in failed_row["not_included"]
    assert failed_row["run_dir"] == str(failed.resolve()) and failed_row["final_accuracy"] == ""
    assert {float(r["final_epsilon"]) for r in rows} == {1.6}
    assert {float(r["tpr"]) for r in rows} == {1.0} and {float(r["fpr"]) for r in rows} == {0.0}
    markdown = (out / "report.md").read_text()
    assert "## Not included" in markdown and "client 2 ran out of memory" in markdown
    assert (out / "epsilon.png").exists() and (out / "detection.png").exists()
    assert "](epsilon.png)" in markdown and "](detection.png)" in markdown
    summary = md_table(markdown, "Summary")
    assert summary[0]["strategy.name"] == "fedit" and summary[0]["final ε"] == "1.60 ± 0.00"
    assert summary[0]["rank"] == "1 ★ winner" and summary[1]["rank"] == "2"
    assert summary[1]["final accuracy"] == "0.4000"  # one seed: no spread to show
    assert "single runs" in markdown  # the winner's lead over a one-seed runner-up is flagged

    # Again: only the failed run is retried, and it fails the same way.
    before = (out / "strategy.name-fedit__privacy.enabled-true__seed-0" / "summary.json").stat().st_mtime_ns
    code, output = run_cli("compare", str(config), "--out", str(out))
    assert code == 1 and "3 already finished" in output
    assert (out / "strategy.name-fedit__privacy.enabled-true__seed-0" / "summary.json").stat().st_mtime_ns == before


def test_a_finished_run_with_another_config_is_not_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fedlora.simulation

    monkeypatch.setattr(fedlora.simulation, "simulate", fake_simulate)
    config = write_sweep_config(tmp_path / "c.toml", {"seed": [0]})
    out = tmp_path / "out"
    assert run_cli("compare", str(config), "--out", str(out))[0] == 0
    code, output = run_cli("compare", str(config), "--out", str(out), "--set", "federation.lr=0.5")
    assert code == 2 and "different config" in output and "federation" in output


def test_a_finished_run_recorded_before_a_key_was_added_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep continued with a newer fedlora: keys added since count at their defaults, and
    where it ran (CPUs, output) may differ, as on a resume."""
    import fedlora.simulation

    monkeypatch.setattr(fedlora.simulation, "simulate", fake_simulate)
    config = write_sweep_config(tmp_path / "c.toml", {"seed": [0]})
    out = tmp_path / "out"
    assert run_cli("compare", str(config), "--out", str(out))[0] == 0
    (run_dir,) = [p for p in out.iterdir() if (p / "config.json").exists()]
    recorded = json.loads((run_dir / "config.json").read_text())
    del recorded["evaluation"]  # as written before the section existed
    recorded["strategy"].pop("multikrum_mean")
    recorded["federation"]["server_cpus"] = 7
    (run_dir / "config.json").write_text(json.dumps(recorded))
    code, output = run_cli("compare", str(config), "--out", str(out))
    assert code == 0 and "1 already finished" in output
