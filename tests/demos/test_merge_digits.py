"""The merging demonstration (`advarch.demos.merge_digits`, run by scripts/merge_demo.py) end
to end at toy size: train, merge, evaluate, negate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from advarch.demos import merge_digits
from advarch.eval import evaluate
from tests.cli import Project
from tests.conftest import compose_config

TINY = [
    "model.dim=32",
    "model.depth=1",
    "model.num_heads=2",
    "model.ffn_hidden=32",
    "data.batch_size=32",
]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    out = tmp_path_factory.mktemp("merge_demo")
    demo = merge_digits.DemoConfig(
        tasks=[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]],
        base_steps=20,
        task_steps=40,
        lambdas=[0.5],
        methods=["task_arithmetic", "ties"],
        negation_lambda=1.0,
        overrides=TINY,
        task_overrides=["optimizer.lr=3e-3"],
    )
    rows = merge_digits.run_demo(demo, out)
    table = merge_digits.table(rows)
    assert table.count("\n") == len(rows) + 1 and "| ties | 0.5 |" in table
    return out, rows


def test_negating_a_task_vector_lowers_that_task(demo_run) -> None:
    _, rows = demo_run
    acc = {method: values for method, _, values in rows}
    base = acc["base θ₀"]
    for task in ("01234", "56789"):
        assert acc[f"fine-tuned {task}"][task] > base[task]
        assert acc[f"negate {task}"][task] < base[task]


def test_merging_keeps_both_tasks(demo_run) -> None:
    """Task arithmetic at λ=0.5 over two tasks is the uniform soup θ₀ + (τ₁ + τ₂)/2 exactly,
    and it keeps each task by 0.1 better than the model fine-tuned on the other one (measured at
    seeds 0/1: 0.711/0.700 vs 0.489/0.367 on 01234, 0.572/0.511 vs 0.261/0.294 on 56789)."""
    _, rows = demo_run
    acc = {(method, lam): values for method, lam, values in rows}
    merged = acc[("task_arithmetic", "0.5")]
    soup = acc[("linear (soup)", "—")]  # equal weights up to float rounding: one flip allowed
    assert merged == pytest.approx(soup, abs=0.01)
    assert merged["01234"] > acc[("fine-tuned 56789", "—")]["01234"] + 0.1
    assert merged["56789"] > acc[("fine-tuned 01234", "—")]["56789"] + 0.1


def merged_and_row(demo_run, method: str) -> tuple[Path, dict[str, float]]:
    """The first merged checkpoint of `method` and its row of the demo's table."""
    out, rows = demo_run
    names = sorted(p.name for p in (out / "merged").glob("*.ckpt"))
    assert "00_linear_soup.ckpt" in names and any("_negate_01234_" in n for n in names), names
    merged = sorted((out / "merged").glob(f"*{method}*.ckpt"))[0]
    references = 1 + 2  # base θ₀ and the two fine-tuned task models come first
    return merged, rows[references + int(merged.name[:2])][2]


def test_merged_checkpoint_evaluates_like_any_other(demo_run, cache_dir: Path) -> None:
    out, _ = demo_run
    merged, row = merged_and_row(demo_run, "ties")
    cfg = compose_config([f"ckpt_path={merged}"], out / "eval", cache_dir, config_name="eval")
    metrics = evaluate(cfg).metrics
    assert metrics["test/acc"] == pytest.approx(row["all"], abs=1e-6)  # the demo's own number


@pytest.mark.slow
def test_merged_checkpoint_through_the_eval_cli(demo_run, project: Project) -> None:
    merged, row = merged_and_row(demo_run, "task_arithmetic")
    res = project.run(f"ckpt_path={merged}", script="eval.py").check()
    metrics = json.loads((res.run_dir / "metrics.json").read_text())
    assert metrics["test/acc"] == pytest.approx(row["all"], abs=1e-6)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--density", "2"], "error: density=2.0 must be in (0, 1]"),
        (["--tasks", "0,1", "0,x"], "error: --tasks 0,x: a task is digits 0-9"),
        (["--tasks", "0,11", "2,3"], "error: --tasks 0,11: a task is distinct digits 0-9"),
        (["--task-steps", "0"], "error: --task-steps=0 must be >= 1"),
        (  # (it trained 0,1 twice: duplicate rows and a slerp of a model with itself)
            ["--tasks", "0,1", "2,3", "1,0"],
            "error: --tasks 1,0: the same digits as an earlier task; give each task once",
        ),
        (  # (Hydra's traceback after the base model had trained)
            ["--task-overrides", "model.dmi=3"],
            "error: --task-overrides: model.dmi is not a key of model (did you mean model.dim? ",
        ),
        (["--task-overrides", "optimizer=adamx"], "error: --task-overrides: optimizer=adamx "),
    ],
)
def test_bad_options_stop_before_any_training(args, message, monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(merge_digits, "train", lambda *a: pytest.fail("trained"))
    monkeypatch.setattr("sys.argv", ["merge_demo.py", "--out", str(tmp_path), *args])
    with pytest.raises(SystemExit) as stop:
        merge_digits.main()
    assert stop.value.code == message or str(stop.value.code).startswith(message)


def fake_demo(monkeypatch, rows: list) -> None:
    """`run_demo` without training: one merged checkpoint per call, named by the call."""
    calls = []

    def run_demo(demo, out: Path) -> list:
        calls.append(out)
        (out / "merged").mkdir(parents=True, exist_ok=True)
        (out / "merged" / f"{len(calls):02d}_linear_soup.ckpt").write_text("")
        return rows

    monkeypatch.setattr(merge_digits, "run_demo", run_demo)


def test_the_last_line_says_where_the_table_is(monkeypatch, tmp_path, capsys) -> None:
    # it named only the merged checkpoints' folder, not merge_table.md
    fake_demo(monkeypatch, [("base θ₀", "—", {"01": 0.5, "all": 0.25})])
    monkeypatch.setattr("sys.argv", ["merge_demo.py", "--out", str(tmp_path)])
    merge_digits.main()
    first, *_, last = capsys.readouterr().out.strip().splitlines()
    (table,) = tmp_path.glob("*/merge_table.md")
    assert first == f"merge demo: writing into {table.parent}"
    assert f"table in {table}, merged checkpoints in {table.parent / 'merged'}" in last, last
    assert table.read_text().startswith("| method | λ | task 01 |")


def test_a_rerun_writes_into_a_folder_of_its_own(monkeypatch, tmp_path) -> None:
    # a rerun wrote into <out>/merged beside the earlier run's checkpoints (and its runs/)
    fake_demo(monkeypatch, [("base θ₀", "—", {"01": 0.5, "all": 0.25})])
    monkeypatch.setattr("sys.argv", ["merge_demo.py", "--out", str(tmp_path)])
    merge_digits.main()
    merge_digits.main()
    merged = [sorted(p.name for p in (f / "merged").iterdir()) for f in tmp_path.iterdir()]
    assert sorted(merged) == [["01_linear_soup.ckpt"], ["02_linear_soup.ckpt"]], merged


@pytest.mark.slow
def test_sigterm_while_it_trains_is_one_line(project: Project) -> None:
    """SIGTERM to `scripts/merge_demo.py` while its base trains (tester 33 F6): the stop
    callback's line and exit 143, not an `Interrupted` traceback and exit 1."""
    metrics = "outputs/merge_demo/*/runs/base/csv/version_0/metrics.csv"
    stopped = project.shell(
        "python scripts/merge_demo.py --base-steps 2000 --task-steps 4 & pid=$!; "
        f"until ls {metrics} 2>/dev/null; do sleep 0.05; done; kill -TERM $pid; wait $pid"
    )
    assert stopped.rc == 143 and "Traceback" not in stopped.output, stopped.output[-3000:]
    stop, *after = stopped.output.strip().splitlines()[-2:]  # (then W&B's sync line, as train.py)
    assert stop.startswith("SIGTERM received: saved ") and "runs/base/" in stop, stop
    assert all(line.startswith("sync to W&B later: wandb sync ") for line in after), after
