"""`caffast report OUT`: one static page to browse a finished `caffast run`, offline.

It writes OUT/report.html and its thumbnails under OUT/report/ (one PNG per map: the map laid over the
image as the model saw it, with the annotated boxes of the map's class in green and the CAM
protocol's box in yellow).  The page holds its style and a small script inline and loads nothing but
those thumbnails, so it opens from the file system, with no server and no network, and can be copied
with the folder.  It shows the run's settings, the localization summary, per-class figures, the
worst and best maps, and every map in a table that sorts by any column and filters by name, class and
hit or miss; Grad-CAM's overlay sits beside L2-CAF's where the run has the baseline.  Runs without
annotations get the same page without the hit and IoU columns.

Everything is read from the run folder (config.json, index.jsonl, the result files) and the images
in its data folder; an image that is gone is drawn on grey.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..eval.summary import Estimate
from ..models.preprocessing import Preprocessing
from ..models.source import ModelSource
from ..viz import apply_heatmap
from .atomic import write_atomically, write_text
from .common import CliError, say
from .imagefiles import ImageReadError, read_image
from .runfolder import CONFIG, INDEX, RunFolder
from .runlocalization import BASELINE_ARRAY, BASELINE_FIELD, method_summaries

REPORT = "report.html"
THUMBNAILS = "report"  # the thumbnails' folder inside OUT
THUMBNAIL_SIDE = 160  # pixels of a thumbnail's longer side
CASES_SHOWN = 6  # maps in each of the worst and best galleries
TRUE_BOX = (0, 200, 0)  # the annotated boxes of the map's class
PREDICTED_BOX = (255, 215, 0)  # the CAM protocol's box
_THUMBNAIL_NAME = re.compile(r"\d+\.\w+\.png")


@dataclass(frozen=True)
class Method:
    """A method whose maps a run holds: its name, its array in the result files, its index row field
    and the suffix of its thumbnails."""

    name: str
    array: str
    field: str
    slug: str


L2CAF = Method("L2-CAF", "maps", "localization", "l2caf")
BASELINES = {"gradcam": Method("Grad-CAM", BASELINE_ARRAY["gradcam"], BASELINE_FIELD["gradcam"], "gradcam")}


@dataclass(frozen=True)
class MapEntry:
    """One map of the run: its index row, its position in the index, its class label and thumbnails."""

    number: int
    row: dict[str, Any]
    label: str
    thumbnails: dict[str, str]  # method name -> path relative to OUT

    @property
    def scored(self) -> bool:
        return self.row.get(L2CAF.field) is not None


def write_report(out: Path) -> Path:
    """Write OUT/report.html and its thumbnails; returns the page's path."""
    folder = RunFolder(out)
    config, rows = _read_run(folder)
    methods = [L2CAF] + ([BASELINES[config["baseline"]]] if config.get("baseline") in BASELINES else [])
    names = ModelSource(str(config.get("arch")), "random").known_class_names()
    thumbnails = out / THUMBNAILS
    thumbnails.mkdir(exist_ok=True)
    for old in thumbnails.iterdir():  # those of an earlier report, whose numbering may differ
        if _THUMBNAIL_NAME.fullmatch(old.name):
            old.unlink()
    pictures = _Pictures(Path(config["data"]), Preprocessing(**config["input"]))
    symmetric = config.get("explain", {}).get("map") == "signed"
    entries = []
    for number, row in enumerate(rows):
        if row.get("status") != "done":
            continue
        target = int(row["target"])
        label = f"{target} {names[target]}" if 0 <= target < len(names) else str(target)
        drawn = {}
        for method, heat in _maps(folder, row, methods):
            picture = _thumbnail(pictures.get(row["image"]), heat, symmetric, _true_boxes(row), _predicted(row, method))
            path = thumbnails / f"{number:05d}.{method.slug}.png"
            write_atomically(path, lambda file, picture=picture: picture.save(file, format="PNG"))
            drawn[method.name] = folder.relative(path)
        entries.append(MapEntry(number, row, label, drawn))
    if pictures.missing:
        say(f"{len(pictures.missing)} images of the run could not be read from {config['data']} and are drawn on "
            f"grey, e.g. {pictures.missing[0]}")  # fmt: skip
    failed = [row for row in rows if row.get("status") == "failed"]
    page = _page(out, config, rows, entries, failed, methods)
    write_text(out / REPORT, page)
    return out / REPORT


def _read_run(folder: RunFolder) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The run's config.json and index rows, or the command's error saying what is missing."""
    root = folder.root
    try:
        config = json.loads((root / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CliError(f"{root} has no readable {CONFIG} ({error}), so it is not the output folder of a caffast "
                       "run: pass the --out of a run") from None  # fmt: skip
    try:
        rows = folder.read_index()
    except (OSError, ValueError) as error:
        raise CliError(f"{root / INDEX} cannot be read ({error}): run the same caffast run command again to "
                       "finish the run, then make the report") from None  # fmt: skip
    if not rows:
        raise CliError(f"{root / INDEX} lists no image: finish the run first")
    return config, rows


def _maps(folder: RunFolder, row: Mapping[str, Any], methods: Sequence[Method]) -> Iterable[tuple[Method, np.ndarray]]:
    """Each method's map for the row's target, from the image's result file."""
    path = folder.root / str(row["result"])
    try:
        with np.load(path, allow_pickle=False) as arrays:
            column = arrays["targets"].tolist().index(row["target"])
            loaded = [(method, np.asarray(arrays[method.array][column])) for method in methods]
    except (OSError, KeyError, ValueError) as error:
        raise CliError(f"{path} cannot be read ({error}): run the same caffast run command again, which redoes "
                       "broken outputs, then make the report") from None  # fmt: skip
    return loaded


class _Pictures:
    """The images as the model saw them, read once each; grey where an image cannot be read."""

    def __init__(self, data: Path, preprocessing: Preprocessing) -> None:
        self.data = data
        self.preprocessing = preprocessing
        self.missing: list[str] = []
        self._last: tuple[str, np.ndarray] = ("", np.zeros(0))

    def get(self, image: str) -> np.ndarray:
        if self._last[0] != image:  # an image's rows are consecutive in the index
            try:
                rgb, _ = read_image(self.data / image, self.preprocessing)
            except ImageReadError:
                self.missing.append(image)
                size = self.preprocessing.size
                rgb = np.full((size, size, 3), 0.5, dtype=np.float32)
            self._last = (image, rgb)
        return self._last[1]


def _true_boxes(row: Mapping[str, Any]) -> list[list[float]]:
    """The annotated boxes of the row's class, in input pixels."""
    return [obj["box"] for obj in row.get("objects") or [] if obj.get("class") == row["target"]]


def _predicted(row: Mapping[str, Any], method: Method) -> Optional[list[float]]:
    record = row.get(method.field)
    return record.get("cam_box") if isinstance(record, dict) else None


def _thumbnail(
    rgb: np.ndarray, heat: np.ndarray, symmetric: bool, true_boxes: Sequence[Sequence[float]],
    predicted: Optional[Sequence[float]],
) -> Image.Image:  # fmt: skip
    """The map over the picture, scaled to THUMBNAIL_SIDE, with the boxes drawn (input pixels in)."""
    picture = apply_heatmap(rgb, heat, alpha=0.5, symmetric=symmetric)
    scale = THUMBNAIL_SIDE / max(picture.size)
    picture = picture.resize((round(picture.width * scale), round(picture.height * scale)), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(picture)
    for box, colour in [(box, TRUE_BOX) for box in true_boxes] + ([(predicted, PREDICTED_BOX)] if predicted else []):
        x0, y0, x1, y1 = (value * scale for value in box)
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=colour, width=2)
    return picture


# ----------------------------------------------------------------------------------------------
# the page


def _text(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any, digits: int = 3) -> str:
    return "" if value is None else f"{float(value):.{digits}f}"


def _cell(value: Any, shown: str, number: bool = True) -> str:
    """A table cell that sorts by `value` (empty: sorted last)."""
    sort = "" if value is None else (repr(float(value)) if number else str(value))
    return f'<td data-value="{_text(sort)}">{_text(shown)}</td>'


def _verdict(record: Optional[Mapping[str, Any]]) -> str:
    """hit or miss; "absent" for a class the image has no box of, which no box can hit."""
    if not record:
        return ""
    if record.get("gt_known_loc") is None:
        return "absent"
    return "hit" if record["box_hit"] else "miss"


def _estimate(estimate: Estimate) -> str:
    if not estimate.count:
        return "-"
    return f"{estimate.mean:.3f} [{estimate.low:.3f}, {estimate.high:.3f}] n={estimate.count}"


def _settings(out: Path, config: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str:
    explain = config.get("explain", {})
    images = {row["image"] for row in rows}
    failed = {row["image"] for row in rows if row.get("status") == "failed"}
    facts = [
        ("data", config.get("data")), ("model", f"{config.get('arch')} ({config.get('weights')}) at {config.get('layer')}"),
        ("explain", f"{explain.get('mode')}, loss {explain.get('loss')}, solver {explain.get('solver')}, map "
                    f"{explain.get('map')}, {explain.get('max_iter')} iterations"),
        ("images", f"{len(images)} ({len(failed)} failed), {sum(row.get('status') == 'done' for row in rows)} maps"),
    ]  # fmt: skip
    annotations = config.get("annotations")
    if annotations:
        facts.append(("annotations", f"{annotations['path']} ({annotations['format']}), threshold {annotations['threshold']}"))
    if config.get("baseline"):
        facts.append(("baseline", f"{config['baseline']} at the same layer and targets"))
    items = "".join(f"<dt>{_text(key)}</dt><dd>{_text(value)}</dd>" for key, value in facts)
    return f"<h1>caffast run: {_text(out.name or out)}</h1><dl>{items}</dl>"


def _summary(rows: Sequence[Mapping[str, Any]], methods: Sequence[Method]) -> str:
    summaries = method_summaries(rows)
    labels = list(dict.fromkeys(label for summary in summaries.values() for label, e in summary.items() if e.count))
    if not labels:
        return ""
    head = "".join(f"<th>{_text(method.name)}</th>" for method in methods if method.name in summaries)
    body = "".join(
        f"<tr><td>{_text(label)}</td>"
        + "".join(f"<td>{_text(_estimate(summaries[m.name][label]))}</td>" for m in methods if m.name in summaries)
        + "</tr>"
        for label in labels
    )
    return (f'<section id="summary"><h2>Summary</h2><p>Mean over the scored maps with its bootstrap 95% interval '
            f"(1000 resamples); n counts the maps each metric applies to.</p><table><thead><tr><th>metric</th>{head}"
            f"</tr></thead><tbody>{body}</tbody></table></section>")  # fmt: skip


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    kept = [float(v) for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _classes(entries: Sequence[MapEntry], methods: Sequence[Method], scored: bool) -> str:
    """Per class: its maps, the mean confidence, and per method the hit rate and mean IoU."""
    groups: dict[str, list[MapEntry]] = {}
    for entry in entries:
        groups.setdefault(entry.label, []).append(entry)
    head = "<th data-type='text'>class</th><th>maps</th><th>mean confidence</th>"
    if scored:
        head += "".join(f"<th>{_text(m.name)} hit rate</th><th>{_text(m.name)} mean IoU</th>" for m in methods)
    body = []
    for label, group in groups.items():
        cells = [_cell(label, label, number=False), _cell(len(group), str(len(group)))]
        confidence = _mean([entry.row.get("probability") for entry in group])
        cells.append(_cell(confidence, _number(confidence)))
        for method in methods if scored else []:
            records = [entry.row.get(method.field) for entry in group if entry.row.get(method.field)]
            rate = _mean([float(bool(record["box_hit"])) for record in records])
            iou = _mean([record["best_iou"] for record in records])
            bar = f'<span class="bar" style="width:{round(100 * rate) if rate is not None else 0}px"></span>'
            cells.append(f'<td data-value="{"" if rate is None else repr(rate)}">{bar} {_number(rate, 2)}</td>')
            cells.append(_cell(iou, _number(iou)))
        body.append(f"<tr>{''.join(cells)}</tr>")
    return (f'<section id="classes"><h2>Per class</h2><table class="sortable"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></section>")  # fmt: skip


def _card(entry: MapEntry, methods: Sequence[Method]) -> str:
    row = entry.row
    facts = [entry.label, f"confidence {_number(row.get('probability'))}"]
    figures = []
    for method in methods:
        record = row.get(method.field)
        caption = method.name + (f": IoU {_number(record['best_iou'], 2)}, {_verdict(record)}" if record else "")
        figures.append(f'<figure><img src="{_text(entry.thumbnails[method.name])}" alt="{_text(method.name)} map of '
                       f'{_text(row["image"])}"><figcaption>{_text(caption)}</figcaption></figure>')  # fmt: skip
    return (f'<div class="card"><div class="name">{_text(row["image"])}</div><div>{_text(", ".join(facts))}</div>'
            f"{''.join(figures)}</div>")  # fmt: skip


def _cases(entries: Sequence[MapEntry], methods: Sequence[Method], scored: bool) -> str:
    """The worst and best maps: by L2-CAF's IoU with the boxes, or without annotations by confidence."""
    if scored:
        ranked = sorted((e for e in entries if e.scored), key=lambda e: (e.row[L2CAF.field]["best_iou"], e.number))
        title, by = "Worst and best maps", "L2-CAF's box IoU"
    else:
        ranked = sorted((e for e in entries if e.row.get("probability") is not None),
                        key=lambda e: (e.row["probability"], e.number))  # fmt: skip
        title, by = "Least and most confident maps", "the model's probability of the map's class"
    if not ranked:
        return ""
    lowest = min(CASES_SHOWN, (len(ranked) + 1) // 2)  # no map in both galleries
    worst = "".join(_card(entry, methods) for entry in ranked[:lowest])
    best = "".join(_card(entry, methods) for entry in reversed(ranked[lowest:][-CASES_SHOWN:]))
    return (f'<section id="cases"><h2>{title}</h2><p>By {by}.</p><h3>Lowest</h3><div class="gallery">{worst}</div>'
            f'<h3>Highest</h3><div class="gallery">{best}</div></section>')  # fmt: skip


def _table(entries: Sequence[MapEntry], methods: Sequence[Method], scored: bool) -> str:
    """Every map: a row each, sortable by any column, with the overlays."""
    head = ["<th data-type='number'>#</th>", "<th data-type='text'>image</th>", "<th data-type='text'>class</th>",
            "<th>confidence</th>", "<th>objective</th>"]  # fmt: skip
    if scored:
        for method in methods:
            head += [f"<th data-type='text'>{_text(method.name)} hit</th>", f"<th>{_text(method.name)} IoU</th>"]
    head += [f"<th class='picture'>{_text(method.name)}</th>" for method in methods]
    body = []
    for entry in entries:
        row = entry.row
        cells = [_cell(entry.number, str(entry.number + 1)), _cell(row["image"], row["image"], number=False),
                 _cell(entry.label, entry.label, number=False),
                 _cell(row.get("probability"), _number(row.get("probability"))),
                 _cell(row.get("objective"), _number(row.get("objective"), 4))]  # fmt: skip
        if scored:
            for method in methods:
                record = row.get(method.field)
                iou = record["best_iou"] if record else None
                cells.append(_cell(_verdict(record) or None, _verdict(record), number=False))
                cells.append(_cell(iou, _number(iou)))
        for method in methods:
            cells.append(f'<td class="picture"><a href="{_text(entry.thumbnails[method.name])}"><img loading="lazy" '
                         f'src="{_text(entry.thumbnails[method.name])}" alt="{_text(method.name)} map"></a></td>')  # fmt: skip
        search = f"{row['image']} {entry.label}".lower()
        verdict = _verdict(row.get(L2CAF.field)) or "none"
        body.append(f'<tr data-search="{_text(search)}" data-verdict="{verdict}">{"".join(cells)}</tr>')
    verdicts = ('<select id="verdict" aria-label="L2-CAF verdict"><option value="">hits and misses</option>'
                '<option value="hit">L2-CAF hits</option><option value="miss">L2-CAF misses</option>'
                '<option value="absent">classes the image has no box of</option></select>'
                if scored else "")  # fmt: skip
    return (f'<section id="maps"><h2>Every map</h2><p class="controls"><input id="filter" type="search" '
            f'placeholder="filter by image or class" aria-label="filter">{verdicts} <span id="shown"></span></p>'
            f'<table id="map-table" class="sortable"><thead><tr>{"".join(head)}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></section>")  # fmt: skip


def _failed(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return ""
    items = "".join(f"<li><b>{_text(row['image'])}</b>: {_text(row.get('error', ''))}</li>" for row in rows)
    return f'<section id="failed"><h2>Failed images</h2><ul>{items}</ul></section>'


def _page(
    out: Path, config: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], entries: Sequence[MapEntry],
    failed: Sequence[Mapping[str, Any]], methods: Sequence[Method],
) -> str:  # fmt: skip
    scored = any(entry.scored for entry in entries)
    legend = ('<p class="legend">Overlays: the map over the image as the model saw it (red high, blue low)'
              + ('; <span style="color:rgb%s">green</span>: the annotated boxes of the map\'s class; '
                 '<span style="color:#b89500">yellow</span>: the CAM protocol\'s box' % (TRUE_BOX,) if scored else "")
              + ".</p>")  # fmt: skip
    sections = [_settings(out, config, rows), legend, _summary(rows, methods) if scored else "",
                _classes(entries, methods, scored), _cases(entries, methods, scored), _table(entries, methods, scored),
                _failed(failed)]  # fmt: skip
    nav = " · ".join(f'<a href="#{anchor}">{name}</a>' for anchor, name in
                     (("summary", "summary"), ("classes", "per class"), ("cases", "worst and best"),
                      ("maps", "every map"), ("failed", "failed")) if f'id="{anchor}"' in "".join(sections))  # fmt: skip
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">{CSP}<title>caffast run: "
            f"{_text(out.name or out)}</title><style>{STYLE}</style></head><body><nav>{nav}</nav>{''.join(sections)}"
            f"<script>{SCRIPT}</script></body></html>\n")  # fmt: skip


# nothing but the page's own script and style, and images beside it: no request leaves the folder
CSP = ("<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src 'self' file:; "
       "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">")  # fmt: skip

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
nav { margin-bottom: 1em; } h1 { font-size: 1.5em; } h2 { margin-top: 1.5em; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; } dt { font-weight: bold; } dd { margin: 0; }
table { border-collapse: collapse; } th, td { padding: 0.25em 0.6em; border-bottom: 1px solid #ddd; text-align: left; }
table.sortable th { cursor: pointer; user-select: none; background: #f4f4f4; }
th[aria-sort=ascending]::after { content: " \\25B2"; } th[aria-sort=descending]::after { content: " \\25BC"; }
td.picture img { width: 96px; display: block; }
.bar { display: inline-block; height: 0.7em; background: #4a7; vertical-align: middle; }
.gallery { display: flex; flex-wrap: wrap; gap: 1em; }
.card { border: 1px solid #ccc; border-radius: 4px; padding: 0.5em; }
.card .name { font-weight: bold; word-break: break-all; max-width: 340px; }
figure { display: inline-block; margin: 0.3em 0.3em 0 0; } figcaption { font-size: 0.85em; }
.controls input { width: 18em; padding: 0.2em; }
"""

SCRIPT = """
(function () {
  function key(cell) { return cell.getAttribute("data-value"); }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    var headers = table.querySelectorAll("th");
    headers.forEach(function (header, column) {
      if (header.classList.contains("picture")) return;
      header.addEventListener("click", function () {
        var ascending = header.getAttribute("aria-sort") !== "ascending";
        headers.forEach(function (other) { other.removeAttribute("aria-sort"); });
        header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
        var text = header.getAttribute("data-type") === "text";
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = key(a.cells[column]), y = key(b.cells[column]);
          if (x === "" || y === "") return (x === "") - (y === "");  /* empty cells last */
          var order = text ? x.localeCompare(y) : parseFloat(x) - parseFloat(y);
          return ascending ? order : -order;
        });
        rows.forEach(function (row) { body.appendChild(row); });
      });
    });
  });
  var table = document.getElementById("map-table");
  if (!table) return;
  var filter = document.getElementById("filter"), verdict = document.getElementById("verdict");
  var shown = document.getElementById("shown");
  function apply() {
    var words = filter.value.trim().toLowerCase(), wanted = verdict ? verdict.value : "";
    var rows = table.tBodies[0].rows, count = 0;
    for (var i = 0; i < rows.length; i++) {
      var keep = rows[i].getAttribute("data-search").indexOf(words) >= 0 &&
                 (!wanted || rows[i].getAttribute("data-verdict") === wanted);
      rows[i].hidden = !keep;
      count += keep ? 1 : 0;
    }
    shown.textContent = count + " of " + rows.length + " maps shown";
  }
  filter.addEventListener("input", apply);
  if (verdict) verdict.addEventListener("change", apply);
  apply();
})();
"""
