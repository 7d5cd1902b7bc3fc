"""The report scripts that train their own runs, from the command line in a fresh clone."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.cli import Project
from tests.conftest import ROOT, SMALL_TEXT
from tests.reports.test_figures import assert_png


def test_mmoe_report_tables_every_model_and_correlation(project: Project) -> None:
    res = project.run(
        "--correlations",
        "0.0",
        "1.0",
        "--seeds",
        "0",
        "debug=tiny",
        "trainer.max_steps=10",
        "--out",
        "mm",
        script="scripts/mmoe_report.py",
    ).check()  # fmt: skip  (an override after --seeds' list is still an override)
    assert "\none seed (no spread: add --seeds)\n" in res.stdout
    note = "note: debug=tiny: sizes too small for the test errors to mean anything (a smoke run)"
    assert res.stdout.rstrip().splitlines()[-3] == note, res.stdout  # under its table, and in it
    (report,) = (project.root / "mm").glob("*_*/mmoe_report.md")  # a folder of this call's own
    assert report.read_text() in res.stdout
    rows = [line for line in res.stdout.splitlines() if line.startswith("|")]
    assert "±" not in "".join(rows)
    assert {row.count("|") for row in rows} == {6}  # a markdown table: header, rule, rows
    for model in ("mmoe", "one_gate_moe", "shared_bottom"):
        assert sum(row.split("|")[2].strip() == model for row in rows[2:]) == 2, res.stdout
    assert "Epoch" not in res.output and "v_num" not in res.output  # one line per run, no bars
    assert "nan" not in res.stdout  # (new user 38 L8: shared_bottom, no gates: gate_cosine=nan)


def test_a_smoke_mmoe_report_says_so_in_its_file(project: Project) -> None:
    # review 37: the note is printed under the table but mmoe_report.md, the file that stays,
    # holds the table alone (no overrides either): read later, a debug=tiny smoke table looks
    # like the README's measured result
    project.run(
        "--correlations", "1.0", "--seeds", "0", "--models", "mmoe", "debug=tiny",
        "trainer.max_steps=4", "--out", "mm", script="scripts/mmoe_report.py",
    ).check()  # fmt: skip
    (report,) = (project.root / "mm").glob("*_*/mmoe_report.md")
    assert "debug=tiny: sizes too small for the test errors" in report.read_text()


def test_mmoe_report_without_out_keeps_its_table_under_outputs(
    project: Project, monkeypatch, capsys
) -> None:
    # it trained into a temp folder never removed, printed checkpoint paths into it, and wrote
    # no mmoe_report.md
    folders = []

    def run(cfg) -> dict[str, float]:
        folders.append(Path(cfg.paths.output_dir))
        folders[-1].mkdir(parents=True)
        return {"test/task_a/mse": 0.5, "test/task_b/mse": 0.25}

    monkeypatch.setattr("advarch.reports.mmoe.run", run)  # (the table, not the training)
    argv = ["--correlations", "1", "--seeds", "0", "--models", "mmoe"]
    run_in_process(project, monkeypatch, "scripts/mmoe_report.py", *argv)
    (report,) = (project.root / "outputs" / "mmoe_report").glob("*_*/mmoe_report.md")
    assert folders == [report.parent.relative_to(project.root) / "p1.0-mmoe-s0"]
    out = capsys.readouterr().out
    assert out.startswith(f"mmoe report: writing into {report.parent.relative_to(project.root)}")
    assert "| 1.0 | mmoe | 0.5000 | 0.2500 | — |" in report.read_text()


def test_mmoe_report_says_an_out_that_is_a_file_in_one_line(tmp_path: Path) -> None:
    # a NotADirectoryError traceback as the first run began

    out = tmp_path / "text.ckpt"
    out.write_text("a file where --out goes")
    from advarch.reports.mmoe import parse

    line = f"error: --out {out} is a file, not a folder"
    with pytest.raises(SystemExit, match=f"^{re.escape(line)}$"):
        parse(["--seeds", "0", "--models", "mmoe", "--out", str(out), "trainer.max_steps=2"])


@pytest.mark.parametrize(
    "argv",
    [
        ["--correlations", "1", "--seeds", "0", "--models", "mmoe", "trainer.max_steps=2"],
        ["trainer.max_steps=2", "--models", "mmoe", "--seeds", "0", "--correlations", "1"],
        ["--models", "mmoe", "trainer.max_steps=2", "--seeds", "0", "--correlations", "1"],
    ],
)
def test_mmoe_report_takes_an_override_anywhere(argv: list[str]) -> None:
    # moved to the end, the override was swallowed by the last list option: "argument
    # --models: invalid choice: 'trainer.max_steps=2'"

    from advarch.reports.mmoe import parse

    args = parse(argv)
    assert (args.models, args.seeds, args.correlations) == (["mmoe"], [0], [1.0])
    assert args.overrides == ["trainer.max_steps=2"]


def run_in_process(project: Project, monkeypatch, script: str, *args: str) -> None:
    """`python <script> <args>` in the project folder, run in this process: for the scripts
    that train their runs in-process anyway, where a test reads the files they write."""
    import runpy

    monkeypatch.chdir(project.root)
    monkeypatch.setattr(sys, "argv", [script, *args])
    runpy.run_path(str(ROOT / script), run_name="__main__")


def test_retro_report_compares_neighbours_padding_and_plain(
    project: Project, monkeypatch, capsys
) -> None:
    small = ["debug=tiny", *SMALL_TEXT, "data.retrieval.chunk_size=16"]
    run_in_process(project, monkeypatch, "scripts/retro_report.py", *small,
                   "data.retrieval.embedder_dim=64")  # fmt: skip
    lines = capsys.readouterr().out.splitlines()  # under the table, as bench.py says (it did not)
    last_row = next(i for i, line in enumerate(lines) if line.startswith("plain decoder "))
    note = "note: debug=tiny: sizes too small for the losses to mean anything (a smoke run)"
    assert lines[last_row + 1] == note, lines
    (path,) = (project.root / "outputs" / "retro_report").glob("*/retro_report.json")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_[0-9a-f]{6}", path.parent.name)  # unique
    report = json.loads(path.read_text())
    rows = report["rows"]
    padding, shuffled = "RETRO, padding neighbours", "RETRO, another sequence's neighbours"
    assert set(rows) == {"RETRO, neighbours", padding, shuffled, "plain decoder"}
    with_nb, padded = rows["RETRO, neighbours"], rows[padding]
    assert with_nb["loss"] != padded["loss"]  # the neighbours reach the decoder
    for row, run in (("RETRO, neighbours", "retro"), ("plain decoder", "plain")):
        # the batches each run validated (debug=tiny: 2), as its summary above the table says
        logged = report["runs"][run]["metrics"]["val/loss"]
        assert rows[row]["loss"] == pytest.approx(logged, rel=1e-5), row
    assert all(r["bpb"] > 0 for r in rows.values())
    buckets = report["split_by_quality"]  # the gain split by neighbour quality
    assert [b["min_shared"] for b in buckets] == [0, 8, 32]
    assert abs(sum(b["fraction"] for b in buckets) - 1) < 1e-9
    assert_png(path.parent / "by_quality.png")  # the same split, drawn


def test_retro_report_retrofit_adds_the_plain_decoder_of_equal_steps(
    project: Project, monkeypatch
) -> None:
    small = ["debug=tiny", *SMALL_TEXT, "data.retrieval.chunk_size=16"]
    run_in_process(
        project, monkeypatch, "scripts/retro_report.py",
        *small, "data.retrieval.embedder_dim=64", "data.retrieval.align=false",
        "model.retro.cca_layers=[1]",  # RETRO's own option: not passed to the plain decoders
        "--retrofit", "--retrofit-steps", "4", "--unfreeze",
    )  # fmt: skip
    (path,) = (project.root / "outputs" / "retro_report").glob("*/retro_report.json")
    report = json.loads(path.read_text())
    assert set(report["runs"]) == {"plain", "retro", "plain_more"}
    assert report["unfreeze"] and report["retrofit_steps"] == 4
    equal = "plain decoder, equal steps"
    assert report["rows"][equal]["bpb"] != report["rows"]["plain decoder"]["bpb"]  # trained on
    assert all("gain_vs_plain" in b for b in report["split_by_quality"] if b["fraction"])


def test_report_scripts_say_a_bad_override_in_one_line(project: Project) -> None:
    for script in ("scripts/retro_report.py", "scripts/mmoe_report.py"):
        res = project.run("model.nope=1", script=script)
        assert res.rc == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and "model.nope" in last, last


@pytest.mark.parametrize(
    ("args", "line"),
    [  # each failed after training: the plain decoder, or the RETRO run too
        (["--plain-ckpt", "cut.ckpt", "debug=tiny"], "--plain-ckpt='cut.ckpt' is truncated or "
         "not a checkpoint (100 bytes)"),  # (it said ckpt_path=)
        (["--plain-ckpt", "outputs", "debug=tiny"], "--plain-ckpt='outputs' is a folder, not a "
         "checkpoint file"),
        (["--plain-ckpt", "gone.ckpt", "debug=tiny"], "--plain-ckpt='gone.ckpt' is not a file"),
        (["--retrofit", "--retrofit-steps", "0", "debug=tiny"],
         "--retrofit-steps 0 must be at least 1"),  # (it said trainer.max_steps=0)
        (["debug=tiny", "model.dimm=3"], "model.dimm is not a key of model (did you mean "
         "model.dim? "),  # (Hydra's advice: append +model.dimm=3)
        (["--unfreeze", "debug=tiny"],  # (ignored: exit 0)
         "--unfreeze trains the decoder of a retrofit: add --retrofit"),
        (["debug=tiny", "model=transformer"],  # (new user 42b: a report of "RETRO" rows)
         "model=transformer has no RETRO adapter (model.retro is null): this report compares "
         "RETRO (model=retro or model=retro_moe) with a plain decoder"),
    ],
)  # fmt: skip
def test_retro_report_says_a_bad_option_before_training(
    project: Project, args: list[str], line: str
) -> None:
    cut = project.root / "cut.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(64)}}, cut)
    cut.write_bytes(cut.read_bytes()[:100])
    res = project.run(*args, script="scripts/retro_report.py")
    assert res.rc == 1 and res.stderr.strip().startswith(f"error: {line}"), res.stderr[-2000:]
    assert "\n" not in res.stderr.strip(), res.stderr[-2000:]
    assert not (project.root / "outputs" / "retro_report").exists()  # nothing trained


def test_retro_report_retrofit_steps_without_a_retrofit_is_one_line() -> None:
    import argparse

    from advarch.reports.retro import check_options

    args = argparse.Namespace(retrofit=False, unfreeze=False, retrofit_steps=6, plain_ckpt=None)
    with pytest.raises(SystemExit, match="^error: --retrofit-steps sets the steps of a retrofit: "
                       "add --retrofit"):  # fmt: skip
        check_options(args, ["debug=tiny"])  # (it was ignored)


@pytest.mark.parametrize(
    ("kind", "differs"),
    [
        (["model=moe"], "model.ffn=['moe'] there, ['dense'] now"),
        (["model=retro"], "model.retro={'cca_layers': None, "),  # RETRO as its own control
        (["model=transformer", "model.retro=null", "data.seq_len=64"], "data.seq_len=64 there"),
    ],
)
def test_retro_report_refuses_a_plain_ckpt_of_another_model_before_training(
    make_cfg, tmp_path, kind: list[str], differs: str
) -> None:
    """Another model's checkpoint was evaluated as the plain decoder, on its own data (a moe
    on data=text: another split, the table's "plain decoder" row), then an IndexError ended
    the report after RETRO had trained; the plain decoder of the same overrides passes."""
    import argparse

    from omegaconf import OmegaConf

    from advarch.reports.retro import check_options

    base = ["experiment=retro_vs_plain", "debug=tiny"]
    plain = [*base, "model=transformer", "model.retro=null"]

    def checkpoint(overrides: list[str], name: str) -> Path:
        path = tmp_path / f"{name}.ckpt"
        cfg = OmegaConf.to_container(make_cfg(overrides), resolve=True)
        torch.save({"state_dict": {"w": torch.zeros(1)}, "hyper_parameters": {"cfg": cfg}}, path)
        return path

    args = argparse.Namespace(retrofit=False, unfreeze=False, retrofit_steps=None)
    args.plain_ckpt = checkpoint([*base, *kind], "other")
    with pytest.raises(SystemExit) as stop:
        check_options(args, base, plain)
    line = str(stop.value)
    start = f"error: --plain-ckpt {args.plain_ckpt} is not the plain decoder these runs compare"
    assert line.startswith(start) and differs in line and "\n" not in line, line
    args.plain_ckpt = checkpoint(plain, "plain")
    check_options(args, base, plain)


def test_retro_report_quality_table_fits_a_terminal_in_aligned_columns() -> None:
    # a column per model ran 190 characters wide with --retrofit: the terminal wrapped the
    # header apart from its values; and an empty first bucket left out every model
    import advarch.reports.retro as script

    names = [*script.MODES.values(), "plain decoder", script.PLAIN_EQUAL]
    rows = {name: {"chunk_bits": np.array([3.0, 2.0, 1.0 + i]), "chunk_bytes": np.ones(3)}
            for i, name in enumerate(names)}  # fmt: skip
    table = script.quality_table(script.split_by_quality(rows, np.array([9, 9, 40])))
    lines = table.splitlines()
    assert len({len(line) for line in lines}) == 1 and len(lines[0]) <= 80, table
    assert lines[0].split() == ["tokens", "shared", "0-7", "8-31", "32+"], table
    assert [line[:40].strip() for line in lines[1:]] == [
        "chunks",
        *names,
        "gain_vs_padding",
        "gain_vs_plain",
    ]
    cells = [line[40:].split() for line in lines[2:]]
    assert all(len(c) == 3 and c[0] == "nan" and c[1] != "nan" for c in cells), table


def test_retro_database_says_a_corpus_too_small_in_one_line(project: Project) -> None:
    # it named data.seq_len (4 × --chunk-size), which the script has no option for
    res = project.run("--max-documents", "5", script="scripts/retro_database.py")
    assert res.rc == 1 and res.stderr.strip().splitlines() == [
        "error: the val split of --max-documents 5 has 98 tokens, fewer than the 257 of one "
        "sequence (4 × --chunk-size 64, + 1): raise --max-documents or lower --chunk-size"
    ], res.stderr[-2000:]


@pytest.mark.parametrize(
    ("args", "line"),
    [  # faiss's traceback after the embedding, the data's own keys, memory run out
        (["--nprobe", "0", "--max-documents", "20", "--index", "ivf"],
         "--nprobe 0 must be at least 1"),
        (["--chunk-size", "100000", "--max-documents", "40"], "the val split of --max-documents "
         "40 has 81004 tokens, fewer than the 400001 of one sequence (4 × --chunk-size 100000, "
         "+ 1): raise --max-documents or lower --chunk-size"),
        (["--k", "100000", "--max-documents", "20"], "--k 100000 exceeds the database's 7775 "
                                                    "chunks"),
    ],
)  # fmt: skip
def test_retro_database_says_a_bad_option_in_one_line(
    project: Project, args: list[str], line: str
) -> None:
    res = project.run(*args, script="scripts/retro_database.py")
    assert res.rc == 1 and res.stderr.strip() == f"error: {line}", res.stderr[-2000:]
    assert not (project.root / "outputs" / "retro_database").exists()


@pytest.mark.parametrize(
    ("option", "line"),
    [  # numpy's traceback, a NaN recall, the data module's keys, a file at --out after the work
        ({"queries": -5}, "--queries -5 must be at least 1"),
        ({"queries": 0}, "--queries 0 must be at least 1"),
        ({"k": 0}, "--k 0 must be at least 1"),
        ({"max_documents": 0}, "--max-documents 0 must be at least 3 (a document each for "
                               "train, val and test)"),
        ({"chunk_size": 0}, "--chunk-size 0 must be at least 3 (the embedder hashes 3-token "
                            "n-grams: a shorter chunk embeds to nothing)"),
        ({"out": "{tmp}/notes.txt"}, "--out {tmp}/notes.txt is a file, not a folder"),
    ],
)  # fmt: skip
def test_retro_database_checks_its_options_first(tmp_path, option: dict, line: str) -> None:
    import argparse

    (tmp_path / "notes.txt").write_text("a file where --out goes")
    defaults = {"chunk_size": 64, "k": 2, "queries": 2000, "nprobe": 16, "max_documents": None,
                "out": str(tmp_path / "out")}  # fmt: skip
    given = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in option.items()}
    from advarch.benchmarks.retro_database import check_options

    with pytest.raises(SystemExit, match=f"^error: {re.escape(line.format(tmp=tmp_path))}$"):
        check_options(argparse.Namespace(**{**defaults, **given}))


def test_retro_database_bar_counts_the_database_chunks(project: Project) -> None:
    # its total was the chunks rounded up to whole embedding steps of 16384
    res = project.run(
        "--max-documents", "20", "--queries", "10", "--skip-neighbours",
        script="scripts/retro_database.py",
    ).check()  # fmt: skip
    chunks = next(line.split()[1] for line in res.stdout.splitlines() if line.startswith("chunks "))
    totals = set(re.findall(r"embed database: +\d+%\|[^|]*\| *\d+/(\d+)", res.stderr))
    assert totals == {chunks}, res.stderr[-2000:]
    # piped, its frames ran into one line over \r; and a skipped step reported a time
    frames = [line for line in res.stderr.splitlines() if "embed database" in line]
    assert "\r" not in res.stderr and all(f.count("embed database") == 1 for f in frames)
    assert re.search(r"^neighbours_s +skipped$", res.stdout, re.M), res.stdout
    # (new user 38 L7) nprobe, an IVF index's, was printed for this flat one; a rerun wrote
    # over the last one's file
    assert re.search(r"^index +flat$", res.stdout, re.M) and "nprobe" not in res.stdout
    again = project.run(
        "--max-documents", "20", "--queries", "10", "--skip-neighbours",
        script="scripts/retro_database.py",
    ).check()  # fmt: skip
    written = [line.split()[-1] for r in (res, again) for line in r.stdout.splitlines()
               if line.startswith("written to ")]  # fmt: skip
    assert len(set(written)) == 2 and all((project.root / w).is_file() for w in written)


def test_merge_demo_says_an_out_that_is_a_file_in_one_line(project: Project) -> None:
    # run_lock's NotADirectoryError traceback as the base run began
    (project.root / "notes.txt").write_text("a file where --out goes")
    res = project.run(
        "--base-steps", "4", "--task-steps", "4", "--out", "notes.txt",
        script="scripts/merge_demo.py",
    )  # fmt: skip
    assert res.rc == 1 and res.stderr.strip() == "error: --out notes.txt is a file, not a folder"


@pytest.mark.parametrize("script", ["scripts/generate.py", "scripts/merge.py", "eval.py"])
def test_help_shows_the_programs_own_settings(project: Project, script: str) -> None:
    # it listed the training config groups (data=, model= …), which these programs refuse
    done = project.run("--help", script=script).check()
    assert "Usage: python " + script in done.stdout and "== Settings (key=value) ==" in done.stdout
    assert "Configuration groups" not in done.stdout and "strategy:" not in done.stdout
    if script == "eval.py":  # its one group, with every option
        data = sorted(p.stem for p in (ROOT / "advarch/configs/data").glob("*.yaml"))
        assert f"data: {', '.join(data)}" in done.stdout.splitlines()


def test_the_other_sequence_control_never_gives_a_sequence_its_own_neighbours() -> None:
    # it rolled each batch by one: a batch of one sequence got its own neighbours back
    from advarch.errors import ConfigError
    from advarch.reports.retro import _neighbours_of_others as others

    batches = [
        {"neighbours": torch.arange(n).view(n, 1) + first} for first, n in [(0, 1), (1, 1), (2, 2)]
    ]
    given = [t.flatten().tolist() for t in others(batches)]
    assert given == [[3], [0], [1, 2]]  # each sequence gets the split's previous one's
    with pytest.raises(ConfigError, match="held-out split has 1 sequence"):
        others(batches[:1])
