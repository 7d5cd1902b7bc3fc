"""`python eval.py` on checkpoints trained through the command line (the session's runs)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from advarch.errors import ConfigError
from advarch.eval import evaluate, evaluated_precision
from tests.cli import Project, read_metrics
from tests.conftest import TrainedRun


def eval_metrics(project: Project, monkeypatch: pytest.MonkeyPatch, *args: str) -> dict[str, float]:
    """The metrics of `python eval.py <args>` in the project folder, run in this process (its
    argument handling included): for tests of what is evaluated, not of what eval.py says."""
    from hydra.core.global_hydra import GlobalHydra

    from advarch.eval import main

    out = project.root / "outputs" / "runs" / "eval" / "in-process"
    monkeypatch.chdir(project.root)
    monkeypatch.setattr(sys, "argv", ["eval.py", *args, "wandb=false", f"hydra.run.dir={out}"])
    GlobalHydra.instance().clear()
    try:
        main()
    finally:
        GlobalHydra.instance().clear()
    return json.loads((out / "metrics.json").read_text())


def test_eval_data_swap_evaluates_the_given_data(
    project: Project, trained: dict[str, TrainedRun], monkeypatch: pytest.MonkeyPatch
) -> None:
    # on its own data eval.py gives the run's test metrics (test_readme's eval.py line)
    run = trained["lm"]
    same = [r for r in read_metrics(run.run_dir) if "test/loss" in r][-1]
    shorter = eval_metrics(
        project,
        monkeypatch,
        f"ckpt_path={run.ckpt}",
        "data=text",
        "data.max_documents=40",
        "data.seq_len=16",
        "data.batch_size=4",
    )
    assert shorter["test/loss"] != pytest.approx(same["test/loss"], rel=1e-3)


def test_eval_of_a_checkpoint_that_does_not_fit_the_data_is_one_line(
    project: Project, trained: dict[str, TrainedRun]
) -> None:
    # data of another kind: said so (it listed 100+ missing keys, or a strategy key's rule)
    for data, kind in [("digits", "classification"), ("seq2seq_reverse", "sequence-to-sequence")]:
        res = project.run(f"ckpt_path={trained['lm'].ckpt}", f"data={data}", script="eval.py")
        assert res.rc == 1 and "Traceback" not in res.stderr
        assert res.stderr.strip() == (
            f"error: ckpt_path={str(trained['lm'].ckpt)!r} is a language modelling model and "
            f"data={data} is {kind} data: evaluate it on data of its own kind (or leave data= "
            "out: its own data)"
        )
    # of its kind, other sizes: the first tensor that does not fit
    res = project.run(f"ckpt_path={trained['lm'].ckpt}", "data=selective_copying",
                      script="eval.py")  # fmt: skip
    assert res.rc == 1 and "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ckpt_path=") and "does not fit this data/model" in last
    assert (  # (torch's "copying a param with shape torch.Size(…)" reworded)
        "does not fit this data/model: model.input.weight is [259, 32] in the checkpoint, "
        "[16, 32] in this model; this data sizes the model otherwise than its run's (its run: "
        "python train.py debug=tiny "
    ) in last and last.endswith("): leave data= out"), last


def test_eval_on_a_task_stream_scores_each_task_and_prints_one_table(
    project: Project, trained: dict[str, TrainedRun]
) -> None:
    # an LM of one corpus evaluated on the four text domains: each domain's own values, one
    # table (metrics by domain), not Lightning's copies of the overall values per loader
    domains = ["text", "net", "concurrency", "codecs"]
    small = ["data.max_documents=6", "data.seq_len=32"]
    res = project.run(f"ckpt_path={trained['lm'].ckpt}", "data=text_domains", *small,
                      script="eval.py").check()  # fmt: skip
    metrics = json.loads((res.run_dir / "metrics.json").read_text())
    # the domains were tokenised into this project's cache, not the training run's project's
    trained_project = trained["lm"].run_dir.parents[3]
    assert list((project.root / "outputs" / "cache").glob("text_domains-*"))
    assert not list((trained_project / "outputs" / "cache").glob("text_domains-*"))
    per_domain = [metrics[f"test/task_{j}/bpb"] for j in range(len(domains))]
    assert len(set(per_domain)) == len(domains), per_domain
    assert min(per_domain) < metrics["test/bpb"] < max(per_domain)
    lines = res.stdout.splitlines()
    header = next(line for line in lines if line.startswith("test metrics"))
    assert header.split()[2:] == ["all", *domains]
    bpb = next(line for line in lines if line.startswith("bpb ")).split()[1:]
    assert [float(v) for v in bpb] == pytest.approx([metrics["test/bpb"], *per_domain], abs=1e-4)
    assert "DataLoader" not in res.stdout
    # the console shows messages alone and leaves out Lightning's empty announcements; the
    # run's log file keeps them with their time and logger
    assert "Seed set to" not in res.stdout and "][INFO]" not in res.stdout
    assert "Seed set to" in (res.run_dir / "eval.log").read_text()  # (named for the program)
    assert not (res.run_dir / "train.log").exists()


def test_data_keys_without_data_change_the_checkpoints_own_data(
    project: Project, trained: dict[str, TrainedRun], make_cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = trained["lm"]
    fewer = eval_metrics(project, monkeypatch, f"ckpt_path={run.ckpt}", "data.max_eval_sequences=3")
    tested = [r for r in read_metrics(run.run_dir) if "test/loss" in r][-1]
    assert fewer["test/loss"] != pytest.approx(tested["test/loss"], rel=1e-4)
    # a debug=tiny run tests 2 batches: limit_test_batches=1.0 tests them all (24 sequences)
    every = eval_metrics(project, monkeypatch, f"ckpt_path={run.ckpt}", "limit_test_batches=1.0")
    assert every["test/loss"] != pytest.approx(tested["test/loss"], rel=1e-4)
    typo = make_cfg([f"ckpt_path={run.ckpt}", "+data_overrides.max_eval_seqs=3"], "eval")
    with pytest.raises(ConfigError, match="did you mean data.max_eval_sequences"):
        evaluate(typo)
    # (Lightning's traceback: "You requested to check 0.0001 of the `test_dataloader` …")
    none = make_cfg([f"ckpt_path={run.ckpt}", "limit_test_batches=0.0001"], "eval")
    with pytest.raises(ConfigError) as refused:
        evaluate(none)
    assert str(refused.value) == (
        "limit_test_batches=0.0001 of 6 batches is none: give at least 0.167, or a count of batches"
    )


def test_eval_tests_in_the_runs_precision(make_cfg, tmp_path) -> None:
    # a bf16-mixed run's test numbers differ from float32's in the 4th digit: eval.py must
    # repeat the run's numerics, not only its batches
    from advarch.train import run

    train_cfg = make_cfg(["debug=tiny", "model=transformer", "trainer.precision=bf16-mixed"])
    tested = run(train_cfg)
    ckpt = f"{train_cfg.paths.output_dir}/checkpoints/last.ckpt"
    cfg = make_cfg([f"ckpt_path={ckpt}"], "eval", tmp_path / "eval")
    evaluated = evaluate(cfg).metrics
    for key in ("test/loss", "test/acc", "test/bpb"):
        assert evaluated[key] == pytest.approx(tested[key], rel=1e-6), key
    # a debug=* run logged no W&B run (CSV only): nor does its evaluation, unless asked
    assert not (tmp_path / "eval" / "wandb").exists()
    for typed, said in (("yes", "'yes'"), ("1", "1")):
        with pytest.raises(ConfigError, match=f"^wandb={said} must be true, false or null"):
            evaluate(make_cfg([f"ckpt_path={ckpt}", f"wandb={typed}"], "eval", tmp_path / "e2"))


def test_a_model_class_that_cannot_be_imported_is_one_line(
    project: Project, trained: dict[str, TrainedRun], tmp_path
) -> None:
    # a run of your own model (`--config-dir`), evaluated where its module is not importable:
    # Hydra's "Error executing job … set env var HYDRA_FULL_ERROR=1"
    import torch

    ckpt = torch.load(trained["lm"].ckpt, weights_only=False)
    ckpt["hyper_parameters"]["cfg"]["model"]["_target_"] = "mypkg.models.Net"
    ckpt.pop("tokenizer", None)  # (generate then rebuilds the data first, as for old runs)
    moved = tmp_path / "own.ckpt"
    torch.save(ckpt, moved)
    for script in ("eval.py", "scripts/generate.py"):
        res = project.run(f"ckpt_path={moved}", script=script)
        assert res.rc == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-1000:]
        assert "model._target_='mypkg.models.Net' cannot be imported" in lines[0]


def test_a_bpe_model_reads_other_files_with_its_own_tokenizer(
    project: Project, make_cfg, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # eval.py on other files learnt a new BPE from them and scored the model with ids that
    # mean other text, silently (or, on few files, refused a vocabulary of another size); a
    # fine-tune on other files was refused. Both now tokenise with the model's own tokenizer.
    import torch

    from advarch.data.tokenizer import BPETokenizer
    from advarch.train import run

    def corpus(name: str, files: int, word: int) -> str:
        folder = tmp_path / name
        folder.mkdir()
        for i in range(files):
            (folder / f"d{i}.txt").write_text(" ".join(f"w{(i * j) % word}" for j in range(300)))
        return f"data.files={folder}/*.txt"

    base_files, other_files = corpus("base", 12, 17), corpus("other", 6, 5)  # too few merges
    bpe, small = ["data.tokenizer=bpe", "data.bpe_vocab_size=280"], ["data.seq_len=32"]
    base = make_cfg(["debug=tiny", base_files, *bpe, *small], output_dir=tmp_path / "base")
    run(base)
    ckpt = Path(base.paths.output_dir) / "checkpoints" / "last.ckpt"
    learnt = BPETokenizer.from_json(torch.load(ckpt, weights_only=False)["tokenizer"]["json"])

    def caches() -> set[Path]:  # (the cache folder is shared by the test session)
        return set((project.root / "outputs" / "cache").glob("text-*/bpe.json"))

    before = caches()
    metrics = eval_metrics(project, monkeypatch, f"ckpt_path={ckpt}", "data=text", other_files,
                           *small)  # fmt: skip
    built = caches() - before
    assert metrics["test/bpb"] > 0 and len(built) == 1
    assert BPETokenizer.load(built.pop()).to_json() == learnt.to_json()
    # keys that leave the tokenizer's source as it was keep the run's own cache (its name)
    before = caches()
    eval_metrics(project, monkeypatch, f"ckpt_path={ckpt}", "data.max_eval_sequences=3")
    run_cache = torch.load(ckpt, weights_only=False)["data_cache"]
    assert {p.parent.name for p in caches() - before} <= {run_cache}  # (reused, or its name)
    # a tokenizer typed for it is refused: the model knows its own ids only
    with pytest.raises(SystemExit) as refused:
        eval_metrics(project, monkeypatch, f"ckpt_path={ckpt}", "data.tokenizer=bpe")
    assert str(refused.value.code) == (
        "error: data.tokenizer: eval.py tokenises text with the checkpoint's own tokenizer (BPE, "
        f"{learnt.vocab_size} ids), the ids its model learnt; leave data.tokenizer out"
    )

    # a fine-tune takes its base's tokenizer, and its kind and size, without being told
    tune = ["debug=tiny", "strategy=finetune", f"strategy.pretrained={ckpt}", *small]
    finetune = make_cfg([*tune, other_files], output_dir=tmp_path / "finetune")
    run(finetune)
    assert finetune.data.tokenizer_from == str(ckpt.resolve())
    assert finetune.data.bpe_vocab_size == 280 and finetune.data.tokenizer == "bpe"
    # the base's own size typed (as its run's command line has it) is no contradiction
    typed = make_cfg([*tune, other_files, "data.bpe_vocab_size=280", "trainer.max_steps=1"],
                     output_dir=tmp_path / "typed")  # fmt: skip
    assert run(typed)["test/bpb"] > 0
    tuned = Path(finetune.paths.output_dir) / "checkpoints" / "last.ckpt"
    state = torch.load(tuned, weights_only=False)["tokenizer"]["json"]
    assert BPETokenizer.from_json(state).to_json() == learnt.to_json()
    # one from before data.tokenizer_from (of its base's files, the only data it could have)
    # resumes as it ran: learning the same BPE from them, in the same data cache
    older = make_cfg([*tune, base_files, *bpe], output_dir=tmp_path / "older")
    run(older)
    written = torch.load(Path(older.paths.output_dir) / "checkpoints" / "last.ckpt",
                         weights_only=False)  # fmt: skip
    written["hyper_parameters"]["cfg"]["data"].pop("tokenizer_from")
    written["data_cache"] = run_cache
    torch.save(written, tmp_path / "older.ckpt")
    resumed = make_cfg([*tune, base_files, *bpe, f"ckpt_path={tmp_path / 'older.ckpt'}",
                        "trainer.max_steps=8"], output_dir=tmp_path / "resumed")  # fmt: skip
    assert run(resumed)["test/bpb"] > 0 and resumed.data.tokenizer_from is None
    # its config names the base's checkpoint as its tokenizer's: gone, the fine-tune's serves
    ckpt.rename(ckpt.with_name("moved.ckpt"))
    assert eval_metrics(project, monkeypatch, f"ckpt_path={tuned}")["test/bpb"] > 0


def test_data_of_other_tasks_that_fill_the_head_alike_is_refused(
    project: Project, make_cfg, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # ten classes of one task read as five tasks of two (data=split_digits): acc 0.603, no word
    from advarch.train import run

    cfg = make_cfg(["data=digits", "debug=tiny"], output_dir=tmp_path / "digits")
    run(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    line = (
        f"error: ckpt_path={str(ckpt)!r} learnt one head of 10 outputs and this data has a head "
        "of 2 outputs per task for 5 tasks: its head would be read as another's"
    )
    with pytest.raises(SystemExit, match=f"^{re.escape(line)}"):
        eval_metrics(project, monkeypatch, f"ckpt_path={ckpt}", "data=split_digits")


def test_a_shared_heads_stream_is_evaluated_on_any_data_of_its_outputs(make_cfg) -> None:
    # new user 38 M3: a domain stream's one head of 10 digits (experiment=ewc_permuted_digits)
    # was refused on data=digits and data=rotated_digits ("5 task(s) of 10 outputs", "its head
    # would be read as another's"): it reads any 10 digits as it learnt them
    from dataclasses import asdict

    from advarch.data.digits import PermutedDigitsDataModule
    from advarch.eval import check_data_kind

    learnt = PermutedDigitsDataModule(num_tasks=5, scenario="domain").spec
    ckpt = {"hyper_parameters": {"spec": asdict(learnt)}}
    for data in ("digits", "rotated_digits", "split_digits data.scenario=class"):
        check_data_kind("stream.ckpt", ckpt, make_cfg([*f"data={data}".split(), "debug=tiny"]))
    with pytest.raises(ConfigError, match="has a head of 2 outputs per task for 5 tasks"):
        check_data_kind("stream.ckpt", ckpt, make_cfg(["data=split_digits", "debug=tiny"]))


def test_the_runs_test_batch_count_was_each_of_its_processes() -> None:
    # a 2-process debug=tiny run tested 4 batches; eval.py on one process tested 2 (7.5122 for
    # the run's 7.5212)
    from omegaconf import OmegaConf

    from advarch.eval import runs_test_limit

    saved = OmegaConf.create({"trainer": {"limit_test_batches": 2}})
    assert runs_test_limit(saved, {"world_size": 2}) == 4
    assert runs_test_limit(saved, {}) == 2  # (a checkpoint from before the count)
    fraction = OmegaConf.create({"trainer": {"limit_test_batches": 0.5}})
    assert runs_test_limit(fraction, {"world_size": 2}) == 0.5


def test_the_unigram_baseline_is_the_runs_training_texts() -> None:
    # `data.domains=[net]` counted net's training text alone: 4.4355 for the run's 4.5602
    from types import SimpleNamespace

    import torch

    from advarch.eval import use_runs_unigram

    module = SimpleNamespace(objective=SimpleNamespace(unigram_bits=torch.ones(3)))

    def ckpt(extras: dict) -> dict:
        return {"hyper_parameters": {"spec": {"extras": extras}}}

    use_runs_unigram(module, ckpt({"unigram_bits": [1, 2, 3]}))
    assert module.objective.unigram_bits.tolist() == [1.0, 2.0, 3.0]
    use_runs_unigram(module, ckpt({}))  # (a checkpoint from before the table)
    assert module.objective.unigram_bits.tolist() == [1.0, 2.0, 3.0]


def test_eval_wandb_run_lands_in_the_training_runs_group(project: Project) -> None:
    # hunter 31: eval.yaml says its W&B run goes to "the training run's group". train.py
    # groups a run by its experiment (`tracker_group(run_name, experiment)`), a sweep trial by
    # its sweep; eval.py used `saved.run_name`, so for `experiment=…` runs (whose run_name is
    # not the experiment's name, e.g. under debug=tiny, fewshot_synthetic-1shot-none,
    # mmoe_synthetic-mmoe-p1.0) the evaluation sat in a group of its own.
    from tests.wandb_offline import offline_run

    weighted = "strategy.task_weights=[1.0,2.0]"
    train = project.run("experiment=mmoe_synthetic", "debug=tiny", "logger=wandb", weighted).check()
    ckpt = train.run_dir / "checkpoints" / "last.ckpt"
    evaluated = project.run(f"ckpt_path={ckpt}", script="eval.py").check()
    # (review 41) eval.py's table says what its overall loss is, as the run's summary does
    said = "loss (all) = the tasks' losses weighted by strategy.task_weights=[1.0, 2.0] (the"
    assert said in train.stdout and said in evaluated.stdout, evaluated.stdout[-2000:]
    run, eval_run = offline_run(train.run_dir), offline_run(evaluated.run_dir)
    assert run["group"] == "mmoe_synthetic"  # (train.py: the experiment's name)
    assert eval_run["job_type"] == "eval"
    assert eval_run["group"] == run["group"]


@pytest.mark.parametrize(("trained", "evaluated"), [
    ("bf16-true", "bf16-mixed"), ("16-true", "16-mixed"), ("bf16-mixed", "bf16-mixed"),
    ("32-true", "32-true"), (None, "32-true"),
])  # fmt: skip
def test_a_run_of_16_bit_weights_is_evaluated_in_mixed_precision(trained, evaluated) -> None:
    # (review 36: train.py refuses bf16-true now, whose metrics sum in 16 bits; a run trained so
    # before was evaluated in it all the same)
    assert evaluated_precision(trained) == evaluated


def test_strategy_keys_change_the_checkpoints_own_strategy(
    project: Project, make_cfg, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # new user 38 M4: `strategy.adaptation=none` said "did you mean strategy_overrides?", and
    # `strategy_overrides.adaptation=none` then "is not a key of strategy_overrides (keys: )":
    # only `+strategy_overrides.…`, written nowhere, worked
    from advarch.config.choices import check_command_line
    from advarch.eval import checkpoint_overrides
    from advarch.train import run

    cfg = make_cfg(["strategy=fewshot", "debug=tiny"], output_dir=tmp_path / "fewshot")
    run(cfg)
    ckpt = f"ckpt_path={Path(cfg.paths.output_dir) / 'checkpoints' / 'last.ckpt'}"
    own = eval_metrics(project, monkeypatch, ckpt)
    typed = [eval_metrics(project, monkeypatch, ckpt, f"{key}.adaptation=finetune_head")
             for key in ("strategy", "strategy_overrides", "+strategy_overrides")]  # fmt: skip
    # (new user 40b: a mapping, as train.py takes one for a group, was Hydra's four lines)
    typed.append(eval_metrics(project, monkeypatch, ckpt, "strategy={adaptation: finetune_head}"))
    assert (
        typed[0] == typed[1] == typed[2] == typed[3] and typed[0]["test/loss"] != own["test/loss"]
    )
    with pytest.raises(SystemExit, match="^error: strategy.adaptations is not a key of the chec"):
        eval_metrics(project, monkeypatch, ckpt, "strategy.adaptations=none")  # (did you mean)
    line = ("strategy=ewc: eval.py evaluates the checkpoint's own strategy; change its keys with "
            "strategy.<key>=…")  # fmt: skip
    with pytest.raises(SystemExit, match=f"^error: {re.escape(line)}$"):
        check_command_line(checkpoint_overrides([ckpt, "strategy=ewc"]), "eval")
    # (review 38) removing a key: Hydra's "Could not delete from config" and its hint
    for removed, group in (("~strategy.adapt_lr", "strategy"), ("~data.seq_len", "data")):
        with pytest.raises(ConfigError, match=f"^{re.escape(removed)}: eval.py changes the "
                           f"checkpoint's {group} keys"):  # fmt: skip
            checkpoint_overrides([ckpt, removed])


def test_a_run_whose_files_moved_is_told_where_to_point_eval(make_cfg, tmp_path: Path) -> None:
    # new user 38 L4: eval.py of a run whose data.files had moved said only "data.files=…
    # matches no file", a key the user never typed to eval.py
    import shutil
    import sysconfig

    from advarch.train import run

    corpus = tmp_path / "corpus"
    shutil.copytree(Path(sysconfig.get_paths()["stdlib"]) / "json", corpus)
    files = f"data.files={corpus}/*.py"
    cfg = make_cfg(["debug=tiny", files], output_dir=tmp_path / "run")
    run(cfg)
    corpus.rename(tmp_path / "moved")
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError) as refused:
        evaluate(make_cfg([f"ckpt_path={ckpt}"], "eval", tmp_path / "eval"))
    assert str(refused.value) == (
        f"data.files='{corpus}/*.py' matches no file; the run read its text there: give "
        "data.files=<where the files are now>, or data=<other data>"
    )
    moved = [f"ckpt_path={ckpt}", f"+data_overrides.files={tmp_path / 'moved'}/*.py"]
    assert evaluate(make_cfg(moved, "eval", tmp_path / "eval2")).metrics["test/bpb"] > 0
