"""The output folder of `caffast run`: its layout, its configuration guard, and what is finished.

    OUT/config.json              the settings the results depend on (written once, at the first start)
    OUT/results/REL.npz          per image: filters, maps (T, H, W) float32, iterations, loss, objective,
                                 gradient_norm, targets (T,)
    OUT/overlays/REL.TARGET.png  per image and target, with --overlays ("oblivious" in place of TARGET)
    OUT/records/REL.json         per image: its index rows; written last, so it marks the image finished
    OUT/index.jsonl              every image's rows in image order, rebuilt from the records at the end

REL is the image's path relative to the data folder, suffix included (a.png and a.jpg stay apart).
Every file is written atomically, so a kill leaves whole files; an image is finished exactly when its
record exists, which makes a rerun skip it.  A failed image gets a record too (status "failed" and the
error), so a rerun does not loop on it; `pending(..., retry_failed=True)` hands it out again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .atomic import remove_temporaries, write_json, write_npz, write_text

CONFIG = "config.json"
INDEX = "index.jsonl"


class ConfigMismatch(Exception):
    """OUT already holds results of other settings; the message names them and the fix."""


def _flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class RunFolder:
    """Paths and files of one output folder; every write is atomic."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def result_path(self, image: str) -> Path:
        return self.root / "results" / f"{image}.npz"

    def overlay_path(self, image: str, target: Optional[int]) -> Path:
        return self.root / "overlays" / f"{image}.{'oblivious' if target is None else target}.png"

    def record_path(self, image: str) -> Path:
        return self.root / "records" / f"{image}.json"

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    # the configuration guard

    def claim(self, config: dict[str, Any]) -> None:
        """Write `config` at the first start; afterwards refuse any other configuration.

        Also removes the temporary files of a killed run: call it while no process writes here.
        """
        path = self.root / CONFIG
        config = json.loads(json.dumps(config))  # compare as it reads back: tuples become lists
        if path.exists():
            try:
                stored = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                raise ConfigMismatch(
                    f"{path} cannot be read ({error}), so the results in {self.root} cannot be trusted: "
                    "pass another --out, or delete that folder to start over"
                ) from None
            differences = self._differences(stored, config)
            if differences:
                raise ConfigMismatch(
                    f"{self.root} holds results of other settings ({'; '.join(differences)}): rerun with the "
                    "settings of its config.json to finish it, or pass another --out"
                )
        else:
            if self.root.is_dir() and any(self.root.iterdir()):
                raise ConfigMismatch(
                    f"{self.root} is not empty and holds no {CONFIG}, so it is not a caffast run folder (or its "
                    "settings were lost): pass a new or empty --out"
                )
            self.root.mkdir(parents=True, exist_ok=True)
            write_json(path, config)
        remove_temporaries(self.root, recursive=False)
        for part in ("results", "overlays", "records"):
            remove_temporaries(self.root / part)

    @staticmethod
    def _differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
        before, now = _flatten(stored), _flatten(current)

        def shown(settings: dict[str, Any], key: str) -> str:
            return repr(settings[key]) if key in settings else "unset"

        return [
            f"{key} {shown(before, key)} there, {shown(now, key)} now"
            for key in sorted(set(before) | set(now))
            if key not in before or key not in now or before[key] != now[key]
        ]

    # what is finished

    def read_record(self, image: str) -> Optional[list[dict[str, Any]]]:
        """The index rows of a finished image, or None when it is not finished."""
        try:
            return json.loads(self.record_path(image).read_text(encoding="utf-8"))["rows"]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # no record yet (a record is never partial: it is written atomically)

    def pending(self, images: list[str], retry_failed: bool) -> list[str]:
        """The images still to explain: those with no record, and with `retry_failed` the failed ones."""
        if not retry_failed:
            return [image for image in images if not self.record_path(image).is_file()]
        return [image for image in images if not self._finished_well(image)]

    def _finished_well(self, image: str) -> bool:
        rows = self.read_record(image)
        return rows is not None and all(row["status"] == "done" for row in rows)

    # writing an image's outputs: results and overlays first, the record last

    def write_result(self, image: str, arrays: dict[str, np.ndarray]) -> Path:
        path = self.result_path(image)
        write_npz(path, arrays)
        return path

    def write_record(self, image: str, rows: list[dict[str, Any]]) -> None:
        write_json(self.record_path(image), {"image": image, "rows": rows})

    def write_index(self, images: list[str]) -> int:
        """Rebuild index.jsonl from the records of `images`, in their order; returns the row count."""
        lines = [json.dumps(row) for image in images for row in (self.read_record(image) or [])]
        write_text(self.root / INDEX, "".join(f"{line}\n" for line in lines))
        return len(lines)
