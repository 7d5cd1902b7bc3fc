r"""Model merging on digit tasks: one fine-tune per task, merged by every method over a λ sweep.

1. Base θ₀: `experiment=pretrain_digits_0_4` on ALL digits for a few steps, so every task has
   room to improve and negation has something to remove.
2. One fine-tune per task from θ₀ (`experiment=merge_digit_tasks data.classes=<task>`): every
   weight trains, no weight decay, so τₜ = θₜ − θ₀ holds only what task t taught.
3. Merges with `advarch.merging.merge_checkpoints`: linear (a soup of the task models),
   task_arithmetic / ties / dare_linear / dare_ties for each λ, slerp between the first two task
   models, and negation: θ₀ − λ τₜ for each task (Ilharco et al. 2023, §3).
4. Each merged checkpoint is evaluated on each task's test digits and on all digits (10-way
   argmax, the head's full output), and a markdown table is printed and written to
   `merge_table.md`. Merged checkpoints keep θ₀'s config, so `python eval.py
   ckpt_path=<folder>/merged/<name>.ckpt` evaluates any of them.

Each demo writes into a folder of its own, `<out>/<time>_<id>/` (`--out`, default
`outputs/merge_demo`), named as train.py names its run folders and printed as it starts:
`runs/` (θ₀ and the task fine-tunes), `merged/` and `merge_table.md`. A rerun never mixes its
checkpoints, CSVs or W&B runs with an earlier one's.

    python scripts/merge_demo.py                      # 5 pair tasks, ~50 s on 2 shared CPU cores

Defaults (measured, 9 s at 1 thread): θ₀ 0.608 on all digits, TIES / DARE-TIES at λ=0.3 0.653 /
0.669.
Two halves, digits 0–4 and 5–9 (measured, 13 s at 1 thread):

    python scripts/merge_demo.py --tasks 0,1,2,3,4 5,6,7,8,9 --base-steps 120 --task-steps 150 \
        --own-head-rows --task-overrides optimizer.lr=1e-3 --lambdas 0.3 0.4 0.5 0.7 1.0 \
        --negation-lambda 1.0

Each task model is 0.978 / 0.989 on its own half but 0.489 / 0.497 on all digits (it forgets the
other half); merging them gives 0.933 (TIES λ=0.3), 0.931 (task arithmetic λ=0.3), 0.925
(DARE-TIES λ=0.3), 0.922 (DARE λ=0.3), 0.883 (soup), 0.881 (slerp). Weaker bases kept less (earlier
code: task lr 3e-4 or 1e-3, 150 steps; θ₀ at 40 / 80 / 100 steps: 0.61 / 0.80 / 0.86, best merge
0.72 / 0.87 / 0.90), so θ₀ here is itself at 0.917: the merge undoes the fine-tunes' forgetting
rather than beating θ₀. Negation (others − τₜ, λ=1): digits 0–4 fall to 0.233 with 5–9 at 0.933;
5–9 to 0.328, 0–4 0.917.
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf

from advarch.benchmarks.timing import too_small
from advarch.callbacks.signals import Interrupted
from advarch.checkpoint import model_weights, read_checkpoint
from advarch.config.choices import check_overrides
from advarch.config.combinations import with_strategy_defaults
from advarch.config.compose import compose_run
from advarch.data.digits import DigitsDataModule
from advarch.errors import ConfigError
from advarch.merging import MergeConfig, merge_checkpoints
from advarch.output_folders import exit_if_unmakeable, stamped_folder
from advarch.pipeline import build_model
from advarch.spec import DataSpec
from advarch.stop_signals import Stopped, stop_on_signals
from advarch.strategies.evaluation import accuracy
from advarch.train import run

TASKS = ([0, 1], [2, 3], [4, 5], [6, 7], [8, 9])
METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")
QUIET = [
    *(f"callbacks.{n}=null" for n in ("rich_progress_bar", "rich_model_summary", "expert_load")),
    "callbacks.model_checkpoint=null",  # train.py writes last.ckpt at the end regardless
    "test=false",  # the demo evaluates every checkpoint itself
    "+trainer.enable_progress_bar=false",
]
BODY = "model.input.*,model.layers.*,model.final_norm.*"  # everything but the head


@dataclass
class DemoConfig:
    """Sizes of the demonstration; defaults are the measured run, `quick()` the test's."""

    tasks: list[list[int]] = field(default_factory=lambda: [list(t) for t in TASKS])
    base_steps: int = 40
    task_steps: int = 60
    lambdas: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7, 1.0])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    density: float = 0.5
    negation_lambda: float = 0.5
    overrides: list[str] = field(default_factory=list)  # extra overrides for every run
    task_overrides: list[str] = field(default_factory=list)  # … for the task fine-tunes only
    own_head_rows: bool = False  # a task trains only its classes' head rows (plus the body)

    def check(self) -> None:
        """ValueError naming the first bad option, before any training: task digits (each
        task once), step counts, and every merge's settings (built once without checkpoints)."""
        for i, task in enumerate(self.tasks):
            if not task or any(not 0 <= d <= 9 for d in task) or len(set(task)) < len(task):
                raise ValueError(f"--tasks {','.join(map(str, task))}: a task is distinct digits "
                                 "0-9 separated by commas, e.g. 0,1")  # fmt: skip
            if set(task) in [set(t) for t in self.tasks[:i]]:  # (its rows twice, slerp 01→01)
                raise ValueError(f"--tasks {','.join(map(str, task))}: the same digits as an "
                                 "earlier task; give each task once")  # fmt: skip
        for name in ("base_steps", "task_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 1")
        merge_plan(self, Path("base.ckpt"), [Path(f"{i}.ckpt") for i in range(len(self.tasks))])
        # keys and choices as train.py checks its own (a misspelt --task-overrides key stopped
        # in Hydra's traceback after the base had trained)
        task = task_overrides(self, self.tasks[0], Path("base.ckpt"))
        for option, overrides in (("overrides", base_overrides(self)), ("--task-overrides", task)):
            try:
                check_overrides(with_strategy_defaults(overrides), "train")
            except ConfigError as err:
                raise ValueError(f"{option}: {err}") from None


def train(overrides: list[str], output_dir: Path) -> Path:
    """One training run through `advarch.train.run`; returns its last.ckpt."""
    run(compose_run([*overrides, *QUIET], output_dir))
    return output_dir / "checkpoints" / "last.ckpt"


def task_name(task: list[int]) -> str:
    return "".join(map(str, task))


def base_overrides(demo: DemoConfig) -> list[str]:
    """θ₀'s run: all digits."""
    return [
        "experiment=pretrain_digits_0_4",
        "data.classes=null",
        f"trainer.max_steps={demo.base_steps}",
        f"trainer.val_check_interval={demo.base_steps}",
        f"trainer.log_every_n_steps={min(10, demo.base_steps)}",  # short runs log too
        *demo.overrides,
    ]


def task_overrides(demo: DemoConfig, task: list[int], base: Path) -> list[str]:
    """The fine-tune of one task from θ₀ at `base`."""
    steps, classes = demo.task_steps, f"[{','.join(map(str, task))}]"
    head = [f"strategy.head_classes={classes}", f"strategy.trainable=[{BODY}]"]
    return [
        "experiment=merge_digit_tasks",
        f"data.classes={classes}",
        *(head if demo.own_head_rows else []),
        f"strategy.pretrained={base}",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        f"trainer.log_every_n_steps={min(10, steps)}",
        *demo.overrides,
        *demo.task_overrides,
    ]


def train_all(demo: DemoConfig, out: Path) -> tuple[Path, list[Path]]:
    """θ₀ on all digits, then one full fine-tune per task from θ₀."""
    base = train(base_overrides(demo), out / "runs" / "base")
    tasks = [
        train(task_overrides(demo, task, base), out / "runs" / f"task_{task_name(task)}")
        for task in demo.tasks
    ]
    return base, tasks


class Evaluator:
    """Per-task and all-digit test accuracy of checkpoints sharing θ₀'s architecture."""

    def __init__(self, base: Path, tasks: list[list[int]]) -> None:
        ckpt = read_checkpoint(base, key="")
        hp = ckpt["hyper_parameters"]
        self.model = build_model(OmegaConf.create(hp["cfg"]), DataSpec(**hp["spec"])).eval()
        self.tasks = {task_name(t): (t, self._batches(t)) for t in tasks}
        self.all_digits = self._batches(None)

    @staticmethod
    def _batches(classes: list[int] | None) -> list[dict[str, torch.Tensor]]:
        dm = DigitsDataModule(classes=classes, batch_size=512)
        dm.setup()
        return list(dm.test_dataloader())

    def __call__(self, path: Path) -> dict[str, float]:
        self.model.load_state_dict(model_weights(read_checkpoint(path, key="")["state_dict"]))
        acc = {name: accuracy(self.model, b, classes=t) for name, (t, b) in self.tasks.items()}
        return {**acc, "all": accuracy(self.model, self.all_digits)}


def merge_plan(demo: DemoConfig, base: Path, tasks: list[Path]) -> list[tuple[str, str, dict]]:
    """(method label, λ label, merge_checkpoints kwargs) of every merge in the table."""
    plan = [
        (
            "linear (soup)",
            "—",
            {"base": base, "models": tasks, "cfg": MergeConfig(method="linear")},
        )
    ]
    for method in demo.methods:
        density = 1.0 if method == "task_arithmetic" else demo.density
        for lam in demo.lambdas:
            cfg = MergeConfig(method=method, lam=lam, density=density)
            plan.append((method, f"{lam:g}", {"base": base, "models": tasks, "cfg": cfg}))
    if len(tasks) >= 2:
        names = f"{task_name(demo.tasks[0])}→{task_name(demo.tasks[1])}"
        cfg = MergeConfig(method="slerp", t=0.5)
        plan.append(
            (f"slerp {names}", "t=0.5", {"base": tasks[0], "models": [tasks[1]], "cfg": cfg})
        )
    lam = demo.negation_lambda
    for t, task in enumerate(demo.tasks):
        cfg = MergeConfig(method="task_arithmetic", weights=[-1.0], lam=lam)
        plan.append(
            (
                f"negate {task_name(task)}",
                f"{lam:g}",
                {"base": base, "models": [tasks[t]], "cfg": cfg},
            )
        )
        signs = [-1.0 if s == t else 1.0 for s in range(len(tasks))]
        cfg = MergeConfig(method="task_arithmetic", weights=signs, lam=lam)
        plan.append(
            (f"others − {task_name(task)}", f"{lam:g}", {"base": base, "models": tasks, "cfg": cfg})
        )
    return plan


def run_demo(demo: DemoConfig, out: Path) -> list[tuple[str, str, dict[str, float]]]:
    """Train, merge and evaluate; returns (method, λ, accuracies) rows, references first."""
    base, tasks = train_all(demo, out)
    evaluate = Evaluator(base, demo.tasks)
    rows = [("base θ₀", "—", evaluate(base))]
    rows += [
        (f"fine-tuned {task_name(t)}", "—", evaluate(p))
        for t, p in zip(demo.tasks, tasks, strict=True)
    ]
    for i, (method, lam, kwargs) in enumerate(merge_plan(demo, base, tasks)):
        # "negate 01" at λ 0.5 → 18_negate_01_0.5.ckpt; "linear (soup)" → 00_linear_soup.ckpt
        label = re.sub(r"[^\w.]+", "_", f"{method} {lam}").strip("_")
        path = out / "merged" / f"{i:02d}_{label}.ckpt"
        merge_checkpoints(kwargs["base"], kwargs["models"], kwargs["cfg"], path)
        rows.append((method, lam, evaluate(path)))
    return rows


def table(rows: list[tuple[str, str, dict[str, float]]]) -> str:
    """Markdown: method × λ → task-aware accuracy on each task's test digits (argmax over the
    task's classes, as with one head per task) and 10-way accuracy on all test digits."""
    columns = list(rows[0][2])
    head = ["method", "λ", *(f"task {c}" for c in columns[:-1]), "all digits (10-way)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, lam, acc in rows:
        lines.append(f"| {method} | {lam} | " + " | ".join(f"{acc[c]:.3f}" for c in columns) + " |")
    return "\n".join(lines)


SMOKE_STEPS = 10  # fewer training steps than this: a smoke run (`--base-steps 4 --task-steps 4`)


def smoke_note(demo: DemoConfig) -> str | None:
    """The words under a table of runs too short to learn the digits (None otherwise)."""
    steps = {"--base-steps": demo.base_steps, "--task-steps": demo.task_steps}
    short = [f"{k} {v}" for k, v in steps.items() if v < SMOKE_STEPS]
    return f"note: {' '.join(short)}: {too_small('accuracies')}" if short else None


def _digits(task: str) -> list[int]:
    """`0,1` → [0, 1] (ValueError naming the option otherwise)."""
    try:
        return [int(d) for d in task.split(",")]
    except ValueError:
        raise ValueError(
            f"--tasks {task}: a task is digits 0-9 separated by commas, e.g. 0,1"
        ) from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("outputs/merge_demo"),
        help="each demo writes into a new folder <out>/<time>_<id>/ (default: %(default)s)",
    )
    parser.add_argument("--tasks", nargs="+", help="digit tasks, e.g. 0,1 2,3 (default: pairs)")
    parser.add_argument("--lambdas", nargs="+", type=float)
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        help="the λ-swept methods (default: all); the soup, slerp and negation always run",
    )
    parser.add_argument("--base-steps", type=int)
    parser.add_argument("--task-steps", type=int)
    parser.add_argument("--density", type=float, help="ties / dare density")
    parser.add_argument(
        "--own-head-rows",
        action=argparse.BooleanOptionalAction,
        help="tasks train only their classes' head rows and the whole body (default: off)",
    )
    parser.add_argument("--negation-lambda", type=float, help="λ of the negation rows")
    parser.add_argument("--task-overrides", nargs="*", help="extra overrides of the task runs")
    args = parser.parse_args()
    demo = DemoConfig()
    try:
        if args.tasks:
            demo.tasks = [_digits(t) for t in args.tasks]
        for key in (
            "lambdas",
            "methods",
            "base_steps",
            "task_steps",
            "density",
            "task_overrides",
            "own_head_rows",
            "negation_lambda",
        ):
            if getattr(args, key) is not None:
                setattr(demo, key, getattr(args, key))
        demo.check()
        exit_if_unmakeable(args.out)  # (run_lock's traceback as the first run began)
    except ValueError as err:
        sys.exit(f"error: {err}")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    start = time.perf_counter()
    folder = stamped_folder(args.out)
    print(f"merge demo: writing into {folder}", flush=True)
    stop_on_signals()
    try:
        text = table(run_demo(demo, folder))
    except Interrupted as err:  # a signal while a run trained: its line is printed
        sys.exit(err.exit_code)
    except (KeyboardInterrupt, Stopped) as err:  # while merging or evaluating
        signum = err.signum if isinstance(err, Stopped) else signal.SIGINT
        print(f"{signal.Signals(signum).name} received: merge demo stopped", file=sys.stderr)
        sys.exit(128 + signum)
    if note := smoke_note(demo):  # under the table, in its file too
        text += f"\n\n{note}"
    (folder / "merge_table.md").write_text(text + "\n")
    print(text)
    print(f"\n{time.perf_counter() - start:.0f} s; table in {folder / 'merge_table.md'}, "
          f"merged checkpoints in {folder / 'merged'}")  # fmt: skip


if __name__ == "__main__":
    main()
