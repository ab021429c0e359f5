"""Annotation files -> one row per annotated video, bad rows kept with an error.

Formats (`format="auto"` picks by extension: `.csv` kinetics, or ssv1 when its first line has no
`youtube_id` and a `;` or no comma; `.json` ssv2; anything else list):

- `kinetics`: CSV with a header holding `youtube_id,time_start,time_end` and optionally `label`
  and `split` (the official Kinetics-400/600/700 files). The video of a row is
  `<youtube_id>_<time_start:06d>_<time_end:06d>.mp4` under the videos URI, placed by `layout`:
  `flat` (default: every clip in one folder, as the CVDF Kinetics archives unpack per split when
  `--videos` names that folder), `split` (`<split>/<file>`, the CVDF archives unpacked side by
  side) or `label` (`<label>/<file>`, the ActivityNet downloader's layout; the label as written
  in the CSV).
- `ssv2`: Something-Something v2 JSON, a list of `{"id", "template", ...}`. The class is the
  template without brackets (`"Holding [something]"` -> `"Holding something"`), else `label`;
  the video is `<id>.webm`. Give the official `something-something-v2-labels.json` as the
  labels file to keep the official class indices.
- `ssv1`: Something-Something V1's `something-something-v1-{train,validation,test}.csv`: lines
  `id;label name` (`id` alone in the test file). The video is the frame folder `<id>` (JPEG frames
  `<id>/00001.jpg` ..., `pipeline.data.frames`). Give `--labels ssv1` to keep the official checkpoints'
  class indices (the names sorted), or the official `something-something-v1-labels.csv` for its line order.
- `list`: lines `relative/path label [split]`, split on tabs when the line has one (paths with
  spaces), else on whitespace; `#` starts a comment line. The label is an index when it is an
  integer, else a name.

Splits: a row's own `split` column wins, then the `split` given by the caller, then the file's
name (`train*`, `val*`/`valid*`, `test*` as a word of it, e.g. `something-something-v2-train.json`,
`kinetics400/validate.csv`, `val.txt`), else `train`. `validate`/`validation`/`valid` are written
`val`.

Label indices: fixed by a labels file when one is given (a JSON list of names, a JSON object
name -> index as SSv2 ships it, or one name per line; `k400`, `k600`, `ssv1` or `ssv2` name the official
checkpoints' lists, `pipeline.data.official`); otherwise the sorted label names of all
annotation files together, so every split of one preparation shares them. A list whose labels
are all integers and that has no labels file uses those integers, named "0", "1", ...
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass, replace
from typing import Any, Literal

from pipeline.config import StorageConfig
from pipeline.data import storage as st

Format = Literal["auto", "kinetics", "ssv1", "ssv2", "list"]
Layout = Literal["flat", "split", "label"]
FORMATS = ("auto", "kinetics", "ssv1", "ssv2", "list")
LAYOUTS = ("flat", "split", "label")
_SPLIT_ALIASES = {"validate": "val", "validation": "val", "valid": "val"}


class AnnotationError(ValueError):
    """A whole annotation or labels file is unusable; the message names it and the fix."""


@dataclass(frozen=True)
class AnnotationRow:
    path: str             # relative to the videos URI ("" when it could not be derived)
    label_name: str       # "" when unknown
    label: int            # -1 when unknown (or not yet resolved)
    split: str
    error: str = ""       # non-empty: a bad row, prepared as status `bad_annotation`
    where: str = ""       # file:line it came from

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "label_name": self.label_name, "label": self.label, "split": self.split,
                "error": self.error, "where": self.where}


@dataclass(frozen=True)
class Annotations:
    rows: list[AnnotationRow]
    labels: list[str]     # index -> name

    def __repr__(self) -> str:
        bad = sum(1 for r in self.rows if r.error)
        return f"Annotations(rows={len(self.rows)}, bad_rows={bad}, labels={len(self.labels)})"


# ---------------------------------------------------------------------------------------------
# Splits and labels


def normalize_split(split: str) -> str:
    split = split.strip().lower()
    return _SPLIT_ALIASES.get(split, split)


def split_from_name(uri: str) -> str | None:
    """`train`, `val` or `test` when a word of the file name says so, else None."""
    name = os.path.basename(uri.rstrip("/")).lower()
    for word in re.split(r"[^a-z0-9]+", name):
        for prefix, split in (("train", "train"), ("val", "val"), ("test", "test")):
            if word.startswith(prefix):
                return split
    return None


def parse_labels(text: str, *, source: str = "labels") -> list[str]:
    """Names in index order from a JSON list, a JSON object name -> index, or one name per line."""
    stripped = text.strip()
    names: list[str]
    if stripped.startswith(("[", "{")):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as err:
            raise AnnotationError(f"{source}: not valid JSON ({err.msg} at line {err.lineno})") from None
        if isinstance(data, list):
            names = [str(n) for n in data]
        else:
            try:
                index = {str(name): int(i) for name, i in data.items()}
            except (TypeError, ValueError):
                raise AnnotationError(f"{source}: a labels object must map names to integer indices") from None
            names = [""] * len(index)
            for name, i in index.items():
                if not 0 <= i < len(index) or names[i]:
                    raise AnnotationError(f"{source}: indices must be 0..{len(index) - 1}, each once; "
                                          f"{name!r} has {i}")
                names[i] = name
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise AnnotationError(f"{source}: no labels")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise AnnotationError(f"{source}: label {name!r} appears twice")
        seen.add(name)
    return names


def labels_json(labels: list[str]) -> str:
    """The `labels.json` that `prepare` writes: a JSON list, position = class index."""
    return json.dumps(labels, indent=1, ensure_ascii=False) + "\n"


def resolve_labels(rows: list[AnnotationRow], labels: list[str] | None = None) -> Annotations:
    """Give every row both its label name and index (see the module docstring for the rules)."""
    fixed = labels is not None
    named = sorted({r.label_name for r in rows if not r.error and r.label_name})
    if labels is None:
        indexed = [r.label for r in rows if not r.error and not r.label_name and r.label >= 0]
        labels = [str(i) for i in range(max(indexed) + 1)] if indexed and not named else named
    index = {name: i for i, name in enumerate(labels)}
    out = []
    for row in rows:
        if row.error:
            out.append(row)
        elif row.label_name:
            if row.label_name in index:
                out.append(replace(row, label=index[row.label_name]))
            else:
                out.append(replace(row, label=-1, error=f"label {row.label_name!r} is not in the labels file "
                                                        f"({len(labels)} labels)"))
        elif row.label >= 0:
            if not fixed and named:
                out.append(replace(row, label=-1, error=f"label index {row.label} given while other rows use "
                                                        "names; pass a labels file to map indices to names"))
            elif row.label >= len(labels):
                out.append(replace(row, label=-1, error=f"label index {row.label} is out of range for "
                                                        f"{len(labels)} labels"))
            else:
                out.append(replace(row, label_name=labels[row.label]))
        else:
            out.append(row)  # unlabelled (e.g. a test split)
    return Annotations(out, list(labels))


def _row_split(row_split: str | None, split: str | None, default: str) -> str:
    if row_split and row_split.strip():
        return normalize_split(row_split)
    return normalize_split(split) if split else default


def _label_missing(split: str) -> str:
    return "" if split == "test" else "missing label"


# ---------------------------------------------------------------------------------------------
# Formats


def _int_time(value: str) -> int:
    number = float(value)
    if number < 0 or number != int(number):
        raise ValueError
    return int(number)


def parse_kinetics(text: str, *, source: str, split: str | None = None,
                   layout: Layout = "flat") -> list[AnnotationRow]:
    """Rows of a Kinetics CSV (labels unresolved: names only)."""
    if layout not in LAYOUTS:
        raise AnnotationError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    reader = csv.DictReader(io.StringIO(text))
    fields = [f.strip() for f in (reader.fieldnames or [])]
    needed = ("youtube_id", "time_start", "time_end")
    if not all(f in fields for f in needed):
        raise AnnotationError(f"{source}: a Kinetics CSV needs the header columns {','.join(needed)} "
                              f"(and label, split); found {','.join(fields) or 'none'}")
    default = split_from_name(source) or "train"
    rows = []
    for lineno, raw in enumerate(reader, start=2):
        rec = {(k or "").strip(): (v or "").strip() if isinstance(v, str) else "" for k, v in raw.items()}
        where = f"{source}:{lineno}"
        row_split = _row_split(rec.get("split"), split, default)
        label = rec.get("label", "")
        ytid = rec.get("youtube_id", "")
        error, path = "", ""
        if None in raw:
            error = f"{len(fields) + len(raw[None])} fields, the header has {len(fields)}"
        elif not ytid:
            error = "empty youtube_id"
        else:
            try:
                start, end = _int_time(rec["time_start"]), _int_time(rec["time_end"])
            except ValueError:
                error = f"time_start/time_end {rec['time_start']!r}/{rec['time_end']!r} are not whole seconds"
            else:
                if end <= start:
                    error = f"time_end {end} is not after time_start {start}"
                name = f"{ytid}_{start:06d}_{end:06d}.mp4"
                path = {"flat": name, "split": f"{row_split}/{name}",
                        "label": f"{label}/{name}" if label else name}[layout]
        if not error and not label:
            error = _label_missing(row_split)
        rows.append(AnnotationRow(path, label, -1, row_split, error, where))
    return rows


def ssv2_class_name(template: str) -> str:
    return template.replace("[", "").replace("]", "")


def parse_ssv2(text: str, *, source: str, split: str | None = None) -> list[AnnotationRow]:
    """Rows of a Something-Something v2 JSON list."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{source}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, list):
        raise AnnotationError(f"{source}: Something-Something annotations are a JSON list of objects, "
                              f"got a JSON {type(data).__name__}")
    default = _row_split(None, split, split_from_name(source) or "train")
    rows = []
    for i, item in enumerate(data):
        where = f"{source}:[{i}]"
        if not isinstance(item, dict):
            rows.append(AnnotationRow("", "", -1, default, f"entry is a {type(item).__name__}, not an object", where))
            continue
        row_split = _row_split(item.get("split") if isinstance(item.get("split"), str) else None, split, default)
        vid = str(item.get("id", "")).strip()
        if "template" in item:
            label = ssv2_class_name(str(item["template"])).strip()
        else:
            label = str(item.get("label", "")).strip()
        error = ""
        if not vid or "/" in vid:
            error = f"bad id {item.get('id')!r}"
        elif not label:
            error = _label_missing(row_split)
        rows.append(AnnotationRow(f"{vid}.webm" if vid and "/" not in vid else "", label, -1, row_split, error, where))
    return rows


def parse_ssv1(text: str, *, source: str, split: str | None = None) -> list[AnnotationRow]:
    """Rows of a Something-Something V1 CSV: `id;label name` per line (the test file: `id`)."""
    default = _row_split(None, split, split_from_name(source) or "train")
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{source}:{lineno}"
        vid, sep, label = (part.strip() for part in line.partition(";"))
        error = ""
        if not vid or "/" in vid or vid in (".", ".."):
            error = f"bad id {vid!r} (expected 'id;label name')"
        elif not label:
            error = _label_missing(default)
        elif ";" in label:
            error = f"{line.count(';') + 1} fields separated by ';', expected 'id;label name'"
        rows.append(AnnotationRow(vid if not error.startswith("bad id") else "", label, -1, default, error, where))
    return rows


def parse_list(text: str, *, source: str, split: str | None = None) -> list[AnnotationRow]:
    """Rows of a `path label [split]` list (labels: an integer is an index, else a name)."""
    default = _row_split(None, split, split_from_name(source) or "train")
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{source}:{lineno}"
        fields = [f.strip() for f in line.split("\t")] if "\t" in line else line.split()
        if len(fields) not in (2, 3) or not all(fields):
            rows.append(AnnotationRow(fields[0] if fields else "", "", -1, default,
                                      f"expected 'path label [split]', got {len(fields)} field(s)", where))
            continue
        path, label = fields[0], fields[1]
        row_split = _row_split(fields[2] if len(fields) == 3 else None, split, default)
        if re.fullmatch(r"-?\d+", label):
            index = int(label)
            if index < 0:
                rows.append(AnnotationRow(path, "", -1, row_split, f"negative label index {index}", where))
            else:
                rows.append(AnnotationRow(path, "", index, row_split, "", where))
        else:
            rows.append(AnnotationRow(path, label, -1, row_split, "", where))
    return rows


def detect_format(uri: str, text: str = "") -> str:
    lower = uri.lower()
    if lower.endswith(".csv"):
        first = next((line for line in text.splitlines() if line.strip()), "")
        # SSv1's CSVs: `id;label` lines, or bare ids (its test file); a Kinetics CSV has a comma header.
        return "ssv1" if "youtube_id" not in first and (";" in first or "," not in first) else "kinetics"
    return "ssv2" if lower.endswith(".json") else "list"


def parse_annotations(text: str, *, format: Format, source: str, split: str | None = None,
                      layout: Layout = "flat") -> list[AnnotationRow]:
    """Rows of one annotation file's text, labels not yet resolved (see `resolve_labels`)."""
    fmt = detect_format(source, text) if format == "auto" else format
    if fmt == "kinetics":
        return parse_kinetics(text, source=source, split=split, layout=layout)
    if fmt == "ssv1":
        return parse_ssv1(text, source=source, split=split)
    if fmt == "ssv2":
        return parse_ssv2(text, source=source, split=split)
    if fmt == "list":
        return parse_list(text, source=source, split=split)
    raise AnnotationError(f"format {format!r} is not one of {', '.join(FORMATS)}")


def _read_text(uri: str, storage: StorageConfig) -> str:
    data = st.read_bytes(uri, storage=storage)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise AnnotationError(f"{uri}: not UTF-8 text") from None


def read_labels(uri: str, *, storage: StorageConfig = StorageConfig()) -> list[str]:
    """Label names in index order from a labels file (`labels.json` or any accepted form)."""
    return parse_labels(_read_text(uri, storage), source=uri)


def load_annotations(uris: str | list[str], *, format: Format = "auto", labels_uri: str | None = None,
                     split: str | None = None, layout: Layout = "flat",
                     storage: StorageConfig = StorageConfig()) -> Annotations:
    """Parse one or more annotation files into rows with resolved, shared label indices."""
    rows: list[AnnotationRow] = []
    for uri in [uris] if isinstance(uris, str) else uris:
        rows += parse_annotations(_read_text(uri, storage), format=format, source=uri, split=split, layout=layout)
    return resolve_labels(rows, labels_of(labels_uri, storage=storage) if labels_uri else None)


def labels_of(labels: str, *, storage: StorageConfig = StorageConfig()) -> list[str]:
    """The names of a labels file, or of an official dataset's list (`k400`, `k600`, `ssv1`, `ssv2`)."""
    from pipeline.data import official

    return official.class_list(labels) if labels in official.DATASETS else read_labels(labels, storage=storage)
