"""Bad input, table-driven: every row must stop with exit ≠ 0, no traceback, and one line
naming the offending key or file, before any training.

Rows run in-process through the real Hydra entry points (`advarch.train.main`,
`advarch.eval.main`: the same code path as the command line, sys.argv and all), which keeps
each row to a second or two; `test_real_cli_subset` runs a representative subset, and the
scripts (generate, merge), as real subprocesses.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import datasets
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from advarch.data.tokenizer import BPETokenizer, tokenizer_state
from tests.cli import run_python
from tests.conftest import ROOT, SMALL_TEXT

TINY = ["debug=tiny", "logger=csv", "callbacks.rich_progress_bar=null", *SMALL_TEXT]
STREAM = ["data=permuted_digits", "data.num_tasks=2", "data.epochs_per_task=1"]
RETRIEVAL = ["model=retro", "data=text_retrieval"]
CKPT = "callbacks.model_checkpoint"
OUT = "out={f}/merged.ckpt"
OWN_MODEL_CONFIGS = f"hydra.searchpath=[file://{ROOT}/examples/own_model/configs]"  # --config-dir
NOT_TORCH = "is not a checkpoint file (not a torch.save archive)"


def _entry(name: str) -> Callable[[], None]:
    from advarch.cli.generate import main as generate_main
    from advarch.cli.merge import main as merge_main
    from advarch.eval import main as eval_main
    from advarch.train import main as train_main

    mains = {"train": train_main, "eval": eval_main, "generate": generate_main}
    return {**mains, "merge": merge_main}[name]


# (entry point, overrides, text the one error line must contain). `{f}` is the files folder.
ROWS: list[tuple[str, list[str], str]] = [
    # train.yaml's own keys
    ("train", ["seed=abc"], "seed='abc'"),
    ("train", ["seed=-1"], "seed=-1"),
    ("train", ["seed=1.5"], "seed=1.5"),
    ("train", ["train=maybe"], "train='maybe'"),
    ("train", ["test=2"], "test=2"),
    ("train", ["train=false", "test=false"], "nothing to do"),
    ("train", ["run_name=''"], "run_name=''"),
    ("train", ["tags=notalist"], "tags='notalist' must be a list: tags=[notalist]"),
    ("train", ["logger=wandb", "logger.wandb.tags=word"], "logger.wandb.tags='word' must be a"),
    ("train", ["optimized_metric=val/bogus"], "optimized_metric=val/bogus"),
    ("train", ["strategy=ewc", *STREAM, "optimized_metric=cl/bogus"], "optimized_metric=cl/bogus"),
    ("train", ["optimized_metric=5"], "optimized_metric=5"),
    # data options that gave a traceback or were silently changed
    ("train", ["data.max_documents=-9"], "data.max_documents=-9 must be positive or null"),
    ("train", ["data.tokenizer=bpe", "data.bpe_vocab_size=50"], "data.bpe_vocab_size=50 must be"),
    (
        "train",
        ["data.bpe_vocab_size=100"],
        "data.bpe_vocab_size=100 sizes a BPE vocabulary, and "
        "data.tokenizer=byte: add data.tokenizer=bpe",
    ),  # (it trained byte-level, silently)
    (
        "train",
        ["data.val_fraction=0.6", "data.test_fraction=0.39"],
        "data: 40 documents leave none to train on with data.val_fraction=0.6",
    ),
    # checkpoints
    ("train", ["ckpt_path=/nonexistent/last.ckpt"], "ckpt_path='/nonexistent/last.ckpt'"),
    ("train", ["ckpt_path={f}/empty.ckpt"], "empty.ckpt"),
    ("train", ["ckpt_path={f}/garbage.ckpt"], "garbage.ckpt"),
    ("train", ["ckpt_path={f}/truncated.ckpt"], "truncated.ckpt"),
    ("train", ["ckpt_path={f}/damaged.ckpt"], "damaged.ckpt' is damaged: its record"),
    ("train", ["ckpt_path={f}"], "is a folder"),
    ("train", ["ckpt_path={f}/list.ckpt"], "list.ckpt"),
    ("train", ["ckpt_path={f}/nostate.ckpt"], "nostate.ckpt"),
    # trainer
    ("train", ["trainer.max_steps=abc"], "trainer.max_steps='abc'"),
    ("train", ["trainer.max_steps=0"], "trainer.max_steps=0"),
    ("train", ["trainer.max_steps=-5"], "trainer.max_steps=-5"),
    ("train", ["trainer.max_epochs=-2"], "trainer.max_epochs=-2"),
    ("train", ["trainer.val_check_interval=0"], "trainer.val_check_interval=0"),
    ("train", ["trainer.val_check_interval=-1"], "trainer.val_check_interval=-1"),
    ("train", ["trainer.val_check_interval=1.5"], "trainer.val_check_interval=1.5"),
    ("train", ["trainer.val_check_interval=0.5"], "needs trainer.check_val_every_n_epoch=1"),
    ("train", ["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val=-1"),
    ("train", ["trainer.precision=bogus"], "trainer.precision='bogus'"),
    ("train", ["trainer.accelerator=bogus"], "trainer.accelerator='bogus'"),
    ("train", ["trainer.accelerator=gpu"], "trainer.accelerator=gpu"),
    ("train", ["trainer.accelerator=tpu"], "trainer.accelerator=tpu but this machine has no TPU"),
    (  # (Lightning's two raw warnings, then bf16 in its place)
        "train",
        ["trainer.precision=16"],
        "error: trainer.precision=16 (float16 mixed precision) needs a CUDA GPU; on a CPU use "
        "trainer.precision=bf16-mixed (or 32)",
    ),
    (
        "train",
        ["trainer.accelerator=cpu", "trainer.precision=16-mixed"],
        "error: trainer.precision=16-mixed (float16 mixed",
    ),
    (  # (the stream's own length won, and the console said "max_epochs=4 reached")
        "train",
        ["strategy=naive", "trainer.max_epochs=2"],
        "trainer.max_epochs=2: data=text_domains is a task stream, which trains each task in "
        "turn for data.steps_per_task (data.domains sets the tasks); set those instead",
    ),
    ("train", ["strategy=ewc", *STREAM, "trainer.max_steps=5"], "for data.epochs_per_task (data"),
    # (a traceback: the plain strategy's hint named the first of no domains)
    ("train", ["data=text_domains", "data.domains=[]"], "error: data.domains=[] must be distinct"),
    ("train", ["strategy=naive", "data.domains=[]"], "error: data.domains=[] must be distinct"),
    (  # (behind the strategy/stream combination's error: found only after following it)
        "train",
        ["data=text_domains", "data.domains=[text,foo]"],
        "error: data.domains=['text', 'foo'] must be distinct names from: text, net,",
    ),
    ("train", ["strategy=naive", "+trainer.max_time=00:00:00:06"], "trainer.max_time=00:00:00:06:"),
    (  # (the checkpoint's tokenizer won, and the run's config said 1024)
        "train",
        ["data.tokenizer_from={f}/ok.ckpt", "data.bpe_vocab_size=1024"],
        "data.bpe_vocab_size=1024: data.tokenizer_from={f}/ok.ckpt decides the tokenizer",
    ),
    ("train", ["trainer.limit_test_batches=1.5"], "trainer.limit_test_batches=1.5 must be a"),
    ("train", ["trainer.devices=0"], "trainer.devices=0"),
    ("train", ["trainer.devices=abc"], "trainer.devices='abc'"),
    ("train", ["trainer.devices=512", "trainer.accelerator=cpu"], "trainer.devices=512"),
    ("train", ["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0"),
    ("train", ["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps=0"),
    ("train", ["trainer.limit_val_batches=-1"], "trainer.limit_val_batches=-1"),
    (  # (it trained on the files alone, silently)
        "train",
        ["data.files={f}/*.txt", "data.dataset={f}"],
        "data.files='{f}/*.txt' and data.dataset='{f}' both name the text: give one of them",
    ),
    # fractions that leave no batch: Lightning's traceback (the test's after training)
    *(
        (
            "train",
            [f"trainer.limit_{stage}_batches=0.0001"],
            f"trainer.limit_{stage}_batches=0.0001 of ",
        )
        for stage in ("train", "val", "test")
    ),  # fmt: skip
    ("train", ["trainer.num_sanity_val_steps=-2"], "trainer.num_sanity_val_steps=-2"),
    ("train", ["trainer.check_val_every_n_epoch=0"], "trainer.check_val_every_n_epoch=0"),
    ("train", ["trainer.deterministic=maybe"], "trainer.deterministic='maybe'"),
    ("train", ["+trainer.strategy=bogus"], "trainer.strategy='bogus'"),
    # (Lightning casts the whole module: epoch means stopped counting after ~256 batches)
    ("train", ["trainer.precision=bf16-true"], "trainer.precision=bf16-true"),
    ("train", ["+trainer.bogus_key=1"], "trainer.bogus_key"),
    ("train", ["trainer=bogus"], "trainer"),
    # callbacks and loggers
    (
        "train",
        ["callbacks.model_checkpoint.save_top_k=abc"],
        "callbacks.model_checkpoint.save_top_k",
    ),
    ("train", [f"{CKPT}.mode=bogus"], f"{CKPT}: `mode` can be min, max"),
    ("train", ["+callbacks.model_checkpoint.bogus=1"], "callbacks.model_checkpoint.bogus"),
    ("train", ["callbacks.model_checkpoint.every_n_train_steps=-3"], "every_n_train_steps=-3"),
    (
        "train",
        ["callbacks.lr_monitor.logging_interval=bogus"],
        "callbacks.lr_monitor.logging_interval",
    ),
    ("train", ["callbacks.expert_load.every_n_steps=0"], "callbacks.expert_load.every_n_steps=0"),
    ("train", ["+callbacks.x._target_=nowhere.Class"], "callbacks.x._target_='nowhere.Class'"),
    ("train", ["callbacks=bogus"], "callbacks"),
    ("train", ["logger=bogus"], "logger"),
    ("train", ["logger=wandb", "logger.wandb.offline=maybe"], "logger.wandb.offline='maybe'"),
    ("train", ["+logger.csv.bogus=1"], "logger.csv.bogus"),
    # data
    ("train", ["data=bogus"], "data"),
    ("train", ["data.batch_size=0"], "data.batch_size=0"),
    ("train", ["data.batch_size=abc"], "data.batch_size='abc'"),
    ("train", ["data.seq_len=1"], "data.seq_len=1"),
    ("train", ["data.tokenizer=bogus"], "data.tokenizer='bogus'"),
    ("train", ["data.val_fraction=1.5"], "data.val_fraction=1.5"),
    ("train", ["+data.bogus=1"], "data.bogus"),
    ("train", ["data.files=/nonexistent/*.txt"], "data.files='/nonexistent/*.txt'"),
    ("train", ["data.files=[{f}/jsonl/*,/none/*.txt]"], "data.files[1]='/none/*.txt' matches no"),
    ("train", ["data.files=[]"], "data.files=[] names no file (null: the embedded corpus)"),
    (
        "train",
        ["data.files={f}/tiny"],
        "matches no file; it is a folder: its files are data.files='{f}/tiny/*'",
    ),
    ("train", ["data.files={f}/jsonl/*"], "bad.jsonl:3"),
    ("train", ["data.files={f}/latin1/*"], "latin1.txt is not UTF-8: byte offset 3"),
    ("train", ["data.files={f}/binary/*"], "noise.txt is a binary file"),
    ("train", ["data.files={f}/utf16/*"], "utf16.txt is UTF-16 text (its byte-order mark): save"),
    ("train", ["data.files={f}/empty/*"], "empty.txt is empty"),  # (nothing but empty files)
    (
        "train",
        ["data.files={f}/jsonl_field/*"],
        "nofield.jsonl:1: no string field 'text' (data.text_field); its fields: body",
    ),
    (  # any suffix is text: one byte, too small even cut into pieces (it was refused unread)
        "train",
        ["data.files={f}/odd.xyz"],
        "odd.xyz, 1 character): too small to split into train/val/test even cut at line ends",
    ),
    ("train", ["data.files={f}/d.csv"], "is not a column of '{f}/d.csv' (columns: id, body)"),
    ("train", ["data.dataset={f}/d.csv"], "is a file; a file of text is data.files={f}/d.csv"),
    (
        "train",
        ["data.files={f}/saved/*"],
        "belongs to a folder written by save_to_disk: load the folder with "
        "data.dataset='{f}/saved' instead",
    ),
    ("train", ["data.dataset={f}/splits"], "holds no 'train' split (splits: validation)"),
    (
        "train",
        ["data.dataset={f}/tiny"],
        "data.dataset='{f}/tiny' is a folder not written by save_to_disk (no state.json or "
        "dataset_dict.json); its files are data.files='{f}/tiny/*'",
    ),
    (  # drop_last leaves no batch: 0 steps and a "finished" run, before
        "train",
        ["data.files={f}/tiny/*", "data.seq_len=8", "data.batch_size=16"],
        "data: the train split packs into 2 sequences of data.seq_len=8 tokens, fewer than "
        "data.batch_size=16: not one training batch",
    ),
    ("train", ["strategy=naive", *STREAM, "data.num_tasks=0"], "data.num_tasks=0"),
    ("train", ["strategy=naive", *STREAM, "data.scenario=bogus"], "data.scenario='bogus'"),
    ("train", ["strategy=naive", *STREAM, "data.epochs_per_task=0"], "data.epochs_per_task=0"),
    ("train", ["strategy=naive", *STREAM, "data.input_format=bogus"], "data.input_format='bogus'"),
    ("train", ["strategy=naive", "data=split_digits", "data.num_tasks=3"], "data.num_tasks=3"),
    ("train", ["data=digits", "data.classes=[11]"], "data.classes=[11]"),
    # retrieval options faiss failed on after the database's build (a traceback, a run folder)
    ("train", [*RETRIEVAL, "data.retrieval.nprobe=0"], "data.retrieval.nprobe=0 must be positive"),
    ("train", [*RETRIEVAL, "data.retrieval.ef_search=-1"], "data.retrieval.ef_search=-1 must be"),
    ("train", [*RETRIEVAL, "data.retrieval.ngrams=[]"], "data.retrieval.ngrams=[] must be"),
    # model
    ("train", ["model=bogus"], "model=bogus is not a model config (options: hybrid, "),
    (  # (new user 41: "or leave data= out", which no one typed; the strategy's data not brought)
        "train",
        ["hydra.searchpath=[file://{f}/confs]", "experiment=ewc_alone"],
        "error: strategy=ewc data=text: strategy=ewc trains a task stream, but data=text is one "
        "language-modelling corpus; use data=text_domains or data=permuted_digits (typed, or in "
        "experiment=ewc_alone: override /data: text_domains)",
    ),
    ("train", ["model=moee"], "model=moee is not a model config (did you mean model=moe? "),
    (  # (Hydra's 14 lines: its config search path and the HYDRA_FULL_ERROR advice)
        "train",
        ["-m", "hydra/launcher=local_paralel", "model.depth=1,2"],
        "error: hydra/launcher=local_paralel is not a hydra/launcher config (did you mean "
        "hydra/launcher=local_parallel? options: basic, joblib, local_parallel,",
    ),
    ("train", ["hydra/sweeper=optun"], "error: hydra/sweeper=optun is not a hydra/sweeper config"),
    (  # (it said "trainer={max_steps: 3 is not a trainer config": the mapping, which Hydra
        # merges into the group's keys, cut at its comma; an unknown key in it: Hydra's lines)
        "train",
        ["trainer={max_steps: 3, foo: 1}"],
        "error: trainer.foo is not a key of trainer (keys: accelerator, ",
    ),
    (
        "train",
        ["experiment={seed: 1}"],
        "error: experiment={seed: 1}: experiment is a config group (options: ewc_permuted_digits,",
    ),
    (  # (… whose options set keys all over the config: choose one, experiment=<option>)
        "train",
        ["-m", "hydra/launcher={n_jobs: 2}", "model.depth=1,2"],
        "(options: basic, joblib, local_parallel, slurm, submitit_local, submitit_slurm); set its "
        "keys one at a time: hydra.launcher.n_jobs=2",
    ),
    (  # (it said "keys: )", nothing of the launcher that has the key)
        "train",
        ["-m", "hydra.launcher.n_jobs=2", "model.depth=1,2"],
        "error: hydra.launcher.n_jobs is not a key of hydra.launcher (hydra/launcher=joblib or "
        "hydra/launcher=local_parallel have it; hydra.launcher has no keys)",
    ),
    ("train", ["logger=null"], "logger=null is not a choice: write ~logger to leave it out"),
    ("train", ["strategy=naive,ewcc"], "strategy=ewcc is not a strategy config (did you mean"),
    ("train", ["model.num_heads=5"], "model.num_heads=5"),
    ("train", ["model.dim=abc"], "model.dim='abc'"),
    ("train", ["model.depth=0"], "model.depth=0"),
    ("train", ["model.moe.top_k=9"], "model.moe.top_k=9"),
    ("train", ["model.moe.num_experts=0"], "model.moe.num_experts=0"),
    ("train", ["+model.bogus=1"], "model.bogus"),
    ("train", ["model.layers=[bogus]"], "model.layers"),
    ("train", ["model.activation=bogus"], "model.activation='bogus'"),
    (  # your own model's checks (the example's `dim % num_heads`: a ZeroDivisionError traceback)
        "train",
        [OWN_MODEL_CONFIGS, "model=torch_transformer", "model.num_heads=0"],
        "error: model.num_heads=0 must be >= 1",
    ),
    # strategy
    ("train", ["strategy=bogus"], "strategy"),
    ("train", ["+strategy.lr=1e-3"], "strategy.lr is now optimizer.lr"),
    # optimizer, scheduler
    ("train", ["optimizer=bogus"], "optimizer"),
    ("train", ["optimizer.lr=-1"], "optimizer.lr=-1"),
    ("train", ["optimizer.lr=abc"], "optimizer.lr='abc'"),
    (
        "train",
        ["optimizer=sgd", "optimizer.momentum=-1"],
        "optimizer.momentum=-1 must be in [0, 1)",
    ),
    # (torch took these and trained: steps that grow without bound, or no new gradient)
    (
        "train",
        ["optimizer=sgd", "optimizer.momentum=1.5"],
        "optimizer.momentum=1.5 must be in [0, 1)",
    ),
    (
        "train",
        ["optimizer=sgd", "+optimizer.dampening=1"],
        "optimizer.dampening=1 must be in [0, 1)",
    ),
    # (torch's "Invalid beta parameter at index 1: 1.5", naming no key)
    ("train", ["optimizer.betas=[0.9,1.5]"], "optimizer.betas=[0.9, 1.5] must be in [0, 1) each"),
    ("train", ["optimizer.betas=[0.9]"], "(expected list of 2, each float or Tensor)"),
    ("train", ["optimizer.weight_decay=-0.1"], "optimizer.weight_decay=-0.1 must be >= 0"),
    ("train", ["+optimizer.bogus=1"], "optimizer.bogus is not an option"),
    ("train", ["scheduler.warmup_steps=-1"], "scheduler.warmup_steps=-1"),
    ("train", ["scheduler.min_lr_ratio=2"], "scheduler.min_lr_ratio=2"),
    ("train", ["scheduler=constant", "+scheduler.min_lr_ratio=0.5"], "scheduler.min_lr_ratio"),
    ("train", ["strategy=ewc", *STREAM, "strategy.mode=bogus"], "'separate', 'online'"),
    # freezing the shared body without expert masks or task heads: later tasks trained nothing
    # (an all-equal matrix that read as zero forgetting)
    (
        "train",
        ["strategy=naive", *STREAM, "strategy.freeze_shared_after_first_task=true"],
        "this model has neither a head per task nor expert masks, so later tasks would train "
        "nothing: add strategy.expert_masks=true",
    ),
    ("train", ["strategy=ewc", *STREAM, "strategy.ewc_lambda=-1"], "strategy.ewc_lambda=-1"),
    (
        "train",
        ["strategy=ewc", *STREAM, "strategy.mode=online", "strategy.gamma=2"],
        "strategy.gamma=2 must be in (0, 1]",
    ),
    (  # (it trained as without it: strategy.mode=separate never reads gamma)
        "train",
        ["strategy=ewc", *STREAM, "strategy.gamma=0.9"],
        "error: strategy.gamma=0.9 applies with strategy.mode=online (add strategy.mode=online)",
    ),
    ("train", ["strategy=ewc", *STREAM, "strategy.fisher_estimator=bogus"], "fisher_estimator"),
    ("train", ["strategy=ewc", "data=digits"], "strategy=ewc data=digits"),
    ("train", ["strategy=fewshot", "data=text"], "strategy=fewshot data=text"),
    # (tester 33: accepted, then a traceback inside training, or a NaN loss blaming optimizer.lr)
    ("train", ["strategy=fewshot", "data=fewshot_synthetic", "data.k_shot=0"], "data.k_shot=0"),
    ("train", ["strategy=fewshot", "data=fewshot_synthetic", "data.n_query=0"], "data.n_query=0"),
    (  # (new user 39: torchmetrics' "Expected argument `num_classes` … larger than 1")
        "train",
        ["strategy=fewshot", "data=fewshot_synthetic", "data.n_way=1"],
        "data.n_way=1 must be >= 2",
    ),
    (
        "train",
        ["strategy=fewshot", "data=fewshot_synthetic", "data.n_way=500"],
        "data.n_way=500 exceeds the 120 classes of the train split",
    ),
    (
        "train",
        ["strategy=fewshot", "data=fewshot_rotated_digits", "data.n_way=10"],
        "data.n_way=10 exceeds the 8 classes of the val split",
    ),
    (
        "train",
        ["strategy=fewshot", "data=fewshot_synthetic", "data.samples_per_class=1"],
        "exceeds the 1 examples of the smallest class of the train split",
    ),
    (
        "train",
        ["strategy=fewshot", "data=fewshot_synthetic", "data.signal_dims=0"],
        "data.signal_dims=0 must be >= 1",
    ),
    (
        "train",
        ["strategy=multitask", "data=mmoe_synthetic", "data.noise_std=-1"],
        "data.noise_std=-1",
    ),
    (
        "train",
        [
            "strategy=fewshot",
            "data=fewshot_synthetic",
            "strategy.adaptation=fomaml",
            "strategy.adapt_lr=nan",
        ],
        "strategy.adapt_lr=nan is not a number",
    ),
    ("train", ["strategy=ewc", *STREAM, "strategy.ewc_lambda=nan"], "strategy.ewc_lambda=nan"),
    ("train", ["strategy.aux_loss_weight=nan"], "strategy.aux_loss_weight=nan"),
    ("train", ["strategy.aux_loss_weight=-1"], "strategy.aux_loss_weight=-1 must be >= 0"),
    (
        "train",
        ["strategy=multitask", "data=mmoe_synthetic", "strategy.task_weights=[1,nan]"],
        "strategy.task_weights=[1, nan] is not a number",
    ),
    ("train", ["strategy=multitask", "data=text"], "strategy=multitask data=text"),
    (
        "train",
        ["strategy=finetune", "strategy.pretrained=/nonexistent.ckpt"],
        "strategy.pretrained",
    ),
    ("train", ["strategy=finetune", "strategy.pretrained={f}/garbage.ckpt"], "garbage.ckpt"),
    (
        "train",
        ["strategy=finetune", "strategy.pretrained={f}/other_model.ckpt"],
        "other_model.ckpt' was trained with model.dim=999, this run has model.dim=32: a fine-tune",
    ),
    (  # (it named the first model key that differs: model.layers=['none'], this run ['attn'])
        "train",
        ["strategy=finetune", "strategy.pretrained={f}/digits_moe.ckpt"],
        "digits_moe.ckpt' is a classification model, this run language modelling: a fine-tune",
    ),
    # Hydra's own grammar
    ("train", ["model.dim=[1,"], "'[1,'"),
    # a key the config does not have: the nearest one, not Hydra's advice to append it
    ("train", ["model.dimm=64"], "model.dimm is not a key of model (did you mean model.dim?"),
    # a mapping where a list goes, or the reverse: Hydra's five lines (tester 29 F7)
    (
        "train",
        ["data=selective_copying", "model=ssm", "data.curriculum={seq_len: 64, steps: 10}"],
        "data.curriculum={seq_len: 64, steps: 10}: data.curriculum holds a list, and this gives a "
        "mapping",
    ),
    ("train", ["model.moe=[1,2]"], "model.moe=[1,2]: model.moe holds a mapping, and this gives a"),
    # … or the options that have it (tester 29 F7)
    (
        "train",
        ["strategy.ewc_lambda=10"],
        "strategy.ewc_lambda is not a key of strategy (strategy=ewc has it; keys: aux_loss_weight)",
    ),
    # … in a sweep too, each swept config (Hydra: four lines and advice to append it)
    (
        "train",
        ["-m", "model.dimm=2,4"],
        "model.dimm is not a key of model (did you mean model.dim?",
    ),
    (
        "train",
        ["-m", "optimizer=adam,sgd", "optimizer.betas=[0.9,0.95]"],
        "optimizer.betas is not a key of optimizer (optimizer=adam or optimizer=adamw have it; "
        "keys: lr, momentum, nesterov, weight_decay) — in the sweep's trials with optimizer=sgd",
    ),
    (
        "train",
        ["-m", "hydra.sweeper.n_trials=2"],
        "hydra.sweeper.n_trials is not a key of hydra.sweeper (hydra/sweeper=optuna has it; "
        "keys: max_batch_size, params)",
    ),
    (
        "train",
        ["-m", "model=longformer,transformer", "model.swa.window=16"],
        "and no swa block, so nothing would read model.swa; add swa to model.layers (model."
        "layers=[attn,swa] +model.swa.window=16), or use model=hybrid or model=longformer; in a "
        "sweep over configs with and without it, ++model.swa.window=16 sets it in every trial — "
        "in the sweep's trials with model=transformer",
    ),
    # an interval: the grid sweeper cannot (a traceback); Optuna samples floats for an int key
    (
        "train",
        ["-m", "optimizer.lr=interval(0.001,0.01)"],
        "optimizer.lr=interval(0.001,0.01): a grid sweep runs listed values (optimizer.lr=a,b,c or "
        "range(…)); an interval is sampled by hparams_search=optuna",
    ),
    (
        "train",
        ["-m", "hparams_search=optuna", "model.dim=interval(16,32)"],
        "model.dim=interval(16,32): model.dim takes an int (model.dim=128) and an interval samples "
        "floats; write model.dim=int(interval(16,32))",
    ),
    # `+` on a key the config has (Hydra: "Could not append to config", three lines)
    (
        "train",
        ["model=longformer", "+model.swa.window=16"],
        "+model.swa.window=16: model=longformer has model.swa.window already; write "
        "model.swa.window=16",
    ),
    ("train", ["model.moe.topk=1"], "did you mean model.moe.top_k?"),
    ("train", ["model.num_experts=4"], "did you mean model.moe.num_experts?"),  # not num_heads
    (  # a block the model lacks (Hydra's "Key 'window' is not in struct", a screenful)
        "train",
        ["model.layers=[attn,swa]", "model.swa.window=32"],
        "model.swa.window=32: model.swa is null in this config; write +model.swa.window=32",
    ),
    (  # (it said `write +data.retrieval.num_neighbours=4`: a section of defaults, unbounded)
        "train",
        ["data.retrieval.num_neighbours=4"],
        "data.retrieval.num_neighbours=4: data.retrieval is null in data=text; "
        "data=text_retrieval has it: write data=text_retrieval data.retrieval.num_neighbours=4",
    ),
    (  # options of a block no layer has (they were accepted and read by nothing)
        "train",
        ["model=transformer", "+model.swa.window=32"],
        "+model.swa.window=32: model=transformer's layer pattern uses the blocks attn, dense "
        "(model.layers=[attn], model.ffn=[dense]) and no swa block, so nothing would read",
    ),
    (
        "train",
        ["model=hybrid", "model.layers=[attn,ssm]", "model.swa.window=32"],
        "model.swa.window=32: model=hybrid's layer pattern uses the blocks attn, ssm, dense, moe",
    ),
    ("train", ["model.swa.window=32"], "+model.swa.window=32), or use model=hybrid or model="),
    (  # (model=retro_moe listed 2 of the MoE options: "not a key of model.moe")
        "train",
        ["model=retro_moe", "data=text_retrieval", "model.moe.capacity_factor=0"],
        "model.moe.capacity_factor=0 must be > 0",
    ),
    (
        "train",
        ["data.seq_lenn=4"],
        "data.seq_lenn is not a key of data (did you mean data.seq_len?",
    ),
    ("train", [*STREAM, "data.bogus=1"], "data.bogus is not a key of data (keys: "),  # ${…} values
    ("train", ["strategy=ewc", *STREAM, "strategy.ewc_lamda=5"], "mean strategy.ewc_lambda?"),
    ("train", ["modle.dim=3"], "modle is not a key of the train config (did you mean model?"),
    ("train", ["seeed=3"], "seeed is not a key of the train config (did you mean seed?"),
    ("train", ["+modle.dim=3"], "+modle.dim: modle is not a key of the train config (did you"),
    ("train", ["+experiment=ewc_permuted_digits"], "config already makes; write experiment=ewc"),
    # the other entry points
    ("eval", ["ckpt_path={f}/ok.ckpt", "datta=text"], "eval config (did you mean data? keys: "),
    (  # (it listed the eval keys without data, and --help listed model as a group)
        "eval",
        ["ckpt_path={f}/ok.ckpt", "model=ssm"],
        "model=ssm: eval.py evaluates the checkpoint's own model; model is not a key of the eval "
        "config (keys: accelerator, ckpt_path, data, data_overrides, limit_test_batches, paths, "
        "run_name, ",
    ),
    ("merge", ["densty=0.3"], "densty is not a key of the merge config (did you mean density?"),
    (  # (new-user 37 F12: its example named method=ties)
        "merge",
        ["method=linear", "models=[{f}/ok.ckpt]", OUT],
        "error: base= is required: python scripts/merge.py method=linear base=<ckpt> models=",
    ),
    (  # (an option the method never reads: the same merge as without it, and no word)
        "merge",
        ["method=linear", "base={f}/ok.ckpt", "models=[{f}/ok.ckpt]", "density=0.2", OUT],
        "error: density=0.2 has no effect with method=linear (it applies to ties, dare_linear, "
        "dare_ties)",
    ),
    (
        "merge",
        ["method=slerp", "base={f}/ok.ckpt", "models=[{f}/ok.ckpt]", "lambda=3", OUT],
        "error: lambda=3 has no effect with method=slerp (it applies to task_arithmetic, ties, ",
    ),
    (
        "merge",
        ["base={f}/ok.ckpt", "models=[{f}/ok.ckpt]", "out={f}/jsonl"],
        "out={f}/jsonl is a folder; name the file, e.g. out={f}/jsonl/merged.ckpt",
    ),  # (a traceback)
    (  # (it suggested a merge rule for the first tensor that differed)
        "merge",
        ["base={f}/attn.ckpt", "models=[{f}/ssm.ckpt]", OUT],
        "models[0]='{f}/ssm.ckpt' is another architecture than base (model.layers=['ssm'] "
        "there, ['attn'] in base='{f}/attn.ckpt'): merging needs checkpoints of one model",
    ),
    (  # (it said "data.tokenizer=None there, byte in base": digits have no tokenizer)
        "merge",
        ["base={f}/text_moe.ckpt", "models=[{f}/digits_moe.ckpt]", OUT],
        "models[0]='{f}/digits_moe.ckpt' is another architecture than base (data._target_="
        "advarch.data.digits.PermutedDigitsDataModule there, advarch.data.text.TextDataModule in "
        "base='{f}/text_moe.ckpt')",
    ),
    (  # (it merged them and wrote the base's tokenizer beside the mixed weights)
        "merge",
        ["base={f}/bytes.ckpt", "models=[{f}/bpe.ckpt]", OUT],
        "models[0]='{f}/bpe.ckpt' was trained on another tokenizer (BPE, ",
    ),
    ("generate", ["promt=x"], "promt is not a key of the generate config (did you mean prompt?"),
    ("generate", ["ckpt_path={f}/ok.ckpt", "max_new_tokens=abc"], "max_new_tokens='abc' has the"),
    ("generate", ["ckpt_path={f}/ok.ckpt", "greedy=maybe"], "greedy='maybe' has the wrong type"),
    ("generate", ["ckpt_path={f}/ok.ckpt", "max_new_tokens=0"], "max_new_tokens=0 generates no"),
    (  # (it said "expected list of str or list of str")
        "train",
        ["strategy=naive", "data.domains=text"],
        "data.domains='text' has the wrong type (expected list of str)",
    ),
    (
        "generate",
        ["ckpt_path={f}/ok.ckpt", "prompt=42"],
        "prompt=42 has the wrong type (expected str): 42 reads as an integer; quote it, "
        "prompt=\"'42'\"",
    ),
    ("generate", ["ckpt_path={f}/ok.ckpt", "seed=abc"], "seed='abc' has the wrong type"),
    ("generate", ["ckpt_path={f}/ok.ckpt", "device=tpu"], "device='tpu' is not a torch device"),
    # ranges too, before the checkpoint is read (ok.ckpt would fail: no advarch config)
    ("generate", ["ckpt_path={f}/ok.ckpt", "top_p=0"], "top_p=0 must be in (0, 1] or null"),
    ("generate", ["ckpt_path={f}/ok.ckpt", "top_k=0"], "top_k=0 must be >= 1 or null"),
    ("generate", ["ckpt_path={f}/ok.ckpt", "temperature=-1"], "temperature=-1 must be >= 0"),
    ("generate", ["ckpt_path={f}/ok.ckpt", "max_new_tokens=-5"], "max_new_tokens=-5 must be"),
    # the decoding benchmark's settings, before any model is built
    (  # (the model's constructor: "model: '>=' not supported between instances of 'str' …")
        "generate",
        ["bench=true", 'bench_overrides=["debug=tiny","model.dim=abc"]', "bench_models=[ssm]"],
        "error: bench_overrides with model=ssm: model.dim='abc' has the wrong type (expected int)",
    ),
    (  # (a ZeroDivisionError traceback after timing)
        "generate",
        [
            "bench=true",
            'bench_overrides=["debug=tiny"]',
            "bench_new_tokens=0",
            "bench_models=[transformer]",
        ],
        "error: bench_new_tokens=0 must be at least 1",
    ),
    (  # (torch's "negative dimension" traceback)
        "generate",
        [
            "bench=true",
            'bench_overrides=["debug=tiny"]',
            "bench_prompt_len=-3",
            "bench_models=[transformer]",
        ],
        "error: bench_prompt_len=-3 must be at least 1",
    ),
    (  # (torch's traceback: it could not allocate the 800 GB prompt; the models take any length)
        "generate",
        ["bench=true", "bench_prompt_len=100000000000", "bench_models=[transformer]"],
        "error: bench_prompt_len=100000000000: the full forward's logits of 100,000,000,000 + 512",
    ),
    ("generate", ["bench=true", "bench_models=[]"], "error: bench_models=[] names no model"),
    (  # (Hydra's "Error executing job", and every option on lines of their own)
        "generate",
        ["bench=true", "bench_models=[foo]"],
        "error: bench_models: model=foo is not a model config (options: ",
    ),
    (  # (Hydra's advice to append it: +model.dimm=3)
        "generate",
        ["bench=true", 'bench_overrides=["debug=tiny","model.dimm=3"]'],
        "model.dimm is not a key of model (did you mean model.dim?",
    ),
    ("eval", ["-cd", "{f}/odd.xyz", "ckpt_path={f}/ok.ckpt"], "-dir {f}/odd.xyz is a file, not"),
    ("eval", [], "ckpt_path"),
    (
        "eval",
        ["ckpt_path={f}/ok.ckpt", "accelerator=gpu"],
        "accelerator=gpu but this machine has no CUDA GPU (use accelerator=cpu)",
    ),  # fmt: skip
    ("eval", ["ckpt_path={f}/ok.ckpt", "limit_test_batches=-1"], "limit_test_batches=-1 must be"),
    ("eval", ["ckpt_path={f}/text_moe.ckpt", "+data.foo=1"], "data.foo is not a key of the"),
    (  # (new user 40b: Hydra's four lines, "Key 'seq_len' is not in struct", for any mapping)
        "eval",
        ["ckpt_path={f}/text_moe.ckpt", "data_overrides={seq_lenn: 64}"],
        "error: data.seq_lenn is not a key of the checkpoint's data (keys: tokenizer)",
    ),
    ("eval", ["ckpt_path={f}/ok.ckpt", "data={seq_len: 64"], "error: data={seq_len: 64: not a"),
    (  # (a node nothing read: the run's 2 batches were tested, silently)
        "eval",
        ["ckpt_path={f}/ok.ckpt", "+trainer.limit_test_batches=1.0"],
        "+trainer.limit_test_batches: trainer is not a key of the eval config",
    ),
    ("train", ["data.tokenizer_from={f}/notes.txt"], "data.tokenizer_from='{f}/notes.txt' is not"),
    ("eval", ["ckpt_path=/nonexistent.ckpt"], "ckpt_path='/nonexistent.ckpt'"),
    ("eval", ["ckpt_path=auto"], "ckpt_path='auto' is not a file (auto, the newest run's"),
    ("train", ["ckpt_path=autoo"], "ckpt_path='autoo' is not a file (did you mean ckpt_path=auto"),
    ("eval", ["ckpt_path=autoo"], "ckpt_path='autoo' is not a file"),  # (auto is train.py's)
    ("train", ["trainer.precision=bf16mixed"], "(did you mean trainer.precision=bf16-mixed?)"),
    ("train", ["-m", "hydra/launcher=null"], "hydra/launcher=null is not a hydra/launcher config"),
    ("eval", ["ckpt_path={f}/garbage.ckpt"], "garbage.ckpt"),
    ("eval", ["ckpt_path={f}/truncated.ckpt"], "truncated.ckpt"),
    (  # (torch read the changed bytes as weights, silently)
        "eval",
        ["ckpt_path={f}/damaged.ckpt"],
        "damaged.ckpt' is damaged: its record ok/data/0 does not match its checksum",
    ),
    ("eval", ["ckpt_path={f}/nostate.ckpt"], "nostate.ckpt"),
    ("eval", ["ckpt_path={f}"], "is a folder"),
    # a text file, wherever a checkpoint goes: torch's "Memo value not found at index 101",
    # or with mmap its advice to save with `_use_new_zipfile_serialization=True`
    ("train", ["ckpt_path={f}/notes.txt"], "error: ckpt_path='{f}/notes.txt' " + NOT_TORCH),
    ("eval", ["ckpt_path={f}/notes.txt"], "error: ckpt_path='{f}/notes.txt' " + NOT_TORCH),
    ("generate", ["ckpt_path={f}/notes.txt"], "error: ckpt_path='{f}/notes.txt' " + NOT_TORCH),
    (
        "merge",
        ["base={f}/notes.txt", "models=[{f}/ok.ckpt]", OUT],
        "base='{f}/notes.txt' " + NOT_TORCH,
    ),
    (
        "merge",
        ["base={f}/ok.ckpt", "models=[{f}/notes.txt]", OUT],
        "models[0]='{f}/notes.txt' " + NOT_TORCH,
    ),
    (
        "train",
        ["strategy=finetune", "strategy.pretrained={f}/notes.txt"],
        "error: strategy.pretrained='{f}/notes.txt' " + NOT_TORCH,
    ),
    (  # (it said "is not a file")
        "train",
        ["strategy=finetune", "strategy.pretrained={f}"],
        "error: strategy.pretrained='{f}' is a folder, not a checkpoint file",
    ),
    ("train", ["ckpt_path={f}/weights_only.ckpt"], "weights_only.ckpt"),
    ("train", ["ckpt_path={f}/other_model.ckpt"], "was written by a run of another model (model."),
    ("train", ["data=fewshot_synthetic"], "use strategy=fewshot data=fewshot_synthetic"),
    ("train", ["run_name=../../elsewhere"], "run_name='../../elsewhere' must stay inside"),
    (
        "train",
        ["experiment=ewc_permuted_digits", "data=permuted_digits", "trainer.limit_train_batches=2"],
        "trainer.val_check_interval=3 must be <= trainer.limit_train_batches=2",
    ),
]
NEEDS_TINY = {"train"}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Broken files of every kind the entry points read."""
    f = tmp_path_factory.mktemp("bad")
    (f / "empty.ckpt").write_bytes(b"")
    (f / "notes.txt").write_text("hello\n")
    (f / "garbage.ckpt").write_bytes(os.urandom(2048))
    torch.save({"state_dict": {"model.w": torch.zeros(64, 64)}}, f / "ok.ckpt")
    (f / "truncated.ckpt").write_bytes((f / "ok.ckpt").read_bytes()[:3000])
    damaged = bytearray((f / "ok.ckpt").read_bytes())  # whole, but bytes of a tensor changed
    damaged[len(damaged) // 2 : len(damaged) // 2 + 8] = b"\xff" * 8
    (f / "damaged.ckpt").write_bytes(damaged)
    torch.save([1, 2, 3], f / "list.ckpt")
    for mixer in ("attn", "ssm"):  # models of two architectures
        cfg = {"model": {"_target_": "advarch.models.Model", "layers": [mixer]}}
        torch.save({"state_dict": {"model.w": torch.zeros(2)}, "hyper_parameters": {"cfg": cfg}},
                   f / f"{mixer}.ckpt")  # fmt: skip
    bpe = BPETokenizer.train(["alpha beta gamma delta " * 50], 300, f / "bpe.json")
    for name, tokenizer in (("bytes", {"kind": "byte"}), ("bpe", tokenizer_state(bpe))):
        cfg = {"model": {"_target_": "advarch.models.Model", "layers": ["attn"]}}
        torch.save({"state_dict": {"model.w": torch.zeros(2)}, "hyper_parameters": {"cfg": cfg},
                    "tokenizer": tokenizer}, f / f"{name}.ckpt")  # fmt: skip
    for name, data in (
        ("text_moe", {"_target_": "advarch.data.text.TextDataModule", "tokenizer": "byte"}),
        ("digits_moe", {"_target_": "advarch.data.digits.PermutedDigitsDataModule"}),
    ):
        cfg = {"model": {"_target_": "advarch.models.Model", "ffn": "moe"}, "data": data}
        torch.save({"state_dict": {"model.w": torch.zeros(2)}, "hyper_parameters": {"cfg": cfg}},
                   f / f"{name}.ckpt")  # fmt: skip
    torch.save({"state_dict": {}, "hyper_parameters": {}}, f / "nostate.ckpt")
    torch.save({"state_dict": {}, "hyper_parameters": {"cfg": {}}}, f / "weights_only.ckpt")
    other = {"model": {"_target_": "advarch.models.Model", "dim": 999}}
    torch.save({"state_dict": {}, "loops": {}, "hyper_parameters": {"cfg": other}},
               f / "other_model.ckpt")  # fmt: skip
    good = ["alpha beta gamma delta " * 40 + str(i) for i in range(4)]
    for folder, name, content in (
        ("jsonl", "bad.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": oops}\n'),
        ("jsonl_field", "nofield.jsonl", b'{"body": "a"}\n'),
        ("latin1", "latin1.txt", "caf\u00e9 ol\u00e9".encode("latin-1")),
        ("binary", "noise.txt", b"\x00\x01" + os.urandom(1000)),
        ("utf16", "utf16.txt", 'Windows\' "Unicode" text'.encode("utf-16")),  # (NUL bytes too)
        ("empty", "empty.txt", b""),
    ):
        (f / folder).mkdir()
        for i, text in enumerate(good if folder != "empty" else []):  # (empty ones are left out)
            (f / folder / f"good{i}.txt").write_text(text)
        (f / folder / name).write_bytes(content)
    (f / "odd.xyz").write_text("x")
    (f / "d.csv").write_text("id,body\n1,some text\n")
    rows = datasets.Dataset.from_dict({"text": good})
    rows.save_to_disk(str(f / "saved"))
    datasets.DatasetDict({"validation": rows}).save_to_disk(str(f / "splits"))
    (f / "confs" / "experiment").mkdir(parents=True)  # a user's experiment: a strategy alone
    (f / "confs" / "experiment" / "ewc_alone.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /strategy: ewc\n"
    )
    (f / "confs" / "data").mkdir()  # a user's data config: some of its class's keywords
    (f / "confs" / "data" / "few_keys.yaml").write_text(
        "_target_: advarch.data.digits.PermutedDigitsDataModule\nnum_tasks: 2\n"
    )
    (f / "tiny").mkdir()
    for i in range(4):
        (f / "tiny" / f"s{i}.txt").write_text(f"tiny doc {i}")
    return f


def call_entry(entry: str, args: list[str], out_dir: Path, capsys) -> tuple[int, str, str]:
    """Run an entry point's Hydra main in-process; (exit code, error line, all output)."""
    argv = [f"{entry}.py", *args, f"hydra.run.dir={out_dir}", f"paths.root_dir={out_dir.parent}"]
    GlobalHydra.instance().clear()
    old = sys.argv
    sys.argv = argv
    try:
        _entry(entry)()
        code: int | str | None = 0
    except SystemExit as exit_:
        code = exit_.code
    finally:
        sys.argv = old
        GlobalHydra.instance().clear()
    captured = capsys.readouterr()
    text = captured.out + captured.err
    if isinstance(code, str):  # sys.exit("error: ...") — the line the shell would print
        return 1, code, text + code
    lines = [line for line in captured.err.splitlines() if line.strip()]
    return code or 0, (lines[-1] if lines else ""), text


def test_a_ctrl_c_while_the_command_line_is_checked_is_one_line(tmp_path, capsys, monkeypatch):
    # fault pass 42c: Ctrl-C in the first second (the checks before Hydra) was a
    # KeyboardInterrupt traceback and exit -2, not the one line and 130 of a later Ctrl-C
    import advarch.config.choices as choices
    from advarch.stop_signals import PHASE

    def interrupted(argv: list[str]) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(choices, "check_override_keys", interrupted)
    monkeypatch.setitem(PHASE, "training_started", False)  # (a new process's: earlier tests')
    code, line, text = call_entry("train", ["debug=tiny"], tmp_path / "runs" / "run", capsys)
    assert code == 130 and "Traceback" not in text, text[-2000:]
    assert line.startswith("SIGINT received") and line.endswith("stopped, nothing saved"), line


@pytest.mark.parametrize(
    ("entry", "args", "expected"), ROWS, ids=[f"{e}:{' '.join(a)}" for e, a, _ in ROWS]
)
def test_bad_input_is_one_line_naming_it(
    entry: str, args: list[str], expected: str, files: Path, tmp_path: Path, capsys
) -> None:
    args = [a.replace("{f}", str(files)) for a in args]
    expected = expected.replace("{f}", str(files))
    extra = [*TINY, f"paths.cache_dir={files}/cache"] if entry in NEEDS_TINY else []
    if any(a.startswith("data=") for a in args):  # not the text data: no text options
        extra = [e for e in extra if e not in SMALL_TEXT]
    out_dir = tmp_path / "runs" / "bad"
    code, line, text = call_entry(entry, [*extra, *args], out_dir, capsys)
    assert code != 0, text[-2000:]
    assert "Traceback" not in text, text[-3000:]
    assert expected in text, (line, text[-1500:])
    if entry == "train":
        assert not out_dir.exists() or not any(out_dir.iterdir()), list(out_dir.iterdir())


def test_data_typed_beside_an_experiment_is_not_told_to_leave_data_out(
    files: Path, tmp_path: Path, capsys
) -> None:
    # (leaving it out, the experiment's own data=text would be refused the same)
    args = [*TINY, f"hydra.searchpath=[file://{files}/confs]", "experiment=ewc_alone", "data=text"]
    code, line, _ = call_entry("train", args, tmp_path / "runs" / "bad", capsys)
    assert code == 1 and line.endswith("; use data=text_domains or data=permuted_digits"), line
    # (review 41: nor to edit a packaged experiment's file)
    args = ["debug=tiny", "experiment=mmoe_synthetic", "strategy=ewc"]
    code, line, _ = call_entry("train", args, tmp_path / "runs" / "bad", capsys)
    assert code == 1 and line.endswith("is multi-task regression data; use data=permuted_digits")


def test_a_keyword_a_users_data_config_leaves_out_is_told_to_add_it(
    files: Path, tmp_path: Path, capsys
) -> None:
    # new user 41: "data.n is not a key of data (keys: …)" for a keyword of their own class,
    # with no word of the `+data.n=…` that works
    args = ["--config-dir", f"{files}/confs", "debug=tiny", "data=few_keys", "data.batch_size=8"]
    code, line, _ = call_entry("train", args, tmp_path / "runs" / "bad", capsys)
    assert code == 1 and line == (
        "error: data.batch_size is not a key of data (keys: num_tasks) but a keyword of "
        "advarch.data.digits.PermutedDigitsDataModule: +data.batch_size=8 adds it"
    ), line


REAL_CLI = [
    ("train.py", ["seed=abc"], "seed='abc'"),
    ("scripts/generate.py", ["ckpt_path={f}/garbage.ckpt"], "garbage.ckpt"),
    (
        "scripts/merge.py",
        ["base={f}/garbage.ckpt", "models=[{f}/ok.ckpt]", OUT],
        "base=",
    ),
    (
        "scripts/merge.py",
        ["base={f}/ok.ckpt", "models=[{f}/truncated.ckpt]", OUT],
        "models[0]",
    ),
    (  # (it said model=torch_transformer is not a model config, not why)
        "train.py",
        ["--config-dir", "/nonexistent", "model=torch_transformer"],
        "error: --config-dir /nonexistent does not exist",
    ),
    (  # (it said "must be a non-empty string": Hydra reads nan as a float)
        "train.py",
        ["run_name=nan"],
        "error: run_name=nan must be a non-empty string: nan reads as a float; quote it, "
        "run_name=\"'nan'\"",
    ),
    ("train.py", ["trainer.val_check_interval=0"], "trainer.val_check_interval=0"),
    ("train.py", ["strategy=ewc", *STREAM, "strategy.mode=bogus"], "'separate', 'online'"),
    ("train.py", ["ckpt_path={f}/truncated.ckpt"], "truncated.ckpt"),
    ("eval.py", ["ckpt_path={f}/garbage.ckpt"], "garbage.ckpt"),
    ("scripts/generate.py", ["ckpt_path={f}/empty.ckpt"], "empty.ckpt"),
    ("scripts/generate.py", [], "ckpt_path is required"),
    (  # (Hydra's parser: "mismatched input '(' expecting <EOF>" and a link)
        "scripts/generate.py",
        ["ckpt_path={f}/ok.ckpt", "prompt=def f(x):"],
        "error: prompt=def f(x):: Hydra cannot read this value (mismatched input '(' expecting "
        "<EOF>); quote it for Hydra and the shell: 'prompt=\"def f(x):\"'",
    ),
    (
        "train.py",
        ["run_name=my(run)"],
        "error: run_name=my(run): Hydra cannot read this value (Error parsing override "
        "'run_name=my(run)'); quote it for Hydra and the shell: 'run_name=\"my(run)\"'",
    ),
    ("scripts/merge.py", ["base={f}/ok.ckpt", "models=[{f}/ok.ckpt]"], "out= is required"),
    (
        "scripts/merge.py",
        ["base={f}/ok.ckpt", "models=[{f}/ok.ckpt]", "lambda=abc", OUT],
        "lambda='abc' has the wrong type",
    ),  # fmt: skip
    (  # (a traceback naming the temporary file, or "No space left" for any failed open)
        "scripts/merge.py",
        ["base={f}/ok.ckpt", "models=[{f}/ok.ckpt]", "out={f}/odd.xyz/m.ckpt"],
        "error: cannot write out={f}/odd.xyz/m.ckpt: Not a directory",
    ),
    (
        "scripts/merge.py",
        ["base={f}/ok.ckpt", "models=[{f}/ok.ckpt]", "out=/proc/m.ckpt"],
        "error: cannot write out=/proc/m.ckpt: No such file or directory",
    ),
]


@pytest.mark.parametrize(("script", "args", "expected"), REAL_CLI)
def test_real_cli_subset(
    script: str, args: list[str], expected: str, files: Path, tmp_path: Path
) -> None:
    args = [a.replace("{f}", str(files)) for a in args]
    extra = TINY if script == "train.py" else []
    if any(a.startswith("data=") for a in args):
        extra = [e for e in extra if e not in SMALL_TEXT]
    out = run_python([script, *extra, *args, f"hydra.run.dir={tmp_path}/run"], cwd=ROOT)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    assert expected.replace("{f}", str(files)) in last, last
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "where",
    [
        "hydra.run.dir=run",
        "hydra.run.dir={cwd}/run",
        "hydra.run.dir={mine}/run",
        "hydra.job.chdir=true",  # (the process's folder is the run folder)
        "paths.root_dir={mine}",  # (runs in mine/outputs/runs/<run name>/)
    ],
)
def test_a_refused_run_keeps_the_folders_it_did_not_make(where: str, tmp_path: Path) -> None:
    """A refused run removes its run folder and the parents it made, not the empty folder the
    user ran it in (their shell's working folder: every later command there failed on
    `os.getcwd()`) nor an empty folder of theirs above the run folder."""
    cwd, mine = tmp_path / "work", tmp_path / "mine"
    cwd.mkdir(), mine.mkdir()
    where = where.format(cwd=cwd, mine=mine)
    out = run_python([str(ROOT / "train.py"), "seed=abc", where], cwd=cwd)
    assert out.stderr.strip().splitlines()[-1].startswith("error: seed='abc'"), out.stderr[-2000:]
    assert cwd.is_dir() and mine.is_dir()
    assert not any(cwd.iterdir()) and not any(mine.iterdir())


def test_a_projects_own_launcher_is_a_launcher_config(tmp_path: Path) -> None:
    """`hydra/launcher=mine` of a `hydra_plugins/` package in the folder the command runs in
    (review 40: the launcher check loaded Hydra's plugins before that folder was importable,
    and refused it). A cold interpreter: Hydra scans its plugins once a process."""
    plugin = tmp_path / "hydra_plugins" / "my_launcher"
    plugin.mkdir(parents=True)
    (plugin / "__init__.py").write_text(
        "from hydra.core.config_store import ConfigStore\n"
        "ConfigStore.instance().store(group='hydra/launcher', name='mine', node={'_target_': "
        "'hydra._internal.core_plugins.basic_launcher.BasicLauncher'}, provider='mine')\n"
    )
    args = [str(ROOT / "train.py"), "hydra/launcher=mine", "seed=abc", "hydra.run.dir=run"]
    out = run_python(args, cwd=tmp_path, warm=False)
    assert out.stderr.strip().splitlines()[-1].startswith("error: seed='abc'"), out.stderr[-2000:]


def test_table_is_large_enough() -> None:
    assert len(ROWS) >= 70
    assert len({(e, tuple(a)) for e, a, _ in ROWS}) == len(ROWS)


def test_nan_message_says_no_checkpoint_exists(tmp_path: Path, capsys) -> None:
    args = [*TINY, "optimizer.lr=1e6", "scheduler.warmup_steps=0", "trainer.gradient_clip_val=null"]
    args += ["callbacks.model_checkpoint.every_n_train_steps=100", f"paths.cache_dir={tmp_path}/c"]
    code, line, text = call_entry("train", args, tmp_path / "run", capsys)
    assert code == 1 and "Traceback" not in text
    assert "training loss is" in line and "no checkpoint was written" in line, line
    assert "Encountered nan" not in text  # metrics keep NaN as NaN, no warning before the line


def test_an_own_model_module_that_cannot_be_imported_is_one_line(tmp_path: Path, capsys) -> None:
    # your own model (`--config-dir`), trained or evaluated where its module is not importable:
    # Hydra's `get_object` logged three ERROR lines (`Error getting object at …`) before ours,
    # and eval and train gave no reason and no hint (generate did)
    from omegaconf import OmegaConf

    from advarch.config.compose import compose_run

    (tmp_path / "mine" / "model").mkdir(parents=True)
    (tmp_path / "mine" / "model" / "own.yaml").write_text("_target_: my_models.Net\ndim: 8\n")
    saved = compose_run(["debug=tiny"], tmp_path / "trained")
    saved.model = {"_target_": "my_models.Net", "dim": 8}
    ckpt = {"state_dict": {}, "hyper_parameters": {"cfg": OmegaConf.to_container(saved)}}
    torch.save(ckpt, tmp_path / "own.ckpt")
    expected = (
        "error: model._target_='my_models.Net' cannot be imported (No module named "
        "'my_models'); run from the folder that holds its module, or install it"
    )
    for entry, args in (
        ("train", ["--config-dir", str(tmp_path / "mine"), "model=own", "debug=tiny"]),
        ("eval", [f"ckpt_path={tmp_path / 'own.ckpt'}"]),
    ):
        code, line, text = call_entry(entry, args, tmp_path / "runs" / entry, capsys)
        assert code == 1 and line == expected, (entry, text[-2000:])
        assert "Error getting object" not in text and "Are you sure" not in text, text[-2000:]


@pytest.mark.parametrize("error", ["ENOSPC", "EFBIG"])
def test_a_full_disk_is_one_line_naming_the_file(files: Path, tmp_path: Path, capsys,
                                                 monkeypatch, error: str) -> None:  # fmt: skip
    # torch's writer on a full disk: a traceback ending in "unexpected pos 16000 vs 15894";
    # fault pass 42c: a file-size limit (`ulimit -f`, FAT32's 4 GiB) was Hydra's 111 lines
    import errno

    def full(obj, f, *args, **kwargs) -> None:  # as a write to a full disk: no file named
        raise OSError(getattr(errno, error), os.strerror(getattr(errno, error)))

    monkeypatch.setattr("torch.save", full)  # (advarch.atomic imports torch where it saves)
    args = [*TINY, f"paths.cache_dir={files}/cache"]
    code, line, text = call_entry("train", args, tmp_path / "runs" / "full", capsys)
    assert code != 0 and "Traceback" not in text, text[-2000:]
    assert line.startswith("error: cannot write ") and "checkpoints/" in line, line
    reason = {"ENOSPC": "No space left on device", "EFBIG": "File too large"}[error]
    assert ".tmp" not in line and reason in line, line
    # no checkpoint was written (it said the last complete one stayed where it was written)
    assert "(nothing saved; free space, allow writing, or choose paths.cache_dir" in line, line


@pytest.mark.parametrize("entry", ["train", "eval"])
def test_a_disk_full_before_the_run_folder_is_written_is_one_line(
    entry: str, files: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    # tester 33 F4: Hydra writes `.hydra/config.yaml` before any advarch code runs; on a full
    # disk that was its chained OSError traceback (train.py and eval.py alike)
    import errno
    import pathlib

    real = pathlib.Path.write_bytes

    def full(path: pathlib.Path, data: bytes) -> int:  # as the disk: no space for a file
        if path.parent.name == "full":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", full)
    args = [*TINY, f"paths.cache_dir={files}/cache"] if entry == "train" else [
        f"ckpt_path={files}/ok.ckpt"]  # fmt: skip
    code, line, text = call_entry(entry, args, tmp_path / "runs" / "full", capsys)
    assert code != 0 and "Traceback" not in text, text[-2000:]
    assert line == (
        f"error: cannot write hydra.run.dir={tmp_path / 'runs' / 'full'}: No space left on "
        "device (free space, or choose another hydra.run.dir)"
    ), line
    assert not list((tmp_path / "runs" / "full").iterdir())  # (nothing left behind)


def test_a_full_disk_stops_a_merge_in_one_line_naming_out(
    files: Path, tmp_path: Path, capsys
) -> None:
    # a traceback ending in torch's "unexpected pos …"; the temporary file is /dev/full here
    (tmp_path / f".m.ckpt.tmp{os.getpid()}").symlink_to("/dev/full")
    args = [f"base={files}/ok.ckpt", f"models=[{files}/ok.ckpt]", f"out={tmp_path}/m.ckpt"]
    code, line, text = call_entry("merge", args, tmp_path / "run", capsys)
    assert code != 0 and "Traceback" not in text, text[-2000:]
    assert line == f"error: cannot write out={tmp_path}/m.ckpt: No space left on device", line


# (a file of the user's config folder, its text, overrides, the error line after the folder)
OWN_CONFIGS = [
    (
        "model/bad.yaml",
        "_target_: advarch.models.Model\ndim: [1\n",
        ["model=bad"],
        "model/bad.yaml is not valid YAML (line 2, column 6: while parsing a flow sequence: "
        "expected ',' or ']', but got '<stream end>')",
    ),
    (
        "model/mine/bad.yaml",
        "dim: 8\nmoe: top_k: 2\n",
        ["model=mine/bad"],
        "model/mine/bad.yaml is not valid YAML (line 2, column 11: mapping values are not "
        "allowed here)",
    ),
    (  # a sweep: every job ended in the parser's traceback, and the command exited 0
        "model/bad.yaml",
        "_target_: advarch.models.Model\ndim: [1\n",
        ["-m", "model=transformer,bad", "debug=tiny"],
        "model/bad.yaml is not valid YAML (line 2, column 6: while parsing a flow sequence: "
        "expected ',' or ']', but got '<stream end>')",
    ),
]


@pytest.mark.parametrize(("file", "text", "args", "expected"), OWN_CONFIGS)
def test_a_config_dir_file_that_is_not_yaml_is_one_line_naming_it(
    project, tmp_path: Path, file: str, text: str, args: list[str], expected: str
) -> None:
    # (Hydra's traceback, ending in the YAML parser's error)
    mine = tmp_path / "mine"
    (mine / file).parent.mkdir(parents=True)
    (mine / file).write_text(text)
    res = project.run("--config-dir", str(mine), *args)
    assert res.rc == 1 and res.stderr.strip() == f"error: {mine}/{expected}", res.output[-3000:]


@pytest.mark.parametrize(
    ("script", "args", "key"),
    [
        ("train.py", TINY, "hydra.run.dir"),
        ("train.py", ["-m", *TINY, "seed=1,2"], "hydra.sweep.dir"),
        ("eval.py", ["ckpt_path={f}/ok.ckpt"], "hydra.run.dir"),
    ],
)
def test_an_output_folder_that_cannot_be_made_is_one_line(script: str, args: list[str],
                                                         key: str, files: Path,
                                                         tmp_path: Path) -> None:  # fmt: skip
    # Hydra makes it before any advarch code runs: a chain of pathlib.mkdir tracebacks. The
    # command runs where `outputs` cannot be a folder (as in a read-only working folder)
    (tmp_path / "outputs").write_text("a file where the outputs folder goes")
    args = [a.replace("{f}", str(files)) for a in args]
    out = run_python([str(ROOT / script), *args], cwd=tmp_path)
    line = out.stderr.strip()
    assert out.returncode == 1 and "\n" not in line, out.stderr[-3000:]
    assert line.startswith(f"error: cannot write {key}=") and "outputs/" in line, line
    assert re.search(
        f": it is inside ({tmp_path}/)?outputs, a file \\(choose another {key}\\)$", line
    )


@pytest.mark.parametrize("entry", ["train", "eval"])
def test_a_cache_dir_that_cannot_be_written_is_one_line_naming_the_key(
    entry: str, files: Path, tmp_path: Path, capsys
) -> None:
    # new-user 37 F2: a file there ended in a 32-line NotADirectoryError traceback (a folder
    # that cannot be made: `error: [Errno 2] No such file or directory: '/proc/…'`)
    (tmp_path / "cache").write_text("a file where the cache folder goes")
    args = [*TINY] if entry == "train" else [f"ckpt_path={files}/ok.ckpt"]
    args.append(f"paths.cache_dir={tmp_path / 'cache'}")
    code, line, text = call_entry(entry, args, tmp_path / "run", capsys)
    assert code != 0 and "Traceback" not in text, text[-2000:]
    assert line == (f"error: cannot write paths.cache_dir={tmp_path / 'cache'}: it is a file, "
                    "not a folder (choose another paths.cache_dir)"), line  # fmt: skip
    assert not (tmp_path / "run").exists()  # (no run folder left behind)


def test_a_full_cache_disk_is_named_as_the_cache(files: Path, tmp_path: Path, capsys,
                                                 monkeypatch) -> None:  # fmt: skip
    # new-user 37 F1: a write() to a full disk names no file: the line blamed the run folder
    # (on another disk) and left it behind
    import errno

    def full(*args, **kwargs) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("advarch.data.text.pack_splits", full)  # (it writes the token arrays)
    args = [*TINY, f"paths.cache_dir={tmp_path / 'cache'}"]
    code, line, text = call_entry("train", args, tmp_path / "run", capsys)
    assert code != 0 and "Traceback" not in text, text[-2000:]
    assert line.startswith(f"error: cannot write {tmp_path / 'cache'}/text-"), line
    assert "No space left on device (nothing saved; free space" in line, line
    assert not (tmp_path / "run").exists()


def test_a_prompt_file_that_is_not_utf8_is_named(tmp_path: Path, capsys) -> None:
    # hunter 31: a UTF-16 prompt file (Windows editors' "Unicode") ended in
    # "error: 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte":
    # one line, but it names neither prompt_file nor the file (README: "one line naming
    # the key"); data.files names its file for the same problem.
    torch.save({"state_dict": {"model.w": torch.zeros(4, 4)}}, tmp_path / "ok.ckpt")
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes("def fib(n):".encode("utf-16"))
    code, line, text = call_entry(
        "generate", [f"ckpt_path={tmp_path}/ok.ckpt", f"prompt_file={prompt}"],
        tmp_path / "runs" / "bad", capsys)  # fmt: skip
    assert code != 0 and "Traceback" not in text
    said = f"prompt_file: {prompt} is UTF-16 text (its byte-order mark): save it as UTF-8"
    assert line == f"error: {said}", line


def test_a_built_cache_on_a_read_only_disk_still_trains(
    make_cfg, cache_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    # review 37b: a team's data cache built once and shared read-only (a read-only mount: even
    # root gets EROFS) trained before 543e6e4, which only reads a built cache; the new probe
    # (`check_writable(paths.cache_dir)` in train.run, _job and eval.py) refuses it before it
    # looks whether anything needs building
    import errno

    from advarch import output_folders
    from advarch.train import run

    run(make_cfg([*TINY], output_dir=tmp_path / "build"))  # (the cache built, as a team would)
    probe = output_folders._write_probe

    def read_only(folder: Path) -> None:
        if Path(folder).resolve() == cache_dir.resolve():
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        probe(folder)

    monkeypatch.setattr(output_folders, "_write_probe", read_only)
    run(make_cfg([*TINY], output_dir=tmp_path / "again"))  # reads the built cache only
