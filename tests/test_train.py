"""End-to-end training through the real entry points: fast_dev_run, resume, eval, NaN, DDP."""

from __future__ import annotations

import json
import math
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from advarch.callbacks.signals import Interrupted
from advarch.checkpoint import CheckpointError
from advarch.config.resolvers import metric_mode
from advarch.errors import ConfigError
from advarch.train import run
from tests.cli import Project, read_metrics, series
from tests.conftest import SESSION_LM, SMALL_TEXT, TINY, TrainedRun


def test_fast_dev_run_plain_transformer(make_cfg) -> None:
    cfg = make_cfg([*TINY, "debug=fdr"])
    metrics = run(cfg)
    assert torch.isfinite(torch.tensor(metrics["test/loss"]))
    # a smoke run ranks nothing (Lightning's fast_dev_run; the final state is last.ckpt)
    saved = [p.name for p in (Path(cfg.paths.output_dir) / "checkpoints").glob("*.ckpt")]
    assert saved == ["last.ckpt"]


def test_a_checkpoints_half_written_by_a_killed_run_is_removed(make_cfg) -> None:
    # fault pass 42c: kill -9 during a checkpoint's write left `.last.ckpt.tmp<pid>` (as large
    # as the checkpoint) for good; one of a live process (writing now) stays
    cfg = make_cfg([*TINY, "~logger", "trainer.max_steps=1"])
    folder = Path(cfg.paths.output_dir) / "checkpoints"
    folder.mkdir(parents=True)
    dead, live = folder / ".last.ckpt.tmp999999999", folder / f".last.ckpt.tmp{os.getppid()}"
    dead.write_bytes(b"half"), live.write_bytes(b"being written")
    run(cfg)
    assert not dead.exists() and live.exists()


def test_a_run_without_loggers_trains_and_summarises(make_cfg) -> None:
    """`~logger`: no logger, so no learning-rate monitor (it refuses such a Trainer)."""
    cfg = make_cfg([*TINY, "~logger"])
    assert "logger" not in cfg
    metrics = run(cfg)
    assert metrics["test/loss"] > 0 and metrics["train/tokens_per_s"] > 0
    assert (Path(cfg.paths.output_dir) / "summary.json").is_file()


def test_tiny_run_learns_and_writes_outputs(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(
        [*TINY, "trainer.max_steps=30", "trainer.val_check_interval=15", "optimizer.lr=3e-3"]
    )
    metrics = run(cfg)
    out = Path(cfg.paths.output_dir)
    assert (out / "checkpoints" / "last.ckpt").is_file()
    rows = read_metrics(out)
    losses = series(rows, "train/loss")
    assert losses[-1] < losses[0] - 0.5  # it learns
    assert len(losses) == 30  # one per step: the epoch aggregate is train/loss_epoch
    assert series(rows, "train/loss_epoch")
    assert metrics["val/bpb"] == pytest.approx(metrics["val/loss"] / 0.6931471805599453, rel=1e-3)
    tree = (out / "config_tree.txt").read_text()  # written even when printing is off
    assert "model" in tree and "dim: 32" in tree
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    hp = ckpt["hyper_parameters"]
    assert hp["cfg"]["model"]["dim"] == 32 and hp["params/trainable"] == hp["params/total"] > 0


def test_final_weights_are_validated_and_fit_metrics_kept(make_cfg) -> None:
    # validation at steps 3 and 6 of 7: the 7th step's weights get a final validation
    cfg = make_cfg([*TINY, "trainer.max_steps=7", "test=false"])
    metrics = run(cfg)
    rows = read_metrics(Path(cfg.paths.output_dir))
    val_losses = series(rows, "val/loss")
    assert len(val_losses) == 3
    assert metrics["val/loss"] == pytest.approx(val_losses[-1])
    assert "train/loss" in metrics  # fit's metrics survive the extra validation


@pytest.mark.parametrize(
    "data",
    [SMALL_TEXT, ["strategy=fewshot"], ["strategy=multitask"]],
    ids=["text", "fewshot", "multitask"],  # few-shot replayed its epoch's episodes from the first
)
def test_resume_after_crash_matches_uninterrupted_run(make_cfg, tmp_path: Path,
                                                      data: list[str]) -> None:  # fmt: skip
    common = [
        "debug=tiny",
        *data,
        "trainer.max_steps=8",
        "trainer.val_check_interval=4",
        "callbacks.model_checkpoint.every_n_train_steps=4",
        "trainer.deterministic=true",
    ]
    (full_cfg, full), (resumed_cfg, resumed) = crash_and_resume(make_cfg, tmp_path, common, 5)
    for key in ("val/loss", "test/loss", "test/acc"):
        if key in full:  # (multitask: per-task MSE, no accuracy)
            assert resumed[key] == pytest.approx(full[key], rel=1e-5, abs=1e-6), key
    losses = [series(read_metrics(Path(c.paths.output_dir)), "train/loss")
              for c in (full_cfg, resumed_cfg)]  # fmt: skip
    # steps 0-3 carried from the crashed run's CSV, 4-7 trained again on the same batches
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    # step 4 is epoch 1's first batch: its epoch means count that batch too (they were the
    # means of the batches after the resume alone; few-shot's and multitask's per-task ones
    # still were)
    full_epochs, resumed_epochs = (epoch_values(Path(c.paths.output_dir))
                                   for c in (full_cfg, resumed_cfg))  # fmt: skip
    assert "train/loss_epoch" in full_epochs and full_epochs.keys() == resumed_epochs.keys()
    for key, values in full_epochs.items():
        assert len(values) == 3 and resumed_epochs[key] == pytest.approx(values, rel=1e-6), key


def test_a_resume_mid_way_through_a_whole_epoch_trains_the_rest_of_it(make_cfg, tmp_path):
    # digits' epoch is 17 batches (no batch limit, unlike debug=tiny's 3): the resumed epoch's
    # loader was short by its skip, and Lightning, counting on from step 8, ended it 8 batches
    # early (a different run)
    common = [
        "debug=tiny",
        "data=digits",
        "trainer.limit_train_batches=null",
        "trainer.max_steps=24",
        "trainer.val_check_interval=8",
        "callbacks.model_checkpoint.every_n_train_steps=8",
        "trainer.deterministic=true",
        *STOCHASTIC,
    ]
    (full_cfg, full), (resumed_cfg, resumed) = crash_and_resume(make_cfg, tmp_path, common, 10)
    losses = [series(read_metrics(Path(c.paths.output_dir)), "train/loss")
              for c in (full_cfg, resumed_cfg)]  # fmt: skip
    assert len(losses[0]) == 24 and losses[1] == losses[0]  # (steps 0-7 from the crashed run)
    assert resumed["test/acc"] == full["test/acc"] and resumed["val/loss"] == full["val/loss"]


# layers that draw from the global random state in training: a resume replayed the first
# steps' draws (no checkpoint kept the state; the run is seeded again as it starts)
STOCHASTIC = ["model.dropout=0.1", "model.moe.router_jitter=0.1"]


def crash_and_resume(make_cfg, tmp_path: Path, common: list[str], step: int) -> tuple:
    """The uninterrupted run, and a run crashed at `step` resumed from its last.ckpt (written
    at the checkpoint step before): ((config, metrics) of each)."""
    full_cfg = make_cfg(common, output_dir=tmp_path / "full")
    full = run(full_cfg)
    crash = ["+callbacks.crash._target_=tests.helpers.CrashAtStep", f"+callbacks.crash.step={step}"]
    crash_cfg = make_cfg([*common, *crash], output_dir=tmp_path / "crashed")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(crash_cfg)
    last = Path(crash_cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    every = int(next(o for o in common if "every_n_train_steps" in o).split("=")[1])
    assert saved == (step - 1) // every * every  # mid-way between two checkpoints
    resumed_cfg = make_cfg([*common, f"ckpt_path={last}"], output_dir=tmp_path / "resumed")
    return (full_cfg, full), (resumed_cfg, run(resumed_cfg))


ACCUMULATING = ["trainer.accumulate_grad_batches=2"]
# 6 batches an epoch accumulated 2 by 2, validated after the 3rd: in the middle of a step
VALIDATING_MID_STEP = [
    *ACCUMULATING,
    "trainer.limit_train_batches=6",
    "trainer.val_check_interval=3",
]
# 3 batches an epoch, validated every 4 steps: epoch 0 ends (step 3) with no validation due
VALIDATING_ACROSS_EPOCHS = ["trainer.check_val_every_n_epoch=null", "trainer.val_check_interval=4"]


@pytest.mark.parametrize(
    ("signal_at", "extra", "saved_at"),
    [
        (["SignalAtBatch", "+callbacks.stop.batch=2"], [], None),
        (["SignalAtBatch", "+callbacks.stop.batch=3"], ACCUMULATING, None),
        (["SignalInValidation", "+callbacks.stop.step=3"], [], 3),
        (["SignalInValidation", "+callbacks.stop.step=1"], VALIDATING_MID_STEP, 2),
        (["SignalAtBatch", "+callbacks.stop.batch=2"], VALIDATING_ACROSS_EPOCHS, 3),
        (["SignalAtEpochEnd", "+callbacks.stop.epoch=0"], VALIDATING_ACROSS_EPOCHS, 3),
    ],
    ids=[
        "validation-due",
        "mid-accumulation",
        "in-validation",
        "in-validation-mid-step",
        "epoch-end",
        "in-epoch-end-hooks",
    ],
)
def test_a_signal_at_any_batch_resumes_as_the_uninterrupted_run(
    make_cfg, tmp_path: Path, signal_at: list[str], extra: list[str], saved_at: int | None
) -> None:
    # batch 2 ends epoch 0 at step 3, where validation and a checkpoint are due: the stop saved
    # before that validation, which the resume skipped (a row short, best-k ranked without it);
    # batch 3 (accumulating 2: epoch 1's first) steps no optimizer: the stop lost its gradient
    # (final train/loss 5.252 vs 5.251); a signal in step 3's validation (new user 38) waited
    # for step 4's end, a whole step more before the save; one in a validation half-way
    # through an accumulated step saves at that step's end (review 38: saved at the
    # validation, the resume lost the half step's gradient: test/loss 5.2068 for 5.1992); one
    # at an epoch's last batch, no validation due, saved before the epoch's end hooks, which
    # the resume skipped: its train/*_epoch row was lost; one in those hooks saved a batch later
    common = ["debug=tiny", "trainer.max_steps=6", "trainer.deterministic=true", *STOCHASTIC,
              "callbacks.expert_load.every_n_steps=2", *extra]  # fmt: skip
    full = make_cfg(common, output_dir=tmp_path / "full")
    full_metrics = run(full)
    stop = [f"+callbacks.stop._target_=tests.helpers.{signal_at[0]}", *signal_at[1:],
            f"+callbacks.stop.signum={int(signal.SIGTERM)}"]  # fmt: skip
    stopped = make_cfg([*common, *stop], output_dir=tmp_path / "stopped")
    with pytest.raises(Interrupted):
        run(stopped)
    last = Path(stopped.paths.output_dir) / "checkpoints" / "last.ckpt"
    if saved_at is not None:
        assert torch.load(last, weights_only=False)["global_step"] == saved_at
    best = resume_as_uninterrupted(make_cfg, common, last, tmp_path, full, full_metrics)
    assert [best_score(states) for states in best] == [best_score(best[0])] * 2
    if not extra:  # (not accumulating) step 3's validation ranked its weights before the stop
        assert (Path(stopped.paths.output_dir) / "checkpoints" / "best-3.ckpt").is_file()


def test_a_crash_in_a_validation_resumes_as_the_uninterrupted_run(make_cfg, tmp_path: Path
                                                                   ) -> None:  # fmt: skip
    # new user 39: last.ckpt was written as step 6 ended, before its validation; a run killed
    # in that validation resumed past it (Lightning counts a step's validation done with the
    # step): no val row, no train/*_epoch row, its weights never ranked. It is written after
    # the validation now, so the resume starts at step 3's and runs step 6's again
    common = ["debug=tiny", "trainer.max_steps=9", "trainer.deterministic=true", *STOCHASTIC]
    full = make_cfg(common, output_dir=tmp_path / "full")
    full_metrics = run(full)
    crash = ["+callbacks.crash._target_=tests.helpers.CrashInValidation",
             "+callbacks.crash.step=6"]  # fmt: skip
    crashed = make_cfg([*common, *crash], output_dir=tmp_path / "crashed")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(crashed)
    last = Path(crashed.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 3
    best = resume_as_uninterrupted(make_cfg, common, last, tmp_path, full, full_metrics)
    assert best_score(best[1]) == best_score(best[0])


def test_a_chain_of_stops_at_epoch_ends_resumes_as_the_uninterrupted_run(
    make_cfg, tmp_path: Path
) -> None:
    # review 39: a run resumed from a save as an epoch started (a stop at the last batch of
    # an epoch that validates every other epoch) kept one of Lightning's epoch counters a step
    # behind; its next such save then read as a finished epoch, and a mid-epoch stop after
    # that resumed as no restart at all: other batches (test/loss 4.7793837 for 4.7793474)
    common = ["debug=tiny", "trainer.max_steps=-1", "trainer.max_epochs=5",
              "trainer.check_val_every_n_epoch=2", "trainer.deterministic=true",
              *STOCHASTIC]  # fmt: skip
    full = make_cfg(common, output_dir=tmp_path / "full")
    full_metrics = run(full)
    ckpt = None
    for part, (batch, saved_at) in enumerate([(2, 3), (8, 9), (10, 11), (None, None)]):
        resume = [] if ckpt is None else [f"ckpt_path={ckpt}"]
        stop = [] if batch is None else [
            "+callbacks.stop._target_=tests.helpers.SignalAtBatch",
            f"+callbacks.stop.batch={batch}",
            f"+callbacks.stop.signum={int(signal.SIGTERM)}"]  # fmt: skip
        cfg = make_cfg([*common, *resume, *stop], output_dir=tmp_path / f"part{part}")
        if batch is None:
            metrics = run(cfg)
            break
        with pytest.raises(Interrupted):
            run(cfg)
        ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        assert torch.load(ckpt, weights_only=False)["global_step"] == saved_at
    assert untimed_rows(cfg) == untimed_rows(full)
    assert metrics["test/loss"] == full_metrics["test/loss"]


def untimed_rows(cfg) -> list[dict[str, float]]:
    """A run's CSV rows without its timing columns, which differ between any two runs."""
    timing = ("train/tokens_per_s", "train/samples_per_s")
    rows = read_metrics(Path(cfg.paths.output_dir))
    return [{k: v for k, v in row.items() if k not in timing} for row in rows]


def resume_as_uninterrupted(
    make_cfg, common: list[str], last: Path, tmp_path: Path, full, full_metrics: dict
) -> list[dict]:
    """Resume `common` from `last`; its CSV rows, test/loss and expert-load history (and
    heatmaps) must equal the uninterrupted run `full`'s. The `RankedCheckpoint` states of both
    runs' last.ckpt, to compare."""
    resumed = make_cfg([*common, f"ckpt_path={last}"], output_dir=tmp_path / "resumed")
    resumed_metrics = run(resumed)
    assert untimed_rows(resumed) == untimed_rows(full)
    assert resumed_metrics["test/loss"] == full_metrics["test/loss"]
    # new user 41: the resumed history lacked the windows before the checkpoint, and the one
    # across it averaged the resumed batches alone
    plots = [Path(c.paths.output_dir) / "plots" for c in (full, resumed)]
    histories = [dict(np.load(p / "expert_load_history.npz")) for p in plots]
    assert histories[0].keys() == histories[1].keys() == {"steps", "load", "layers"}
    for key, value in histories[0].items():
        np.testing.assert_array_equal(histories[1][key], value, err_msg=key)
    assert [sorted(f.name for f in p.glob("*.png")) for p in plots][0] == sorted(
        f.name for f in plots[1].glob("*.png")
    )
    return [torch.load(Path(c.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=False)
            ["callbacks"] for c in (full, resumed)]  # fmt: skip


def best_score(callback_states: dict) -> float:
    """The best validation score a checkpoint's `RankedCheckpoint` state holds."""
    (state,) = [v for k, v in callback_states.items() if k.startswith("RankedCheckpoint")]
    return float(state["best_model_score"])


def epoch_values(run_dir: Path) -> dict[str, list[float]]:
    """Every training epoch aggregate of a run (train/<metric>_epoch, train/<task>/<metric>)."""
    rows = read_metrics(run_dir)
    keys = {k for row in rows for k in row if k.startswith("train/")}
    keys = {k for k in keys if k.endswith("_epoch") or k.count("/") == 2}
    return {k: series(rows, k) for k in sorted(keys)}


@pytest.mark.parametrize(
    "data",
    [
        SMALL_TEXT,
        ["strategy=multitask"],  # these shuffled by one generator per loader: epoch 1's order
        ["data=digits"],  # hung on the generator's state, which no checkpoint held
        ["model=ssm", "data=selective_copying"],
    ],
    ids=["text", "multitask", "digits", "selective_copying"],
)
def test_resume_from_a_checkpoint_at_an_epochs_last_batch(make_cfg, tmp_path: Path,
                                                          data: list[str]) -> None:  # fmt: skip
    # debug=tiny's epoch is 3 batches: step 3's checkpoint ends epoch 0, and the resumed run
    # must start epoch 1 with all of its batches (the skip belongs to epoch 0 alone)
    common = [
        "debug=tiny",
        *data,
        "trainer.max_steps=7",
        "trainer.deterministic=true",
        "callbacks.model_checkpoint.save_top_k=-1",
        "callbacks.model_checkpoint.filename='step-{step}'",
    ]
    full = make_cfg(common, output_dir=tmp_path / "full")
    full_metrics = run(full)
    step_3 = Path(full.paths.output_dir) / "checkpoints" / "step-3.ckpt"
    resumed = make_cfg([*common, f"ckpt_path={step_3}"], output_dir=tmp_path / "resumed")
    resumed_metrics = run(resumed)
    losses = [series(read_metrics(Path(c.paths.output_dir)), "train/loss") for c in (full, resumed)]
    assert losses[1] == losses[0]  # steps 0-2 carried from the run's CSV, 3-6 on the same batches
    # (epoch 0's end, carried and logged again, once)
    assert untimed_rows(resumed) == untimed_rows(full)
    for key in ("val/loss", "test/loss", "test/acc"):
        if key in full_metrics:  # (multitask: per-task MSE, no accuracy)
            assert resumed_metrics[key] == full_metrics[key], key


def test_one_text_file_trains_cut_into_pieces(make_cfg, tmp_path: Path, caplog) -> None:
    # one book (tinyshakespeare) was refused: "need at least 3 documents, found 1"
    book = tmp_path / "book.txt"
    book.write_text("".join(f"w{i % 13} w{i % 7} said: line {i}\n" for i in range(3000)))
    data = [f"data.files={book}", "data.seq_len=32", "data.batch_size=4"]
    with caplog.at_level("INFO", logger="advarch"):
        metrics = run(make_cfg(["debug=tiny", *data], output_dir=tmp_path / "run"))
    assert (
        "data: 1 document; cut into 15 pieces at line ends (or spaces, in a long line) "
        "for the train/val/test split" in (caplog.messages)
    )
    assert torch.isfinite(torch.tensor(metrics["test/loss"]))


def test_a_resume_on_changed_files_stops_and_eval_warns(make_cfg, tmp_path: Path, caplog) -> None:
    # a file more re-splits the documents (and retrains a BPE tokenizer): resuming would train
    # on documents now held out, silently
    from advarch.eval import evaluate

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"d{i}.txt").write_text(" ".join(f"w{(i * j) % 17}" for j in range(300)))
    data = [f"data.files={corpus}/*.txt", "data.seq_len=32", "data.batch_size=4"]
    first = make_cfg(["debug=tiny", *data], output_dir=tmp_path / "first")
    run(first)
    last = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    (corpus / "added.txt").write_text("another document " * 50)
    resume = make_cfg(["debug=tiny", *data, f"ckpt_path={last}", "trainer.max_steps=9"],
                      output_dir=tmp_path / "resumed")  # fmt: skip
    with caplog.at_level("INFO", logger="advarch"), pytest.raises(
        CheckpointError, match="its data changed since it was written .* may have moved between "
        "train, val and test"
    ) as refused:  # fmt: skip
        run(resume)
    # new user 41: it named no file ("files added, removed or edited")
    assert f" now: {corpus}/added.txt added), so documents" in str(refused.value)
    assert "resuming" not in caplog.text  # (it said "resuming <ckpt> (step 6, …)" first)
    # … nor what its longer schedule would change (new user 38 L9: said, then refused)
    assert "learning rate" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="advarch"):
        evaluate(make_cfg([f"ckpt_path={last}", "wandb=false"], "eval", tmp_path / "eval"))
    assert "its data changed since it was written" in caplog.text
    (corpus / "added.txt").unlink()
    (corpus / "d0.txt").rename(corpus / "moved.txt")
    with pytest.raises(CheckpointError, match=f" now: {corpus}/moved.txt added, {corpus}/d0.txt "
                       "removed\\), so documents"):  # fmt: skip
        run(resume)
    original, stat = (corpus / "moved.txt").read_text(), (corpus / "moved.txt").stat()
    (corpus / "moved.txt").rename(corpus / "d0.txt")
    (corpus / "d0.txt").write_text("an edit " * 40)  # the same names: said as edited
    with pytest.raises(CheckpointError, match=" now: files edited\\), so documents"):
        run(resume)
    (corpus / "d0.txt").write_text(original)  # the same files again: resumes
    os.utime(corpus / "d0.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    caplog.clear()
    with caplog.at_level("INFO", logger="advarch"):
        assert run(resume)
    said = [r.getMessage() for r in caplog.records]
    resuming = next(i for i, m in enumerate(said) if m.startswith(f"resuming {last}"))
    assert said[resuming + 1].startswith("trainer.max_steps=9 (the checkpoint's run: 6)")


def test_generation_reads_the_checkpoints_own_tokenizer(make_cfg, tmp_path: Path,
                                                        caplog) -> None:  # fmt: skip
    # a BPE tokenizer retrained on edited files would give other ids: the checkpoint carries
    # the one it learnt with, and generation needs no data at all
    from advarch.generation import generate_text
    from advarch.trained_lm import load_lm

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"d{i}.txt").write_text(" ".join(f"w{(i * j) % 17}" for j in range(300)))
    data = [f"data.files={corpus}/*.txt", "data.seq_len=32", "data.batch_size=4",
            "data.tokenizer=bpe", "data.bpe_vocab_size=280"]  # fmt: skip
    cfg = make_cfg(["debug=tiny", *data], output_dir=tmp_path / "run")
    run(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=False)["tokenizer"]
    assert saved["kind"] == "bpe"

    def sample() -> tuple[str, str]:
        lm = load_lm(str(last))
        return lm.tokenizer.to_json(), generate_text(lm, "w3 w", 12, greedy=True)

    before = sample()
    assert before[0] == saved["json"]
    corpus.rename(tmp_path / "moved")  # the training files are gone
    caplog.clear()
    with caplog.at_level("WARNING", logger="advarch"):
        assert sample() == before
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_ckpt_path_auto_resumes_the_newest_run_of_its_run_name(
    project: Project, trained: dict[str, TrainedRun]
) -> None:
    earlier = trained["lm"].run_dir  # outputs/runs/moe-plain/<time>_<id>, made by the CLI
    link = project.root / "outputs" / "runs" / earlier.parent.name / earlier.name
    link.parent.mkdir(parents=True)
    link.symlink_to(earlier)
    state = torch.load(earlier / "checkpoints" / "last.ckpt", weights_only=False)
    state["hyper_parameters"]["cfg"]["seed"] += 1  # newer runs of another seed: passed over
    for i in range(3):
        foreign = link.parent / f"9999-seed-{i}" / "checkpoints" / "last.ckpt"
        foreign.parent.mkdir(parents=True)
        torch.save(state, foreign)
    resumed = project.run(*SESSION_LM, "ckpt_path=auto", "trainer.max_steps=9").check()
    said = [line for line in resumed.output.splitlines() if "ckpt_path=auto" in line]
    assert len(said) == 2, said
    assert "passing over 3 newer checkpoint(s) of other configurations" in said[0], said
    assert said[1].startswith(f"ckpt_path=auto: resuming {link}"), said
    assert "Restor" not in resumed.output  # Lightning's restore lines repeat ours
    other = project.run(*SESSION_LM, "ckpt_path=auto", "trainer.max_steps=9", "run_name=other")
    steps = {
        name: series(read_metrics(res.check().run_dir), "train/loss")
        for name, res in (("resumed", resumed), ("other", other))
    }
    earlier_losses = series(read_metrics(earlier), "train/loss")
    assert steps["resumed"][:6] == earlier_losses and len(steps["resumed"]) == 9  # then 7-9
    assert len(steps["other"]) == 9  # another run name starts fresh
    ckpt = torch.load(resumed.run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 9
    wandb_id = (earlier / "wandb_id.txt").read_text()
    assert (resumed.run_dir / "wandb_id.txt").read_text() == wandb_id  # the same W&B run goes on


def test_diverged_weights_are_never_saved(make_cfg) -> None:
    # lr 1e4: step 3's update made every weight NaN, its periodic save wrote them over the last
    # good last.ckpt (and as best-3.ckpt), and step 4's NaN loss then named that file "good"
    cfg = make_cfg([*TINY, "optimizer.lr=1e4", "scheduler=constant", "trainer.max_steps=30"])
    with pytest.raises(FloatingPointError) as diverged:
        run(cfg)
    saved = sorted((Path(cfg.paths.output_dir) / "checkpoints").glob("*.ckpt"))
    for ckpt in saved:
        state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
    named = str(diverged.value)
    assert "is NaN or inf at step" in named and "stopping without saving it" in named
    assert ("nothing to resume from" in named) == (not saved), named
    assert not saved or f"the last good checkpoint is {saved[-1]}" in named


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(make_cfg) -> None:
    cfg = make_cfg(
        [
            *TINY,
            "trainer.max_steps=10",
            "callbacks.model_checkpoint.every_n_train_steps=2",
            "+callbacks.poison._target_=tests.helpers.PoisonLossAtStep",
            "+callbacks.poison.step=4",
        ]
    )
    with pytest.raises(FloatingPointError, match="at step 4"):
        run(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["global_step"] == 4
    assert all(
        torch.isfinite(t).all() for t in state["state_dict"].values() if t.is_floating_point()
    )


@pytest.mark.slow
def test_ddp_simulated_on_two_cpu_processes(project: Project) -> None:
    # a task stream: its matrix R is evaluated outside Lightning's loops
    ddp_sim = [*TINY, "strategy=naive", "trainer=ddp_sim", "logger=wandb"]
    # SIGTERM to the launching process alone (`kill <pid>`, a container's stop) mid-task: its
    # workers never heard it, trained to the end, and it then exited 143 without a word
    stopped = project.run(*ddp_sim, "+callbacks.stop._target_=tests.helpers.SignalLauncherAtStep",
                          "+callbacks.stop.step=5", "+callbacks.stop.signum=15")  # fmt: skip
    saved = stopped.run_dir / "checkpoints" / "last.ckpt"
    assert stopped.rc == 143 and "Traceback" not in stopped.output, stopped.output[-3000:]
    assert f"SIGTERM received: saved {saved} at step 5\n" in stopped.stdout, stopped.output
    assert "advarch run summary" not in stopped.stdout and "received before" not in stopped.output
    assert torch.load(saved, weights_only=False)["global_step"] == 5
    res = project.run(*ddp_sim, "ckpt_path=auto").check()  # the rest, from that checkpoint
    assert f"resuming {saved} (step 5" in res.output
    assert "advarch run summary" in res.stdout
    ckpt = torch.load(res.run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    steps = ckpt["global_step"]  # both processes stepped together
    rows = read_metrics(res.run_dir)
    assert steps > 0 and len(series(rows, "train/loss")) == steps and series(rows, "test/loss")
    assert list(res.run_dir.glob("wandb/offline-run-*"))
    # the summary's numbers are the final weights' (the launching process's validation after
    # fit started from the first validation's sums: val/loss 2.1720 for 2.0403) …
    summary = json.loads((res.run_dir / "summary.json").read_text())["metrics"]
    last = [r for r in rows if "val/loss" in r][-1]
    assert summary["val/loss"] == pytest.approx(last["val/loss"], rel=1e-5)
    # … and R's last row is both processes' validation, as val/task_j logged it (it was
    # process 0's half of the examples: cl/avg_acc 0.3656 for 0.3328)
    tasks = [k for k in last if re.fullmatch(r"val/task_\d+/bpb", k)]
    assert len(tasks) == 4
    mean = sum(last[k] for k in tasks) / len(tasks)
    assert summary["cl/avg_bpb"] == pytest.approx(mean, rel=1e-5)
    # the spawned worker ignores the warnings the launching process does
    assert "sync_dist=True" not in res.output and "LeafSpec" not in res.output
    # nor W&B its `wandb.require("service")` warning each time ddp_spawn pickled the logger
    assert "wandb: WARNING" not in res.output
    # nor do the workers print DDP's start-up banner (per process, per fit/validate/test) or
    # Lightning's DistributedSampler advice (README's DDP section says it)
    assert "Initializing distributed" not in res.output and "distributed_backend" not in res.output
    assert "DistributedSampler" not in res.output and not re.search(r"\.py:\d+: ", res.output)


def test_config_error_is_one_line_naming_the_key(project: Project) -> None:
    res = project.run("model.num_heads=5")
    assert res.rc == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "model.num_heads=5" in last
    assert res.stderr.strip().endswith("must divide model.dim=128")
    assert "Traceback" not in res.stderr
    assert not res.new_runs  # stopped before any work: not even a run folder,
    assert not list((project.root / "outputs" / "runs").glob("*"))  # nor its run name's
    # (the run folder went, but outputs/runs/<run name> and outputs/runs stayed behind)
    assert not (project.root / "outputs" / "runs").exists()


def test_config_error_raised_from_run(make_cfg) -> None:
    with pytest.raises(ConfigError, match=r"model\.dim"):
        run(make_cfg([*TINY, "model.dim=abc"]))


def test_an_accuracy_to_optimize_keeps_its_highest_checkpoint(make_cfg) -> None:
    cfg = make_cfg([*TINY, "optimized_metric=val/acc", "trainer.val_check_interval=3"])
    assert cfg.callbacks.model_checkpoint.mode == "max"  # from the metric's name
    run(cfg)
    accuracy = {int(r["step"]) + 1: float(r["val/acc"]) for r in read_metrics(
        Path(cfg.paths.output_dir)) if r.get("val/acc")}  # fmt: skip
    (best,) = (Path(cfg.paths.output_dir) / "checkpoints").glob("best-*.ckpt")
    assert len(set(accuracy.values())) == len(accuracy) > 1
    assert best.name == f"best-{max(accuracy, key=accuracy.get)}.ckpt"


@pytest.mark.parametrize(
    ("metric", "mode"),
    [("val/loss", "min"), ("val/acc", "max"), ("cl/avg_acc", "max"), ("cl/forgetting", "min"),
     ("cl/bwt", "max"), ("test/task_2/bpb", "min"), ("train/tokens_per_s", "max"), (None, "min"),
     ("train/acc_epoch", "max"), ("train/loss_epoch", "min"), ("train/acc_step", "max")],
)  # fmt: skip
def test_metric_mode_by_name(metric: str | None, mode: str) -> None:
    assert metric_mode(metric) == mode


def test_checkpoints_are_written_beside_their_name_never_through_tmpdir(
    make_cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Lightning's fsspec transaction writes into TMPDIR and moves the file: across filesystems
    # that is a copy into last.ckpt, and a kill mid-copy left it empty
    import fsspec.implementations.local as local_fs

    def no_tmpdir(*args, **kwargs):
        raise OSError("TMPDIR used for a checkpoint")

    monkeypatch.setattr(local_fs.tempfile, "mkstemp", no_tmpdir)
    cfg = make_cfg(TINY)
    run(cfg)
    checkpoints = Path(cfg.paths.output_dir) / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 6
    assert not [p for p in checkpoints.iterdir() if ".tmp" in p.name]


def test_resuming_a_file_with_other_data_or_optimizer_is_one_line(make_cfg, tmp_path) -> None:
    # (its optimizer state would not load: KeyError 'momentum'; other data: a state_dict
    # traceback after the data was built, or silently another run)
    first = make_cfg(TINY, output_dir=tmp_path / "first")
    run(first)
    last = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    for change, named in (("optimizer=sgd", "optimizer."), ("data.seq_len=48", "data.seq_len=")):
        cfg = make_cfg([*TINY, f"ckpt_path={last}", change], output_dir=tmp_path / "again")
        with pytest.raises(CheckpointError, match=f"another configuration \\({named}") as err:
            run(cfg)
        assert "trainer.* may change" in str(err.value)
    longer = make_cfg([*TINY, f"ckpt_path={last}", "trainer.max_steps=7"], output_dir=tmp_path)
    assert run(longer)["test/loss"] > 0  # trainer settings may change


def test_the_best_checkpoint_is_ranked_by_its_own_validation(make_cfg, tmp_path: Path,
                                                              caplog) -> None:  # fmt: skip
    # validation every 3 steps mid-epoch, max_steps 8 off that cadence: Lightning's step save
    # ranked step-6 weights by step 3's score and never ranked the final weights
    overrides = [
        "debug=tiny",
        "trainer.limit_train_batches=50",
        "trainer.max_steps=8",
        "trainer.val_check_interval=3",
    ]
    cfg = make_cfg(overrides, output_dir=tmp_path / "run")
    metrics = run(cfg)
    run_dir = Path(cfg.paths.output_dir)
    rows = read_metrics(run_dir)
    scores = {int(r["step"]) + 1: r["val/loss"] for r in rows if "val/loss" in r}
    assert sorted(scores) == [3, 6, 8]  # the last step is validated inside fit
    assert metrics["val/loss"] == scores[8]
    step, best = min(scores.items(), key=lambda s: s[1])
    ckpt = torch.load(run_dir / "checkpoints" / f"best-{step}.ckpt", weights_only=False)
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("RankedCheckpoint"))
    assert ckpt["global_step"] == step and state["best_model_score"].item() == pytest.approx(best)
    assert [p.name for p in (run_dir / "checkpoints").glob("best-*.ckpt")] == [f"best-{step}.ckpt"]
    # resuming the finished run trains nothing, and says so
    last = run_dir / "checkpoints" / "last.ckpt"
    again = make_cfg([*overrides, f"ckpt_path={last}"], output_dir=tmp_path / "again")
    with caplog.at_level("INFO", logger="advarch"):
        assert run(again)["val/loss"] == metrics["val/loss"]
    assert "already reached trainer.max_steps=8 (step 8): nothing left to train" in caplog.text


def test_a_resume_with_another_checkpoint_cadence_keeps_the_ranked_record(
    make_cfg, tmp_path: Path, recwarn, caplog
) -> None:
    # the record's key held the cadence: resuming with another every_n_train_steps printed
    # Lightning's "Please add the following callbacks: [RankedCheckpoint{…}]" (tester 29 F4)
    first = make_cfg(["debug=tiny", "callbacks.model_checkpoint.every_n_train_steps=4",
                      "trainer.max_steps=4"], output_dir=tmp_path / "a")  # fmt: skip
    run(first)
    ckpt = torch.load(Path(first.paths.output_dir) / "checkpoints" / "last.ckpt",
                      weights_only=False)  # fmt: skip
    (key,) = [k for k in ckpt["callbacks"] if k.startswith("RankedCheckpoint")]
    assert key == "RankedCheckpoint{'monitor': 'val/loss', 'mode': 'min'}"
    keyed_by_cadence = (
        key[:-1]
        + ", 'every_n_train_steps': 4, 'every_n_epochs': 0, "
        + ("'train_time_interval': None}")
    )  # as checkpoints saved before this change name it
    ckpt["callbacks"] = {keyed_by_cadence: ckpt["callbacks"][key]}
    torch.save(ckpt, tmp_path / "old.ckpt")
    for name, extra in [("b", []), ("c", ["callbacks.model_checkpoint.monitor=val/acc",
                                          "callbacks.model_checkpoint.mode=max"])]:  # fmt: skip
        resumed = make_cfg(["debug=tiny", "trainer.max_steps=6", f"ckpt_path={tmp_path}/old.ckpt",
                            *extra], output_dir=tmp_path / name)  # fmt: skip
        with caplog.at_level("WARNING", logger="advarch"):
            run(resumed)
    assert not [w for w in recwarn if "Please add the following callbacks" in str(w.message)]
    afresh = "the checkpoint ranked its best by val/loss (min); this run ranks by val/acc (max)"
    assert caplog.text.count(afresh) == 1  # (said for the run that ranks another metric)


def test_a_record_key_with_a_time_interval_is_read_not_a_traceback() -> None:
    # a timedelta's repr is no literal: ast.literal_eval raised as such a run resumed
    from advarch.callbacks.ranked_checkpoint import _options

    key = ("{'monitor': 'val/loss', 'mode': 'min', 'every_n_train_steps': 0, 'every_n_epochs':"
           " None, 'train_time_interval': datetime.timedelta(seconds=60)}")  # fmt: skip
    assert _options(key) == {"monitor": "val/loss", "mode": "min"}


def test_a_run_ended_by_its_epochs_ranks_its_final_weights(make_cfg, tmp_path: Path) -> None:
    # the last epoch's 3 batches end off the 2-step cadence: its final weights were validated
    # after fit, where no checkpoint callback saw them, and best-2.ckpt stayed "best" though
    # step 3 scored better
    epochs = ["trainer.max_steps=-1", "trainer.max_epochs=1", "trainer.val_check_interval=2"]
    saves = "callbacks.model_checkpoint.every_n_train_steps=2"
    cfg = make_cfg(["debug=tiny", *epochs, saves], output_dir=tmp_path)
    run(cfg)
    run_dir = Path(cfg.paths.output_dir)
    scores = {int(r["step"]) + 1: r["val/loss"] for r in read_metrics(run_dir) if "val/loss" in r}
    assert sorted(scores) == [2, 3]  # the last step is validated inside fit
    step, best = min(scores.items(), key=lambda s: s[1])
    assert [p.name for p in (run_dir / "checkpoints").glob("best-*.ckpt")] == [f"best-{step}.ckpt"]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    state = next(v for k, v in last["callbacks"].items() if k.startswith("RankedCheckpoint"))
    assert state["best_model_score"].item() == pytest.approx(best)
    assert state["best_model_path"].endswith(f"best-{step}.ckpt")


def test_an_optimized_metric_not_logged_says_why(caplog) -> None:
    # with limit_val_batches=0 it listed 22 metric names instead
    from omegaconf import OmegaConf

    from advarch.train import _optimized_value

    cfg = OmegaConf.create({"optimized_metric": "val/loss", "trainer": {"limit_val_batches": 0}})
    with caplog.at_level("WARNING", logger="advarch"):
        assert math.isnan(_optimized_value(cfg, {"train/loss": 1.0}))
    assert "val/loss was not logged: trainer.limit_val_batches=0 validates nothing" in caplog.text
    cfg.trainer.limit_val_batches = 1.0
    caplog.clear()
    with caplog.at_level("WARNING", logger="advarch"):
        _optimized_value(cfg, {"train/loss": 1.0, "test/loss": 2.0})
    assert "val/loss was not logged: known: test/loss, train/loss" in caplog.text


def test_a_run_resumed_in_its_own_folder_warns_of_nothing(project: Project) -> None:
    # the resume a refused run suggests, `hydra.run.dir=<run> ckpt_path=<its last.ckpt>` (a
    # requeued job's too): Lightning warned that the checkpoint folder is not empty
    folder = project.root / "my run"
    project.run("debug=tiny", "trainer.max_steps=3", f"hydra.run.dir={folder}").check()
    again = project.run("debug=tiny", f"hydra.run.dir={folder}",
                        f"ckpt_path={folder}/checkpoints/last.ckpt").check()  # fmt: skip
    assert "exists and is not empty" not in again.output, again.output[-2000:]


def test_a_finished_run_trained_on_continues_its_step_and_epoch_count(make_cfg, tmp_path) -> None:
    # "nothing left to train; raise trainer.max_steps to train on": the final checkpoint (at
    # an epoch's end) went on at step 7 of epoch 3, not step 6 of epoch 2
    finished = make_cfg(TINY, output_dir=tmp_path / "six")  # 6 steps, 3 an epoch
    run(finished)
    last = Path(finished.paths.output_dir) / "checkpoints" / "last.ckpt"
    on = make_cfg([*TINY, "trainer.max_steps=9", f"ckpt_path={last}"], output_dir=tmp_path / "on")
    straight = make_cfg([*TINY, "trainer.max_steps=9"], output_dir=tmp_path / "nine")
    run(on), run(straight)
    timing = {"train/tokens_per_s", "train/samples_per_s"}  # (a resume's first step: none)
    steps = [[(r.get("epoch"), r["step"], sorted(r.keys() - timing))
              for r in read_metrics(Path(c.paths.output_dir))] for c in (on, straight)]  # fmt: skip
    assert steps[0] == steps[1]  # every row at the same step and epoch, with the same keys


@pytest.mark.slow
@pytest.mark.parametrize("signum", [15, 2])
def test_a_second_stop_signal_to_the_ddp_launcher_stops_its_workers(
    project: Project, signum: int
) -> None:
    # review 36: the second signal raised at once in the launching process, which removed the
    # stop request before the workers read it: they trained to the end (while it waited for
    # them at exit), and it said "received before training started: nothing saved" (SIGTERM)
    # or Lightning's "Detected KeyboardInterrupt" with exit code 1 (SIGINT)
    twice = ["+callbacks.stop._target_=tests.helpers.SignalLauncherAtStep",
             "+callbacks.stop.step=3", f"+callbacks.stop.signum={signum}",
             "+callbacks.stop.times=2"]  # fmt: skip
    stopped = project.run(*TINY, "trainer=ddp_sim", "trainer.max_steps=12", *twice)
    saved = stopped.run_dir / "checkpoints" / "last.ckpt"
    assert stopped.rc == 128 + signum, stopped.output[-3000:]
    assert "Detected KeyboardInterrupt" not in stopped.output
    assert "before training started" not in stopped.output, stopped.output[-3000:]
    assert torch.load(saved, weights_only=False)["global_step"] <= 4  # not trained to the end


@pytest.mark.slow
def test_a_ctrl_c_as_ddp_workers_start_is_one_stop(project: Project, tmp_path: Path) -> None:
    # review 36: a worker the Ctrl-C ended before its handlers failed its process; the
    # launcher raised KeyboardInterrupt for it, which Lightning's `_call_and_handle_interrupt`
    # turned into "Detected KeyboardInterrupt, attempting graceful shutdown ..." and exit 1
    ctrl_c = ["+callbacks.ctrlc._target_=tests.helpers.CtrlCAsWorkersStart",
              f"+callbacks.ctrlc.flag={tmp_path / 'sent'}"]  # fmt: skip
    spawned = "trainer.strategy=ddp_spawn"  # (trainer=ddp spawns its workers; ddp_sim forks)
    res = project.run(*TINY, "trainer=ddp_sim", "trainer.max_steps=3", *ctrl_c, spawned)
    assert (tmp_path / "sent").exists(), res.output[-3000:]
    assert res.rc == 130, res.output[-3000:]
    assert "Detected KeyboardInterrupt" not in res.output
    assert res.stderr.strip().endswith(
        "SIGINT received before training started: stopped, nothing saved"
    ), res.output[-3000:]
