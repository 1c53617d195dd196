"""The report's pages: report.html (self-contained) and report.md (beside its PNG files).

Both pages are one list of blocks (headings, paragraphs, notes, tables, figures) rendered twice,
so the HTML and the Markdown always say the same. Wide tables wrap their text cells and scroll
sideways inside the page; the page itself never grows wider than the window.
"""

from __future__ import annotations

import base64
import html
import re
import time
from dataclasses import dataclass

from fedlora.report.data import Comparison, format_value, seed_order
from fedlora.report.evaluation import (
    CLIENTS_CAPTION,
    EVALUATION_INTRO,
    MAX_DETAILED_RUNS,
    class_table,
    client_table,
    confusion_table,
    evaluation_table,
    has_evaluation,
    held_out_classes,
    last_client_eval,
    macro_f1,
)
from fedlora.report.paired import baseline_tests
from fedlora.report.tables import (
    BASE_CONFIG_FILE,
    Table,
    counted,
    differences_notes,
    differences_table,
    key_table,
    notes,
    number,
    privacy_table,
    ranking_note,
    reproduce_table,
    runs_table,
    summary_table,
    versions_table,
)

CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,"DejaVu Sans",sans-serif;max-width:1320px;margin:1.5rem auto;padding:0 1.2rem;color:#1d232b;line-height:1.45}
h1{font-size:1.6rem;margin:0 0 .3rem;overflow-wrap:anywhere}
h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #d8dee6;padding-bottom:.25rem}
p{overflow-wrap:anywhere}
.meta,figcaption,.empty{color:#5b6673;font-size:.9rem}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;margin:.6rem 0;font-size:.86rem;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d8dee6;padding:.25rem .45rem;text-align:right;vertical-align:top}
td{white-space:nowrap}
th{background:#eef2f6;text-align:center;overflow-wrap:break-word}
td.text{text-align:left;white-space:normal;overflow-wrap:break-word}
tr.winner td{background:#fff3c4;font-weight:600}
figure{margin:.8rem 0}
img{max-width:100%;height:auto;border:1px solid #e6eaef}
.note{background:#eef2f6;border-left:4px solid #6f8498;padding:.45rem .8rem;margin:.5rem 0}
.note.warn{background:#fff6e0;border-left-color:#c98a00}
pre{background:#f5f7f9;padding:.7rem;overflow:auto;font-size:.8rem}
code{font-size:.85em}
"""

# (plot, heading, caption); the plots module makes the plot of each key.
SECTIONS = (
    (
        "accuracy",
        "Accuracy per round",
        "Test accuracy of the global model on the server's held-out set after each round (round 0: before training).",
    ),
    (
        "loss",
        "Loss per round",
        "Test loss of the global model on the held-out set (round 0: before training); where recorded, the clients' "
        "training loss, their example-weighted mean over the round's local steps; for causal LMs, the held-out "
        "perplexity exp(loss), on a log scale.",
    ),
    (
        "accuracy_uplink",
        "Accuracy against uplink",
        "Test accuracy after each round against the bytes all clients have sent up to that round (mean over seeds): "
        "strategies that send less reach the same accuracy further left.",
    ),
    (
        "epsilon",
        "Privacy budget",
        "Left: ε spent so far, the maximum over clients (δ as configured); the dotted line is the target ε each client "
        "is held to (privacy.epsilon). Right: final accuracy against the final ε (dots: runs; markers: mean ± std over "
        "seeds); variants without DP as dashed lines at their accuracy.",
    ),
    (
        "bytes",
        "Communication per round",
        "Bytes of LoRA factors (and head) sent in each round, summed over the clients of the round.",
    ),
    ("time", "Time per round", "Server: aggregation plus evaluation. Clients: local training, as the clients reported it."),
    (
        "detection",
        "Detection of attackers",
        "Per round: the share of attackers flagged (TPR) and of honest clients flagged (FPR).",
    ),
)
PRIVACY_INTRO = (
    "Each client's ε as the server accounts it (δ as configured) and as the client last reported it, its DP-SGD steps, "
    "noise multiplier and sample rate; retired: the round from which it was no longer sampled, and why (a client whose "
    "next round would exceed privacy.epsilon is retired, never overspent)."
)
EMPTY = {
    "epsilon": "No run used differential privacy (no ε recorded): there is no accuracy–ε trade-off to plot.",
    "detection": "No run recorded detection rates (runs with attackers and a robust filter record them).",
}


@dataclass
class Block:
    """One piece of a page. kind: h2, h3, meta, p, note, warn, table, figure, empty, toml.

    `text` may mark code with backticks; a figure's `text` is its caption, `plot` its key."""

    kind: str
    text: str = ""
    table: Table | None = None
    plot: str = ""
    heading: str = ""


def page_blocks(comparison: Comparison, plots: set[str], base_toml: str) -> list[Block]:
    """The report, block by block, for both renderings; `plots` are the keys of the plots made."""
    blocks = [Block("meta", _meta(comparison)), Block("h2", "Summary"), Block("p", _summary_intro(comparison))]
    for group in comparison.groups:
        if len(comparison.groups) > 1:
            blocks.append(Block("h3", f"Held-out set: {group.label}"))
        blocks.append(Block("table", table=summary_table(comparison, group)))
        blocks.append(_note(*ranking_note(group)))
    blocks += [_note(text, warn) for text, warn in notes(comparison)]
    tests = baseline_tests(comparison)
    if tests:
        blocks += [Block("h2", "Differences from the baseline"), Block("table", table=differences_table(comparison, tests))]
        blocks += [_note(text, warn) for text, warn in differences_notes(comparison, tests)]
    if comparison.keyed:
        blocks += [
            Block("h2", "Variants"),
            Block("p", "The settings each label stands for: the config keys that differ among the runs (the seed aside)."),
            Block("table", table=key_table(comparison)),
        ]
    for key, heading, caption in SECTIONS:
        blocks.append(Block("h2", heading))
        if key not in plots:
            blocks.append(Block("empty", EMPTY[key]))
        else:
            if key == "detection":
                names = sorted({name for run in comparison.runs for name in run.defences})
                caption += f" Defences as the histories name them: {', '.join(names)}." if names else ""
            blocks.append(Block("figure", caption, plot=key, heading=heading))
        if key == "epsilon" and any(run.client_privacy for run in comparison.runs):
            blocks += [
                Block("h3", "Privacy per client"),
                Block("p", PRIVACY_INTRO),
                Block("table", table=privacy_table(comparison)),
            ]
    blocks += [Block("h2", "Runs"), Block("table", table=runs_table(comparison))]
    if comparison.excluded:
        rows = [[str(e.path), e.reason] for e in comparison.excluded]
        blocks += [Block("h2", "Not included"), Block("table", table=Table(["run directory", "why"], rows, {0, 1}))]
    blocks += _evaluation_blocks(comparison)
    versions, mixed = versions_table(comparison)
    blocks += [
        Block("h2", "Reproduce"),
        Block(
            "p",
            f"The settings every run shares are in `{BASE_CONFIG_FILE}` beside this report (output settings left out); "
            "each run is that file plus its own `--set` overrides. Every run directory also holds its full resolved `config.json`.",
        ),
        Block("toml", base_toml),
        Block("table", table=reproduce_table(comparison)),
        Block("h3", "Package versions"),
    ]
    if mixed:
        blocks.append(Block("warn", "The runs used different package versions."))
    blocks.append(Block("table", table=versions))
    return blocks


def _evaluation_blocks(comparison: Comparison) -> list[Block]:
    """Per-client and per-class evaluation: a row per run, then each run's classes, confusion matrix and clients."""
    runs = [run for variant in comparison.variants for run in variant.runs if has_evaluation(run)]
    if not runs:
        return []
    blocks = [
        Block("h2", "Per-client and per-class evaluation"),
        Block("p", EVALUATION_INTRO),
        Block("table", table=evaluation_table(comparison)),
    ]
    for run in runs[:MAX_DETAILED_RUNS]:
        blocks.append(Block("h3", f"Run {run.name}"))
        if held_out_classes(run) is not None:
            blocks += [
                Block("p", f"The server's held-out set per class after the last round (macro-F1 {number(macro_f1(run))}):"),
                Block("table", table=class_table(run)),
                Block("p", "Confusion matrix (examples of each true class by the class predicted):"),
                Block("table", table=confusion_table(run)),
            ]
        if run.summary.get("label_mix") or last_client_eval(run):
            blocks += [Block("p", CLIENTS_CAPTION), Block("table", table=client_table(run))]
    if len(runs) > MAX_DETAILED_RUNS:
        blocks.append(
            Block(
                "note",
                f"Per-class and per-client tables shown for the first {MAX_DETAILED_RUNS} of {len(runs)} runs; "
                "each run's summary.json and history.jsonl hold the rest.",
            )
        )
    return blocks


def _note(text: str, warn: bool) -> Block:
    return Block("warn" if warn else "note", text)


def _summary_intro(comparison: Comparison) -> str:
    if len(comparison.runs) == 1:
        return "The run's final figures."
    if len(comparison.variants) == 1:
        return "Mean ± standard deviation over the seeds of the one variant."
    text = "Sorted by final accuracy, mean ± standard deviation over seeds; the winner is marked ★ in the rank column."
    if len(comparison.groups) > 1:
        text = (
            "One table per held-out set (task and test data): runs evaluated on different sets are never ranked "
            "against each other. " + text.replace("the winner", "each set's winner")
        )
    if comparison.keyed:
        text += " The variants' settings are too long for a label: they are named V1, V2, ... in this order (see Variants)."
    return text


def _meta(comparison: Comparison) -> str:
    seeds = [format_value(s) for s in sorted({run.seed for run in comparison.runs}, key=seed_order)]
    fields = ", ".join(comparison.fields) or "none (only the seed differs)"
    return (
        f"{counted(len(comparison.runs), 'run')} in {counted(len(comparison.variants), 'variant')} · "
        f"{'seed' if len(seeds) == 1 else 'seeds'} {', '.join(seeds)} · "
        f"variant fields: {fields} · generated {time.strftime('%Y-%m-%d %H:%M')}"
    )


# --- HTML -------------------------------------------------------------------------------------


def _inline_html(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _breakable(text: str) -> str:
    """Escaped text that may wrap after a dot, underscore, dash, slash or comma (long keys and run names)."""
    return re.sub(r"([._/,-])", r"\1<wbr>", html.escape(text))


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{_breakable(h)}</th>" for h in table.headers)
    body = []
    for i, row in enumerate(table.rows):
        cells = "".join(
            f'<td class="text">{_breakable(c)}</td>' if j in table.text else f"<td>{html.escape(c)}</td>"
            for j, c in enumerate(row)
        )
        body.append(f'<tr class="winner">{cells}</tr>' if i in table.highlight else f"<tr>{cells}</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _html_block(block: Block, plots: dict[str, bytes]) -> str:
    if block.kind == "table":
        return _html_table(block.table)
    if block.kind == "figure":
        data = base64.b64encode(plots[block.plot]).decode("ascii")
        return (
            f'<figure id="plot-{block.plot}"><img src="data:image/png;base64,{data}" alt="{html.escape(block.heading)}">'
            f"<figcaption>{_inline_html(block.text)}</figcaption></figure>"
        )
    if block.kind == "toml":
        return f"<pre>{html.escape(block.text)}</pre>"
    if block.kind in ("h2", "h3"):
        return f"<{block.kind}>{_inline_html(block.text)}</{block.kind}>"
    classes = {"meta": "meta", "note": "note", "warn": "note warn", "empty": "empty", "p": ""}[block.kind]
    return f'<p class="{classes}">{_inline_html(block.text)}</p>' if classes else f"<p>{_inline_html(block.text)}</p>"


def render_html(comparison: Comparison, title: str, plots: dict[str, bytes], base_toml: str) -> str:
    """The self-contained HTML report."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    parts += [_html_block(block, plots) for block in page_blocks(comparison, set(plots), base_toml)]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# --- Markdown ---------------------------------------------------------------------------------


def _md_table(table: Table) -> str:
    def cell(text: str, bold: bool) -> str:
        text = text.replace("|", "\\|")
        return f"**{text}**" if bold and text else text

    lines = ["| " + " | ".join(cell(h, False) for h in table.headers) + " |"]
    lines.append("|" + "|".join(":---" if j in table.text else "---:" for j in range(len(table.headers))) + "|")
    for i, row in enumerate(table.rows):
        lines.append("| " + " | ".join(cell(c, i in table.highlight) for c in row) + " |")
    return "\n".join(lines)


def _md_block(block: Block, plots: dict[str, str]) -> str:
    match block.kind:
        case "table":
            return _md_table(block.table)
        case "figure":
            return f"![{block.heading}]({plots[block.plot]})\n\n{block.text}"
        case "toml":
            return f"```toml\n{block.text}```"
        case "h2":
            return f"## {block.text}"
        case "h3":
            return f"### {block.text}"
        case "note":
            return f"> {block.text}"
        case "warn":
            return f"> **Note:** {block.text}"
        case "empty":
            return f"_{block.text}_"
    return block.text


def render_markdown(comparison: Comparison, title: str, plots: dict[str, str], base_toml: str) -> str:
    """The Markdown report; `plots` maps a plot to its PNG file name beside the report."""
    parts = [f"# {title}"] + [_md_block(block, plots) for block in page_blocks(comparison, set(plots), base_toml)]
    return "\n\n".join(parts) + "\n"
