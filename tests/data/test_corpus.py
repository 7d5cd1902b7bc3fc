"""Documents of a corpus: the embedded standard library, text and JSON-lines files with
one-line errors, the seeded split by document, and the cut of fewer than 3 documents."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from advarch.data.corpus import (
    MIN_PIECE_CHARS,
    cut_documents,
    matched_files,
    read_jsonl,
    read_text_file,
    split_documents,
    stdlib_files,
)


def test_split_is_by_document_and_seeded() -> None:
    a = split_documents(100, 0.1, 0.1, seed=3)
    b = split_documents(100, 0.1, 0.1, seed=3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert sorted(np.concatenate(list(a.values())).tolist()) == list(range(100))
    assert not np.array_equal(a["val"], split_documents(100, 0.1, 0.1, seed=4)["val"])


def test_embedded_corpus_is_the_stdlib_without_tests() -> None:
    files = stdlib_files()
    assert len(files) > 300
    assert not any("/test/" in str(f) or "idlelib" in str(f) for f in files)


def test_text_and_json_lines_files_are_read_and_bad_ones_named(tmp_path: Path) -> None:
    good = tmp_path / "a.jsonl"
    good.write_text(json.dumps({"text": "héllo"}) + "\n\n" + json.dumps({"text": "x"}) + "\n")
    assert read_jsonl(str(good), "text") == {0: "héllo", 1: "x"}
    separators = ["a\u2028b", "c\u0085d", "e\u2029f"]  # raw in JSON strings (ensure_ascii=False)
    odd = tmp_path / "odd.jsonl"
    rows = [json.dumps({"text": t}, ensure_ascii=False) for t in separators]
    odd.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(rows).encode())  # a BOM, Windows line ends
    assert list(read_jsonl(str(odd), "text").values()) == separators
    assert read_text_file(str(good)).startswith('{"text"')
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no"}) + "\n")
    with pytest.raises(ValueError, match=r"b.jsonl:2: no string field 'text' \(data.text_field\)"):
        read_jsonl(str(bad), "text")
    (tmp_path / "c.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"c.jsonl:1: invalid JSON"):
        read_jsonl(str(tmp_path / "c.jsonl"), "text")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.txt is empty \(0 bytes\)"):
        read_text_file(str(tmp_path / "empty.txt"))


def test_a_split_needs_three_documents_and_sane_fractions() -> None:
    with pytest.raises(ValueError, match="need at least 3 documents"):
        split_documents(2, 0.1, 0.1, seed=0)
    with pytest.raises(ValueError, match="data.val_fraction=0.6 and data.test_fraction=0.5"):
        split_documents(10, 0.6, 0.5, seed=0)
    parts = split_documents(3, 0.01, 0.01, seed=0)
    assert [len(parts[k]) for k in ("train", "val", "test")] == [1, 1, 1]  # one doc each at least


def test_a_files_glob_matches_files_not_folders(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "dir.txt").mkdir()  # a folder named like a document
    for name in ("a/one.txt", "a/b/two.py", "three.md"):
        (tmp_path / name).write_text("text")
    assert matched_files(f"{tmp_path}/**") == [
        str(tmp_path / n) for n in ("a/b/two.py", "a/one.txt", "three.md")
    ]
    assert matched_files(f"{tmp_path}/*.txt") == []


def test_a_json_line_without_the_field_names_the_fields_it_has(tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"body": "a", "title": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"rows.jsonl:1: no string field 'text' "
                       r"\(data.text_field\); its fields: body, title$"):  # fmt: skip
        read_jsonl(str(rows), "text")
    rows.write_text('{"text": 3}\n[1]\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:1: .*; it is 3$"):
        read_jsonl(str(rows), "text")


def test_one_document_is_cut_at_line_ends_into_about_a_hundred_pieces() -> None:
    book = "".join(f"line {i} of the book\n" for i in range(40_000))  # ~840 000 characters
    names, pieces = cut_documents(["book.txt"], [book])
    assert 90 <= len(pieces) <= 100 and "".join(pieces) == book
    assert all(p.endswith("\n") and len(p) >= MIN_PIECE_CHARS for p in pieces)
    assert names[:2] == ["book.txt:1", f"book.txt:{pieces[0].count(chr(10)) + 1}"]
    assert cut_documents(["book.txt"], [book]) == (names, pieces)  # deterministic


def test_a_line_too_long_is_cut_after_a_space_and_more_documents_stay_whole() -> None:
    line = "word " * 6000  # 30 000 characters, no line end
    names, pieces = cut_documents(["a#0", "b#0"], [line, "short"])
    assert "".join(pieces) == line + "short" and len(pieces) == 8
    assert all(p.endswith(" ") for p in pieces[:-2]) and names[1] == "a#0:1:4101"
    three = (["a", "b", "c"], ["x", "y", "z"])
    assert cut_documents(*three) == three  # split by document, as before


def test_a_document_too_small_even_cut_is_one_line_saying_what_to_add() -> None:
    with pytest.raises(ValueError, match=r"^data: 1 document \(a.cpp, 9000 characters\): too "
                       r"small to split into train/val/test even cut at line ends into pieces "
                       r"of at least 4096 characters \(2 of the 3 needed\); add text"):  # fmt: skip
        cut_documents(["a.cpp"], [("x" * 99 + "\n") * 90])


def test_a_json_line_holding_a_lone_surrogate_is_named_or_read_as_utf8(tmp_path: Path) -> None:
    """`"\\ud83d"` (half of an emoji's UTF-16 pair, as truncated scraped text holds) is valid
    JSON, but no UTF-8 text: json.loads returns a str that cannot be encoded, and the build
    then failed in the tokenizer with `'utf-8' codec can't encode character '\\ud83d' in
    position 4200`, naming neither the file nor the row. A .json table's reader drops it."""
    rows = tmp_path / "a.jsonl"
    rows.write_text('{"text": "fine"}\n{"text": "cut emoji \\ud83d here"}\n')
    try:
        texts = read_jsonl(str(rows), "text")
    except ValueError as err:  # refused, naming the row
        assert "a.jsonl:2" in str(err)
        return
    for text in texts.values():
        text.encode("utf-8")  # what the tokenizers and the byte counts do with it


def test_a_byte_order_mark_is_no_part_of_a_text_file(tmp_path: Path) -> None:
    # (hunter 37: a plain text file kept it as three byte tokens; JSON lines and CSV drop it)
    marked = tmp_path / "a.txt"
    marked.write_bytes("\ufeffdef f():\n".encode())
    assert read_text_file(str(marked)) == "def f():\n"
