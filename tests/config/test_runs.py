"""The W&B id a resumed run continues: a bad id file is skipped with a warning, never a crash."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from advarch.config.runs import (
    WANDB_ID_FILE,
    architecture_difference,
    config_mismatch,
    previous_wandb_id,
)
from tests.cli import Project


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"abc123\n", None), (b"", "empty"), (b"bad id/x", "has ' /'"), (b"\xff\xfe", "unreadable")],
)
def test_previous_wandb_id(tmp_path: Path, caplog, content: bytes, reason: str | None) -> None:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / WANDB_ID_FILE).write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="advarch"):
        run_id = previous_wandb_id(tmp_path / "checkpoints" / "last.ckpt")
    if reason is None:
        assert run_id == "abc123" and not caplog.records
    else:
        assert run_id is None
        assert f"{tmp_path / WANDB_ID_FILE} is not a W&B run id ({reason}" in caplog.text


def test_a_block_option_a_saved_config_lacks_is_its_default(make_cfg) -> None:
    # model=hybrid's YAML listed 2 of the SSM's 7 options until it listed all: its checkpoints
    # then read "written by a run of another model (model.ssm.d_conv=None there, 4 now)", and
    # ckpt_path=auto started such a run afresh
    cfg = make_cfg(["model=hybrid"])
    saved = OmegaConf.to_container(cfg, resolve=True)
    saved["model"]["ssm"] = {"d_state": 16, "expand": 2}
    del saved["model"]["swa"]["global_tokens"]  # (a default YAML writes as [], not ())
    assert config_mismatch({"hyper_parameters": {"cfg": saved}}, cfg) is None
    assert architecture_difference(saved, cfg) is None
    saved["model"]["ssm"]["d_conv"] = 3  # a value other than the default still differs
    assert config_mismatch({"hyper_parameters": {"cfg": saved}}, cfg) == (
        "model.ssm.d_conv=3 there, 4 now"
    )
    assert architecture_difference(saved, cfg)[0] == "model.ssm"


@pytest.mark.parametrize(("saved", "line", "finetune"), [
    (  # (it named model.feature_patch=64 and suggested a fine-tune, which was then refused)
        ["experiment=naive_permuted_digits"],
        "another task (data._target_=advarch.data.digits.PermutedDigitsDataModule there, "
        "advarch.data.text.TextDataModule now: a classification model, this run language "
        "modelling)",
        False,
    ),
    (["model=ssm"], "another model (model.layers=['ssm'] there, ['attn'] now)", False),  # (ffn)
    (["seed=7"], "another configuration (seed=7 there, 42 now)", True),
])  # fmt: skip
def test_a_resume_of_another_run_names_the_most_telling_difference(
    make_cfg, tmp_path: Path, saved: list[str], line: str, finetune: bool
) -> None:
    import torch

    from advarch.checkpoint import CheckpointError
    from advarch.config.runs import check_base_fits, resolve_checkpoint

    other = OmegaConf.to_container(make_cfg(["debug=tiny", *saved]), resolve=True)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": {}, "loops": {}, "hyper_parameters": {"cfg": other}}, ckpt)
    (tmp_path / "run" / ".hydra").mkdir()  # its command line, as Hydra records it
    (tmp_path / "run" / ".hydra" / "overrides.yaml").write_text(f"- debug=tiny\n- {saved[0]}\n")
    cfg = make_cfg(["debug=tiny", "seed=42"])
    with pytest.raises(CheckpointError) as err:
        resolve_checkpoint(str(ckpt), tmp_path / "runs", cfg, tmp_path / "out")
    assert (
        f"was written by a run of {line}; resume it with its own options (its run: python "
        f"train.py debug=tiny {saved[0]}) (trainer.* may change)"
    ) in str(err.value)
    hint = f"strategy=finetune strategy.pretrained={ckpt}"
    assert (hint in str(err.value)) == finetune
    if finetune:  # followed, the fine-tune's base fits
        check_base_fits(make_cfg(["debug=tiny", "seed=42", *hint.split()]))
    elif saved == ["model=ssm"]:  # a fine-tune of it names the base's options too
        with pytest.raises(CheckpointError) as err:
            check_base_fits(make_cfg(["debug=tiny", *hint.split()]))
        assert str(err.value).endswith(
            "a fine-tune keeps its base's model sizes (its run: python train.py debug=tiny "
            "model=ssm)"
        )


def test_auto_resumes_the_runs_own_folder_before_a_newer_run(make_cfg, tmp_path: Path) -> None:
    # `hydra.sweep.dir=<old sweep> ckpt_path=auto` resumed each trial from a newer sweep's
    # checkpoints of the same overrides, though the hint said it resumes that folder's trials
    import os

    import torch

    from advarch.config.runs import resolve_checkpoint

    cfg = make_cfg([])
    saved = OmegaConf.to_container(cfg, resolve=True)
    state = {"hyper_parameters": {"cfg": saved}, "loops": {}, "state_dict": {}}
    own, newer = tmp_path / "old_sweep" / "0", tmp_path / "new_sweep" / "0"
    for folder, when in ((own, 1_000_000), (newer, 2_000_000)):
        (folder / "checkpoints").mkdir(parents=True)
        torch.save(state, folder / "checkpoints" / "last.ckpt")
        os.utime(folder / "checkpoints" / "last.ckpt", (when, when))
    found = resolve_checkpoint("auto", None, cfg, own, earlier_trials=[newer])
    assert found == own / "checkpoints" / "last.ckpt"
    elsewhere = tmp_path / "fresh_sweep" / "0"  # a new folder: the newest of the earlier ones
    assert resolve_checkpoint("auto", None, cfg, elsewhere, [own, newer]) == (
        newer / "checkpoints" / "last.ckpt"
    )


def test_resuming_with_another_max_steps_says_the_schedule_is_recomputed(
    make_cfg, tmp_path: Path
) -> None:
    # new-user 37 F10: "raise trainer.max_steps to train on" restarted the cosine part-way up
    # (lr 2e-4 at the old end, 1.2e-3 a step later), without a word
    import torch

    from advarch.config.runs import schedule_change

    saved = make_cfg(["debug=tiny", "trainer.max_steps=30"])
    ckpt = tmp_path / "last.ckpt"
    config = OmegaConf.to_container(saved, resolve=True)
    torch.save({"state_dict": {}, "global_step": 30, "hyper_parameters": {"cfg": config}}, ckpt)
    longer = make_cfg(["debug=tiny", "trainer.max_steps=60"])
    said = schedule_change(ckpt, longer)
    assert said is not None and said.startswith(
        "trainer.max_steps=60 (the checkpoint's run: 30): scheduler=cosine is computed over 60 "
        "steps from here on, so the learning rate at step 30 is "
    ), said
    assert schedule_change(ckpt, saved) is None  # the same length
    # a constant rate past both warm-ups: nothing changes
    constant = ["debug=tiny", "scheduler=constant"]
    config = OmegaConf.to_container(make_cfg([*constant, "trainer.max_steps=30"]), resolve=True)
    torch.save({"state_dict": {}, "global_step": 30, "hyper_parameters": {"cfg": config}}, ckpt)
    assert schedule_change(ckpt, make_cfg([*constant, "trainer.max_steps=60"])) is None


def test_a_constant_schedule_whose_warm_up_grows_past_the_resumed_step_is_said(
    make_cfg, tmp_path: Path
) -> None:
    # review 37b: scheduler=constant's warm-up is min(warmup_steps, total_steps // 10): 10 steps
    # of a 100-step run, 50 of a 1000-step one. Resumed at step 20 with max_steps=1000, the lr
    # falls from 1.0x to 21/50 = 0.42x and climbs again, yet `schedule_change` returns None
    # for every constant schedule
    import torch

    from advarch.config.runs import schedule_change
    from advarch.strategies.optimization import constant

    saved = make_cfg(["debug=tiny", "scheduler=constant", "trainer.max_steps=100"])
    ckpt = tmp_path / "last.ckpt"
    config = OmegaConf.to_container(saved, resolve=True)
    torch.save({"state_dict": {}, "global_step": 20, "hyper_parameters": {"cfg": config}}, ckpt)
    longer = make_cfg(["debug=tiny", "scheduler=constant", "trainer.max_steps=1000"])
    rates = []
    for total in (100, 1000):  # (the premise: the rate at the resumed step changes)
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        schedule = constant(optimizer, total, warmup_steps=50)
        rates.append(schedule.lr_lambdas[0](20))
    assert rates == [1.0, 21 / 50]
    assert schedule_change(ckpt, longer) is not None


def test_a_resume_that_scores_other_sequences_goes_on_and_says_so(make_cfg, tmp_path: Path) -> None:
    # new user 38 M5: ckpt_path=auto with data.max_eval_sequences=64 (128 when it started)
    # passed over the run's checkpoint, "no checkpoint of this configuration; starting fresh":
    # a requeued job whose command asked for more validation sequences trained from step 0
    import torch

    from advarch.config.runs import evaluation_change, resolve_checkpoint

    saved = make_cfg(["debug=tiny"])
    ckpt = tmp_path / "runs" / "2026-12-07_10-00-00_abcdef" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    config = OmegaConf.to_container(saved, resolve=True)
    torch.save({"state_dict": {}, "loops": {}, "global_step": 3,
                "hyper_parameters": {"cfg": config}}, ckpt)  # fmt: skip
    more = make_cfg(["debug=tiny", "data.max_eval_sequences=64"])
    saved_state = torch.load(ckpt, weights_only=False)
    assert config_mismatch(saved_state, more, resuming=True) is None
    # (review 38 H2) other comparisons still tell them apart: the RETRO report's plain decoder
    # scored on other sequences than RETRO's
    assert config_mismatch(saved_state, more, ("model", "data")) == (
        "data.max_eval_sequences=128 there, 64 now"
    )
    assert resolve_checkpoint("auto", tmp_path / "runs", more, tmp_path / "new") == ckpt
    assert evaluation_change(ckpt, more) == (
        "data.max_eval_sequences=64 (the checkpoint's run: 128): validation and the test score "
        "other sequences than its curves so far, its best checkpoints' ranking and early "
        "stopping's count"
    )
    assert evaluation_change(ckpt, saved) is None


def test_the_run_a_refusal_names_is_a_command_a_shell_takes(tmp_path: Path) -> None:
    # new user 38 L5: `data.curriculum=[{seq_len: 64, num_tokens_to_copy: 8}]` was named bare:
    # pasted, bash split the list into three words
    import shlex

    from advarch.checkpoint import ran_with

    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    curriculum = "data.curriculum=[{seq_len: 64, num_tokens_to_copy: 8}]"
    (tmp_path / "run" / ".hydra" / "overrides.yaml").write_text(f"- model=ssm\n- '{curriculum}'\n")
    said = ran_with(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert said == f" (its run: python train.py model=ssm '{curriculum}')"
    assert shlex.split(said[len(" (its run: ") : -1])[3] == curriculum


def test_the_run_a_refusal_names_keeps_its_config_folder(project: Project) -> None:
    # new user 41: "its run: python train.py experiment=mine …" left out `--config-dir myconf`,
    # and the command pasted was refused (`experiment=mine is not an experiment config`); so was
    # report.md's Overrides line
    import shlex

    from advarch.reports.markdown import run_report

    experiment = project.root / "myconf" / "experiment"
    experiment.mkdir(parents=True)
    (experiment / "mine.yaml").write_text("# @package _global_\nrun_name: mine\n")
    first = project.run("--config-dir", "myconf", "experiment=mine", "debug=tiny",
                        "trainer.max_steps=1").check()  # fmt: skip
    last = first.run_dir / "checkpoints" / "last.ckpt"
    refused = project.run("--config-dir", "myconf", "experiment=mine", "debug=tiny",
                          f"ckpt_path={last}", "seed=3")  # fmt: skip
    assert refused.rc == 1, refused.output[-2000:]
    folder = project.root / "myconf"
    named = f"(its run: python train.py --config-dir {folder} experiment=mine debug=tiny "
    assert named in refused.stderr, refused.stderr[-2000:]
    command = refused.stderr.split("(its run: ", 1)[1].split(")", 1)[0]
    assert shlex.split(command)[2:4] == ["--config-dir", str(folder)]
    project.shell(f"{command} ckpt_path={last}").check()  # (pasted: it resumes that run)
    report = run_report(first.run_dir)
    overrides = (
        f"Overrides: `--config-dir {folder}` `experiment=mine` `debug=tiny` `trainer.max_steps=1`"
    )
    assert overrides in report.lines, report.lines[:4]


def test_a_typed_search_path_is_named_as_typed_beside_the_config_dir(tmp_path: Path) -> None:
    # (review 41: both were named `--config-dir`, of which Hydra keeps the last)
    from advarch.checkpoint import config_dir_options

    (tmp_path / ".hydra").mkdir()
    sources = [("hydra.conf", "pkg", "hydra"), ("advarch.configs", "pkg", "main"),
               ("/a", "file", "command-line"), ("/b", "file", "hydra.searchpath in command-line"),
               ("my.pkg", "pkg", "hydra.searchpath in command-line")]  # fmt: skip
    record = {"hydra": {"runtime": {"config_sources": [
        {"path": p, "schema": s, "provider": v} for p, s, v in sources]}}}  # fmt: skip
    (tmp_path / ".hydra" / "hydra.yaml").write_text(OmegaConf.to_yaml(record))
    assert config_dir_options(tmp_path) == [
        ["--config-dir", "/a"],
        ["hydra.searchpath=[file:///b,pkg://my.pkg]"],
    ]


def test_a_fine_tune_may_untie_its_bases_head_but_not_tie_it(make_cfg, tmp_path: Path) -> None:
    # new user 42: `model.tie_embeddings=false` trains a head of its own on frozen embeddings
    # (a tied base's weights fit the untied model); the reverse would drop the base's head
    import torch

    from advarch.checkpoint import CheckpointError
    from advarch.config.runs import check_base_fits

    for tied, untie in ((True, True), (False, False)):
        base = make_cfg(["debug=tiny", f"model.tie_embeddings={tied}"])
        ckpt = tmp_path / f"{tied}.ckpt"
        saved = OmegaConf.to_container(base, resolve=True)
        torch.save({"state_dict": {}, "hyper_parameters": {"cfg": saved}}, ckpt)
        cfg = make_cfg(["debug=tiny", "strategy=finetune", f"strategy.pretrained={ckpt}",
                        f"model.tie_embeddings={not tied}"])  # fmt: skip
        if untie:
            check_base_fits(cfg)
        else:
            with pytest.raises(
                CheckpointError,
                match="trained with model.tie_embeddings=False, "
                "this run has model.tie_embeddings=True",
            ):
                check_base_fits(cfg)
