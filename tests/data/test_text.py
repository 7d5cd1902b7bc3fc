"""The text datamodule: sources, document-level splits, tokenizers, packing and the cache."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from advarch.data.text import TextDataModule

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
WORDS += ["eta", "theta", "iota", "kappa", "lambda", "mu"]


def write_corpus(folder: Path, n: int = 12) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    docs = [" ".join(rng.choice(WORDS, 200)) + f" doc{i}" for i in range(n)]
    for i, d in enumerate(docs[: n // 3]):
        (folder / f"d{i}.txt").write_text(d)
    with (folder / "more.jsonl").open("w") as f:
        for d in docs[n // 3 : 2 * n // 3]:
            f.write(json.dumps({"text": d}) + "\n")
    pq.write_table(pa.table({"text": docs[2 * n // 3 :]}), folder / "rest.parquet")


def test_local_text_jsonl_parquet_are_all_read(tmp_path: Path) -> None:
    write_corpus(tmp_path / "corpus")
    dm = TextDataModule(
        files=str(tmp_path / "corpus" / "*"), seq_len=32, cache_dir=str(tmp_path / "c")
    )
    dm.setup()
    docs = dm.meta["documents"]
    assert sum(len(v) for v in docs.values()) == 12
    assert set(docs["train"]).isdisjoint(docs["val"]) and set(docs["val"]).isdisjoint(docs["test"])
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (16, 32)
    assert (batch["input_ids"][:, 1:] == batch["labels"][:, :-1]).all()  # labels are shifted inputs
    text = dm.tokenizer.decode(batch["input_ids"][0].tolist())
    assert any(w in text for w in WORDS)


def test_a_list_of_globs_reads_what_they_match_each_file_once(tmp_path: Path) -> None:
    """`data.files=[a.csv,b.json]`: files no one glob names alone (Python's glob has no {a,b})."""
    write_corpus(tmp_path / "corpus")
    corpus = tmp_path / "corpus"
    whole = TextDataModule(files=str(corpus / "*"), seq_len=32, cache_dir=str(tmp_path / "c"))
    listed = TextDataModule(
        files=[str(corpus / "*.txt"), str(corpus / "more.jsonl"), str(corpus / "*.parquet"),
               str(corpus / "d0.txt")],  # (d0.txt twice: read once)
        seq_len=32, cache_dir=str(tmp_path / "c2"),
    )  # fmt: skip
    whole.setup(), listed.setup()
    assert listed.meta["documents"] == whole.meta["documents"]
    with pytest.raises(
        FileNotFoundError, match=r"^data\.files\[1\]='.*nothing\*' matches no file$"
    ):
        TextDataModule(files=[str(corpus / "*.txt"), str(corpus / "nothing*")])


def test_dedupe_drops_byte_identical_documents_before_the_split(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    for i in range(3):  # copies of d0.txt (another version of a file that did not change)
        (corpus / f"z{i}.txt").write_text((corpus / "d0.txt").read_text())
    kwargs = dict(files=str(corpus / "*"), seq_len=32, cache_dir=str(tmp_path / "c"))
    kept, every = TextDataModule(dedupe=True, **kwargs), TextDataModule(**kwargs)
    kept.setup(), every.setup()
    names = [n for docs in kept.meta["documents"].values() for n in docs]
    assert len(names) == 12 and str(corpus / "d0.txt") in names  # the first copy stays
    assert sum(len(docs) for docs in every.meta["documents"].values()) == 15


def test_cache_is_reused_not_rebuilt_and_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_corpus(tmp_path / "corpus")
    kwargs = dict(files=str(tmp_path / "corpus" / "*"), seq_len=32, cache_dir=str(tmp_path / "c"))
    first = TextDataModule(**kwargs)
    first.setup()

    def no_rebuild(*_args: object) -> None:
        raise AssertionError("the cached corpus was tokenised again")

    monkeypatch.setattr(TextDataModule, "_build", no_rebuild)
    second = TextDataModule(**kwargs)
    second.setup()
    assert len(list((tmp_path / "c").iterdir())) == 1  # reused, not rebuilt
    assert (
        second.splits["train"][0]["tokens"].tolist() == first.splits["train"][0]["tokens"].tolist()
    )


def test_bpe_tokenizer_trains_on_train_split_and_round_trips(tmp_path: Path) -> None:
    write_corpus(tmp_path / "corpus")
    dm = TextDataModule(
        files=str(tmp_path / "corpus" / "*"),
        tokenizer="bpe",
        bpe_vocab_size=300,
        seq_len=16,
        cache_dir=str(tmp_path / "c"),
    )
    spec = dm.spec
    assert 256 < spec.vocab_size <= 300
    # merges compress the text; each split's bits per byte divide by its own ratio
    for split in ("train", "val", "test"):
        assert spec.bytes_per_token(split) == dm.bytes_per_token(split) > 1.5
    ids = dm.tokenizer.encode_batch(["gamma delta"])[0]
    assert dm.tokenizer.decode(ids.tolist()) == "gamma delta"


def test_a_broken_parquet_file_is_one_error_and_no_log_lines(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "x.parquet").write_text("not parquet at all")
    dm = TextDataModule(files=str(tmp_path / "corpus" / "*"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"data.files: cannot read .*x\.parquet"):
        dm.setup()
    captured = capfd.readouterr()
    assert "Failed to read schema" not in captured.out + captured.err


def test_a_parquet_row_with_no_string_is_one_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "corpus").mkdir()
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "corpus" / "x.parquet")
    dm = TextDataModule(files=str(tmp_path / "corpus" / "*"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"x\.parquet: row 0: no string field 'text' "
                       r"\(data\.text_field; it is 1\)"):  # fmt: skip
        dm.setup()


def test_a_json_object_of_columns_is_one_short_line_saying_what_is_read(tmp_path: Path) -> None:
    # `{"text": [doc, doc, …]}` is read as one row holding a list: the refusal printed the
    # whole list (433 KB on one line for 25 files)
    (tmp_path / "corpus").mkdir()
    docs = ["some document text " * 500] * 25
    (tmp_path / "corpus" / "columns.json").write_text(json.dumps({"text": docs}))
    dm = TextDataModule(files=str(tmp_path / "corpus" / "*"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError) as caught:
        dm.setup()
    line = str(caught.value)
    assert len(line) < len(str(tmp_path)) + 250 and "\n" not in line, line[:500]
    assert "columns.json: row 0: no string field 'text' (data.text_field; it is ['some" in line
    assert line.endswith("one object of columns is one row: write a list of rows or JSON lines")


def test_rows_without_text_are_left_out_alike_in_every_table_kind(caplog) -> None:
    # a JSON null stopped the run where an empty CSV cell was skipped without a word
    from advarch.data.sources import file_documents

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "a.jsonl").write_text('{"text": "one"}\n{"text": null}\n{"text": ""}\n'
                                      '{"text": "four"}\n')  # fmt: skip
        (root / "b.csv").write_text("id,text\n1,\n2,two\n")
        pq.write_table(pa.table({"text": [None, "p1", ""]}), root / "c.parquet")
        (root / "d.json").write_text('[{"text": null}, {"text": "j1"}]')
        files = [str(root / f) for f in ("a.jsonl", "b.csv", "c.parquet", "d.json")]
        with caplog.at_level(logging.INFO, logger="advarch"):
            names, texts = file_documents(files, "text")
        assert texts == ["one", "four", "two", "p1", "j1"]
        kept = ["a.jsonl#0", "a.jsonl#3", "b.csv#1", "c.parquet#1", "d.json#1"]  # (row numbers)
        assert [n.rsplit("/", 1)[1] for n in names] == kept
        left_out = f"data.files: {files[0]}: left out 2 of 4 rows with an empty or null 'text'"
        assert left_out in caplog.text
        assert caplog.text.count("rows with an empty or null 'text'") == 4
        (root / "e.jsonl").write_text('{"text": null}\n{"text": ""}\n')
        with pytest.raises(ValueError, match=r"data.files: .*e\.jsonl has no text in its 'text' "
                           r"\(data.text_field\): all 2 rows are empty or null$"):  # fmt: skip
            file_documents([str(root / "e.jsonl")], "text")
        # beside other files, a table without text is left out as an empty file is (it
        # stopped the run); a list of no rows says so (it said datasets' 'no data!')
        (root / "none.json").write_text("[ ]")
        with caplog.at_level(logging.INFO, logger="advarch"):
            names, texts = file_documents([str(root / "e.jsonl"), *files], "text")
        assert texts == ["one", "four", "two", "p1", "j1"]
        assert f"data.files: left out 1 table(s) without text, e.g. {root / 'e.jsonl'} has no" in (
            caplog.text)  # fmt: skip
        with pytest.raises(ValueError, match=r"none\.json holds no rows$"):
            file_documents([str(root / "none.json")], "text")


@pytest.mark.parametrize("damage", ["meta", "arrow", "split", "tokens"])  # (tokens: kept, and
# retrieval stopped on an error naming no file)
def test_a_damaged_cache_is_built_again_with_a_warning(tmp_path: Path, caplog, damage) -> None:
    write_corpus(tmp_path / "corpus")
    kwargs = dict(files=str(tmp_path / "corpus" / "*"), seq_len=32, cache_dir=str(tmp_path / "c"))
    first = TextDataModule(**kwargs)
    first.setup()
    cache, meta = first.cache_dir, first.meta
    tokens = {split: first.splits[split]["tokens"][:] for split in ("train", "val", "test")}
    del first  # (its memory map of the files damaged below)
    abandoned = cache.with_name(cache.name + ".tmp999999999")  # a build killed midway
    abandoned.mkdir()
    if damage == "meta":
        (cache / "meta.json").write_text("{not json")
    elif damage == "arrow":
        arrow = next((cache / "train").glob("*.arrow"))
        arrow.write_bytes(arrow.read_bytes()[:100])
    elif damage == "tokens":
        array = cache / "val_tokens.npy"
        array.write_bytes(array.read_bytes()[:90])
    else:
        shutil.rmtree(cache / "test")
    again = TextDataModule(**kwargs)
    with caplog.at_level(logging.WARNING, logger="advarch"):
        again.setup()
    assert f"data cache {cache} is damaged" in caplog.text
    assert again.meta == meta and not abandoned.exists()
    for split, expected in tokens.items():
        assert again.splits[split]["tokens"][:].equal(expected)


def docs_of(files: str, tmp_path: Path, **kwargs) -> dict[str, list[str]]:
    """The documents per split of a datamodule over `files`, built in `tmp_path`/c."""
    dm = TextDataModule(files=files, seq_len=16, cache_dir=str(tmp_path / "c"), **kwargs)
    dm.setup()
    return dm.meta["documents"]


def test_any_utf8_file_is_a_text_document_whatever_its_suffix(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("main.cpp", "page.html", "paper.tex", "README", "Makefile"):
        (src / name).write_text(f"{name}: " + " ".join(WORDS) * 20)
    docs = docs_of(str(src / "*"), tmp_path)
    assert sorted(sum(docs.values(), [])) == sorted(str(p) for p in src.iterdir())


def test_a_csv_file_is_a_table_of_its_text_column(tmp_path: Path) -> None:
    table = tmp_path / "d.csv"
    table.write_text(
        "id,body\n" + "".join(f'{i},"{" ".join(WORDS)}, row {i}\n"\n' for i in range(5))
    )
    docs = docs_of(str(table), tmp_path, text_field="body")
    assert sorted(sum(docs.values(), [])) == [f"{table}#{i}" for i in range(5)]
    with pytest.raises(ValueError, match=r"data.text_field='text' is not a column of '.*d\.csv' "
                       r"\(columns: id, body\)"):  # fmt: skip
        docs_of(str(table), tmp_path)


def test_a_csv_cell_of_any_length_is_read_and_a_missing_column_lists_the_columns(
    tmp_path: Path,
) -> None:
    # new user 41: a cell over 131,072 characters (a long source file) stopped the run ("field
    # larger than field limit"), and a `;` table's columns were listed as one, `id;body`
    from advarch.data.sources import file_documents

    long = " ".join(WORDS) * 20_000  # (~1 MB)
    (tmp_path / "long.csv").write_text(f'id,text\n1,"{long}"\n2,short\n')
    names, texts = file_documents([str(tmp_path / "long.csv")], "text")
    assert texts == [long, "short"]
    (tmp_path / "semi.csv").write_text("id;body\n1;text\n")
    with pytest.raises(ValueError, match=r"is not a column of '.*semi\.csv' \(columns: id, body\)"):
        file_documents([str(tmp_path / "semi.csv")], "text")


def test_a_tsv_is_a_table_and_rows_under_a_key_are_said(tmp_path: Path, caplog) -> None:
    # new user 41: both were trained on as raw TSV / JSON text, said only as "1 document"
    from advarch.data.sources import file_documents

    (tmp_path / "t.tsv").write_text("id\ttext\n1\tfirst row\n2\tsecond, row\n")
    (tmp_path / "squad.json").write_text('{"version": 1, "data": [{"text": "a"}, {"text": "b"}]}')
    with caplog.at_level(logging.INFO, logger="advarch"):
        names, texts = file_documents([str(tmp_path / n) for n in ("t.tsv", "squad.json")], "text")
    assert texts[:2] == ["first row", "second, row"] and names[0].endswith("t.tsv#0")
    assert texts[2].startswith('{"version": 1')  # (the documented rule: one text document)
    assert (
        f"data.files: {tmp_path}/squad.json holds rows under 'data', not a list of rows: "
        "read as one text document (a list of rows or JSON lines is a table)"
    ) in caplog.text


def test_empty_files_are_left_out_in_one_line(caplog) -> None:
    # a code folder's empty __init__.py stopped the run
    from advarch.data.sources import file_documents

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "__init__.py").write_text("")
        (root / "mod.py").write_text("x = 1\n")
        with caplog.at_level(logging.INFO, logger="advarch"):
            names, texts = file_documents([str(root / "__init__.py"), str(root / "mod.py")], "t")
    assert texts == ["x = 1\n"] and names[0].endswith("mod.py")
    assert "data.files: left out 1 empty file(s), e.g. " in caplog.text


def test_broken_links_are_said_not_dropped_silently(tmp_path: Path, caplog) -> None:
    # a glob's links to moved files were left out without a word (tester 29 F7)
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (src / name).write_text(" ".join(WORDS) * 20)
    (src / "gone.txt").symlink_to(tmp_path / "moved.txt")
    with caplog.at_level(logging.INFO, logger="advarch"):
        docs = docs_of(str(src / "*"), tmp_path)
    assert sorted(sum(docs.values(), [])) == [str(src / n) for n in ("a.txt", "b.txt", "c.txt")]
    assert f"data.files: left out 1 broken link(s), e.g. {src}/gone.txt → {tmp_path}/moved.txt" in (
        caplog.text
    )
    for name in ("a.txt", "b.txt", "c.txt"):
        (src / name).unlink()
    with pytest.raises(FileNotFoundError, match=r"matches no file but 1 broken link\(s\), e\.g\."):
        docs_of(str(src / "*"), tmp_path)


def test_csv_cells_are_text_as_typed_and_a_json_object_is_a_document() -> None:
    # a table reader guessed types: an all-number column was ints
    from advarch.data.sources import file_documents

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "n.csv").write_text("id,text\n1,123\n2,\n3,0.50\n")
        (root / "semi.csv").write_text('\ufeffid;text\n1;"a, b; c"\n')  # (a BOM, semicolons)
        (root / "one.json").write_text('{"text": "all of it"}')  # one row: its text
        (root / "package.json").write_text('{"name": "x", "version": "1.0"}')  # a code folder's
        (root / "rows.json").write_text('[{"text": "first"}, {"text": "second"}]')
        files = ("n.csv", "semi.csv", "package.json", "rows.json", "one.json")
        names, texts = file_documents([str(root / f) for f in files], "text")
    assert texts == ["123", "0.50", "a, b; c", '{"name": "x", "version": "1.0"}', "first",
                     "second", "all of it"]  # fmt: skip
    assert names[3].endswith("package.json") and names[4].endswith("rows.json#0")


def write_saved(folder: Path, n: int, splits: tuple[str, ...] = ()) -> None:
    """A `save_to_disk` folder of `n` rows: a Dataset, or a DatasetDict of `splits`."""
    import datasets

    ds = datasets.Dataset.from_dict({"text": [" ".join(WORDS) + f" row {i}" for i in range(n)]})
    (datasets.DatasetDict({s: ds for s in splits}) if splits else ds).save_to_disk(str(folder))


def test_a_save_to_disk_folder_is_read_offline_and_keyed_by_its_files(tmp_path: Path) -> None:
    write_saved(tmp_path / "saved", 6)
    kwargs = dict(dataset=str(tmp_path / "saved"), seq_len=16, cache_dir=str(tmp_path / "c"))
    dm = TextDataModule(**kwargs)
    dm.setup()
    assert sum(len(v) for v in dm.meta["documents"].values()) == 6
    key = dm._fingerprint()
    write_saved(tmp_path / "saved", 7)  # its content changed: another cache
    assert TextDataModule(**kwargs)._fingerprint() != key
    write_saved(tmp_path / "dict", 5, ("train", "validation"))
    dm = TextDataModule(**{**kwargs, "dataset": str(tmp_path / "dict")})
    dm.setup()  # a DatasetDict: its train split
    assert sum(len(v) for v in dm.meta["documents"].values()) == 5
    hint = r"saved/dataset_info.json belongs to a folder written by save_to_disk: load the folder"
    with pytest.raises(ValueError, match=rf"data.files: .*{hint} with data.dataset='.*saved'"):
        docs_of(str(tmp_path / "saved" / "*"), tmp_path)
    assert len(docs_of(str(tmp_path / "saved" / "*.arrow"), tmp_path)["train"]) == 5


def test_a_wrong_dataset_folder_is_one_line_saying_what_to_use(tmp_path: Path) -> None:
    write_saved(tmp_path / "dict", 3, ("validation",))
    dm = TextDataModule(dataset=str(tmp_path / "dict"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"holds no 'train' split \(splits: validation\); name a "
                       r"split's folder, e.g. data.dataset='.*dict/validation'"):  # fmt: skip
        dm.setup()
    with pytest.raises(ValueError, match=r"is a folder not written by save_to_disk .*; its files "
                       rf"are data.files='{tmp_path}/\*'"):  # fmt: skip
        TextDataModule(dataset=f"{tmp_path}/")
    with pytest.raises(ValueError, match=r"data.dataset='/nonexistent/x': no such folder"):
        TextDataModule(dataset="/nonexistent/x")


def test_one_book_is_cut_into_pieces_and_every_run_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    book = tmp_path / "book.txt"
    book.write_text("".join(f"{' '.join(WORDS)} {i}\n" for i in range(4000)))  # ~290 kB
    for _ in range(2):  # the build, then the cache
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="advarch"):
            docs = docs_of(str(book), tmp_path)
        assert (
            "data: 1 document; cut into 69 pieces at line ends (or spaces, in a long line) "
            "for the train/val/test split" in (caplog.messages)
        )
    assert [len(docs[s]) for s in ("train", "val", "test")] == [63, 3, 3]
    assert docs["val"][0].startswith(f"{book}:")
