"""Where a text corpus's documents come from, with one-line errors naming the file or key:
local files (tables by suffix, any other file one UTF-8 text document), a folder written by
`Dataset.save_to_disk` / `DatasetDict.save_to_disk`, or a Hugging Face Hub dataset.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Any

from advarch.data.corpus import (
    NoTextRows,
    hub_reachable,
    read_jsonl,
    read_text_file,
    rows_with_text,
    what_row_holds,
)
from advarch.reasons import short_reason

# Files read as tables (one document per row, its `data.text_field`), by suffix; any other
# file is one text document (.txt, .md, .py, .cpp, .html, .tex, no suffix …), and so is a
# .json file holding one object (a package.json in a code folder), not rows.
TABLE_BUILDERS = {".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
log = logging.getLogger("advarch")
SAVED_METADATA = ("state.json", "dataset_info.json", "dataset_dict.json")


def file_documents(paths: list[str], field: str) -> tuple[list[str], list[str]]:
    """(names, texts) of the documents of local files: a table's rows (`<file>#<row>`), or a
    whole text file (its path). Empty files are left out, said in one line (a code folder's
    `__init__.py`, `.gitkeep`); a glob of nothing but empty files is refused naming one."""
    for path in paths:  # before reading any: the hint is what the user needs
        refuse_saved_metadata(path)
    empty = [p for p in paths if os.path.getsize(p) == 0]
    if empty and len(empty) == len(paths):
        read_text_file(empty[0])  # (its one-line error)
    if empty:
        log.info("data.files: left out %d empty file(s), e.g. %s", len(empty), empty[0])
    names: list[str] = []
    texts: list[str] = []
    without_text: list[NoTextRows] = []  # tables whose rows hold none: left out as empty files
    for path in (p for p in paths if p not in set(empty)):
        try:
            rows = table_rows(path, field)
        except NoTextRows as err:
            without_text.append(err)
            continue
        if rows is None:
            names.append(path)
            texts.append(read_text_file(path))
        else:
            names += [f"{path}#{i}" for i in rows]
            texts += rows.values()
    if without_text and not texts:
        raise without_text[0]
    if without_text:
        example = str(without_text[0]).removeprefix("data.files: ")
        log.info("data.files: left out %d table(s) without text, e.g. %s", len(without_text),
                 example)  # fmt: skip
    return names, texts


def table_rows(path: str, field: str) -> dict[int, str] | None:
    """Row number → `field` of the rows of a table file that hold text (`rows_with_text`), or
    None if `path` is not a table."""
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path, field)
    if suffix in (".csv", ".tsv"):
        return csv_texts(path, field)
    builder = TABLE_BUILDERS.get(suffix)
    kind = json_kind(path, field) if suffix == ".json" else "rows"
    if builder is None or kind == "document":
        return None
    if kind == "no rows":  # (datasets' own words: 'Instruction "train" corresponds to no data!')
        raise NoTextRows(f"data.files: {path} holds no rows")
    return column_texts(read_table(path, builder), field, "data.files", path)


def json_kind(path: str, field: str) -> str:
    """What a .json file holds: `document`, one JSON object without `field` (a package.json:
    a text document); `no rows`, an empty list; else `rows` (a list, JSON lines, or one
    object holding its text in `field`)."""
    try:
        value = json.loads(read_text_file(path))
    except json.JSONDecodeError:  # (JSON lines in a .json file: rows)
        return "rows"
    if isinstance(value, dict) and field not in value:
        nested = [k for k, v in value.items() if isinstance(v, list) and v
                  and all(isinstance(row, dict) for row in v)]  # fmt: skip
        if nested:  # (rows under a key, as HF and SQuAD files hold them: trained on as text)
            log.warning("data.files: %s holds rows under %r, not a list of rows: read as one "
                        "text document (a list of rows or JSON lines is a table)", path,
                        nested[0])  # fmt: skip
        return "document"
    return "no rows" if value == [] else "rows"


CSV_CELL_LIMIT = 2**31 - 1  # characters a CSV cell may hold: any document (a C long's bound)


def csv_delimiter(f: Any, field: str) -> str:
    """The separator of a CSV file: the first of `,`, `;`, tab and `|` whose split of the
    header names `field` (where none does, the one that splits it most: an error lists its
    columns); `f` is left at its start."""
    header = f.readline()
    f.seek(0)
    columns = {d: next(csv.reader([header], delimiter=d), []) for d in ",;\t|"}
    fits = (d for d, names in columns.items() if field in names)
    return next(fits, max(columns, key=lambda d: len(columns[d])))


def csv_texts(path: str, field: str) -> dict[int, str]:
    """Row number → `field` cell of a CSV file's rows with text (`rows_with_text`), as typed: a
    table reader would guess types (an all-number column became ints)."""
    csv.field_size_limit(CSV_CELL_LIMIT)  # (Python's default, 128 KiB, refused long documents)
    with open(path, newline="", encoding="utf-8-sig") as f:
        try:
            reader = csv.DictReader(f, delimiter=csv_delimiter(f, field))
            columns = reader.fieldnames or []
            if field not in columns:
                raise ValueError(
                    f"data.text_field={field!r} is not a column of {path!r} "
                    f"(columns: {', '.join(columns) or 'none'})"
                )
            cells = [row[field] for row in reader]
        except (csv.Error, UnicodeDecodeError) as err:
            raise ValueError(f"data.files: cannot read {path}: {short_reason(err)}") from err
    return rows_with_text(cells, "data.files", path, field)


def read_table(path: str, builder: str) -> Any:
    """A table file as a `datasets.Dataset`; a one-line ValueError names a broken file."""
    import datasets

    datasets_log = logging.getLogger("datasets")  # it logs the error it then raises
    level = datasets_log.level
    datasets_log.setLevel(logging.CRITICAL)
    try:
        return datasets.load_dataset(builder, data_files=path, split="train")
    except Exception as err:  # pyarrow / datasets errors: name the file, one line
        raise ValueError(f"data.files: cannot read {path}: {short_reason(err)}") from err
    finally:
        datasets_log.setLevel(level)


def column_texts(ds: Any, field: str, key: str, name: str) -> dict[int, str]:
    """Row number → `field` of a dataset's rows with text (`rows_with_text`); one-line
    ValueErrors name a missing column (listing those there are) or the first row holding
    neither a string nor null."""
    if field not in ds.column_names:
        raise ValueError(
            f"data.text_field={field!r} is not a column of {name!r} "
            f"(columns: {', '.join(ds.column_names)})"
        )
    column = list(ds[field])
    bad = next((i for i, t in enumerate(column) if not isinstance(t, str | None)), None)
    if bad is not None:  # (JSON lines say the same per line)
        hint = ""
        if isinstance(column[bad], list) and len(column) == 1:
            hint = "; one object of columns is one row: write a list of rows or JSON lines"
        raise ValueError(
            f"{key}: {name}: row {bad}: no string field {field!r} "
            f"(data.text_field; {what_row_holds({field: column[bad]}, field)}){hint}"
        )
    return rows_with_text(column, key, name, field)


def refuse_saved_metadata(path: str) -> None:
    """Refuse, pointing to `data.dataset`, a metadata file of a save_to_disk folder (what
    `data.files=<that folder>/*` matches besides its Arrow files)."""
    file = Path(path)
    if file.name not in SAVED_METADATA or not is_saved_dataset(file.parent):
        return
    root = file.parent
    if (root.parent / "dataset_dict.json").is_file():  # one split of a DatasetDict
        root = root.parent
    raise ValueError(
        f"data.files: {path} belongs to a folder written by save_to_disk: load the folder "
        f"with data.dataset={str(root)!r} instead"
    )


def is_saved_dataset(folder: Path) -> bool:
    """Whether `folder` was written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def local_dataset(name: str) -> Path | None:
    """The folder `data.dataset` names, or None for a Hub name; a one-line ValueError for a
    path that is no save_to_disk folder."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        if is_saved_dataset(folder):
            return folder
        raise ValueError(
            f"data.dataset={name!r} is a folder not written by save_to_disk (no state.json "
            f"or dataset_dict.json); its files are data.files='{name.rstrip('/')}/*'"
        )
    if folder.is_file():
        raise ValueError(f"data.dataset={name!r} is a file; a file of text is data.files={name}")
    if name.startswith(("/", "~", ".")):
        raise ValueError(
            f"data.dataset={name!r}: no such folder (a local dataset is a folder written by "
            "save_to_disk; a Hub dataset is a name such as owner/name)"
        )
    return None


def saved_documents(folder: Path, name: str, field: str) -> tuple[list[str], list[str]]:
    """(names, texts) of a save_to_disk folder: a Dataset's rows, or a DatasetDict's `train`
    split's."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as err:  # a damaged folder: name it, one line
        raise ValueError(f"data.dataset={name!r}: cannot read it ({short_reason(err)})") from err
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            split = next(iter(ds), "<split>")
            raise ValueError(
                f"data.dataset={name!r} holds no 'train' split (splits: {', '.join(ds)}); "
                f"name a split's folder, e.g. data.dataset='{name.rstrip('/')}/{split}'"
            )
        ds = ds["train"]
    rows = column_texts(ds, field, "data.dataset", name)
    return [f"{name}#{i}" for i in rows], list(rows.values())


def folder_files(folder: Path) -> list[tuple[str, int, float]]:
    """(path, size, modification time) of every file under `folder`, sorted: what a cache key
    of a local dataset holds, so it changes when the folder's content does."""
    files = sorted(Path(root, f) for root, _, names in os.walk(folder) for f in names)
    return [(str(p), p.stat().st_size, p.stat().st_mtime) for p in files]


def hub_documents(name: str, field: str) -> tuple[list[str], list[str]]:
    """(names, texts) of a Hub dataset's `train` split; a one-line error when offline."""
    if not hub_reachable():
        raise ConnectionError(
            f"data.dataset={name!r} needs the Hugging Face Hub, which is unreachable "
            "(offline); use data.files=<glob> for local files, or data.dataset=<a folder "
            "written by save_to_disk>"
        )
    import datasets

    ds = datasets.load_dataset(name, split="train")
    rows = column_texts(ds, field, "data.dataset", name)
    return [f"{name}#{i}" for i in rows], list(rows.values())
