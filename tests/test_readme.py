"""The README is executable: every command of its ```bash blocks runs exactly as written.

Each command runs in a fresh clone's layout (`tests.cli.Project`) with only the smoke switch
the README documents for it appended (`debug=tiny` …, see SMOKE and the README's "Smoke runs"),
and its placeholders (`<ckpt>`, `<name>/<run>` …) replaced by files that earlier commands made:
the session's CLI-trained checkpoints, the README's own merge and grid sweep. Each must exit 0
and leave the files it promises.
"""

from __future__ import annotations

import csv
import glob
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tests.cli import CliResult, Project, read_metrics, series
from tests.conftest import ROOT, TrainedRun
from tests.wandb_offline import offline_run

README = (ROOT / "README.md").read_text()

# The documented smoke switch of each program: (command prefix, words appended). First match wins.
OPTUNA_SMOKE = ["debug=tiny", "hydra.sweeper.n_trials=2"]
SMOKE: list[tuple[str, list[str]]] = [
    ("make train", ["ARGS=debug=tiny"]),
    ("python train.py", ["debug=tiny"]),
    (
        "python scripts/generate.py bench=true",
        ['bench_overrides=["debug=tiny"]', "bench_new_tokens=8"],
    ),
    ("python scripts/bench.py", ["--quick", "--only", "moe"]),
    ("python scripts/merge_demo.py", ["--base-steps", "4", "--task-steps", "4"]),
    ("python scripts/retro_report.py", ["debug=tiny", "--retrofit-steps", "6"]),
]


def readme_commands() -> list[str]:
    """Every non-comment line of the README's ```bash blocks, in order."""
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def smoke(words: list[str]) -> list[str]:
    command = shlex.join(words)
    if command.startswith("python train.py") and "hparams_search=" in command:
        return OPTUNA_SMOKE
    if command.startswith("python scripts/retro_report.py") and "--retrofit" not in words:
        return ["debug=tiny"]  # (--retrofit-steps belongs to a retrofit)
    for prefix, extra in SMOKE:
        if command.startswith(prefix):
            return extra
    return []


# Commands that fail today: the integrator removes a mark when the fix lands (strict: a fixed
# command turns its xfail into a failure).
BROKEN: dict[str, str] = {}
SKIP = {"make test": "this test suite itself"}
# Commands the README marks as GPU commands (`--device cuda`, `experiment=gpu_lm`): run where
# CUDA exists, skipped (with that reason) on CPU-only machines such as CI.
NEEDS_GPU = ("--device cuda", "experiment=gpu_lm")
NEEDS_SLURM = "hydra/launcher=slurm"  # submits to a SLURM cluster: runs where `sbatch` exists


# Experiments over local files outside the repo (data.files): run where their glob matches.
def experiment_files(name: str) -> str:
    cfg = yaml.safe_load((ROOT / "advarch" / "configs" / "experiment" / f"{name}.yaml").read_text())
    return cfg["data"]["files"]


NEEDS_FILES = {"experiment=retro_versions": experiment_files("retro_versions")}
# Commands that need files an earlier command of the same chain made run on one worker, in order.
CHAINS = {
    "scripts/merge.py": "readme-merge",
    "eval.py ckpt_path=<any": "readme-merge",
    "-m model.depth": "readme-sweep",
    "outputs/multiruns": "readme-sweep",
    "data.domains=[text,net,concurrency]": "readme-finetune",
    "strategy=finetune": "readme-finetune",
}


def command_id(line: str) -> str:
    return shlex.join(shlex.split(line, comments=True))


LINE_OF = {command_id(line): line for line in readme_commands()}  # as written, placeholders kept


def params() -> list:
    """One test per distinct command: a command the README shows twice runs once."""
    out = []
    for cmd in dict.fromkeys(command_id(line) for line in readme_commands()):
        marks = []
        if cmd in BROKEN:
            marks.append(pytest.mark.xfail(strict=True, reason=BROKEN[cmd]))
        if cmd in SKIP:
            marks.append(pytest.mark.skip(reason=SKIP[cmd]))
        if any(g in cmd for g in NEEDS_GPU) and not torch.cuda.is_available():
            marks.append(pytest.mark.skip(reason="a GPU command; this machine has no CUDA"))
        if NEEDS_SLURM in cmd and shutil.which("sbatch") is None:
            marks.append(pytest.mark.skip(reason="a SLURM command; this machine has no sbatch"))
        for key, pattern in NEEDS_FILES.items():
            if key in cmd and not glob.glob(pattern):
                marks.append(pytest.mark.skip(reason=f"needs local files {pattern}"))
        for key, group in CHAINS.items():
            if key in cmd:
                marks.append(pytest.mark.xdist_group(group))
        out.append(pytest.param(cmd, id=cmd[:80], marks=marks))
    return out


class Made:
    """Files earlier commands made, for the placeholders of later ones (one per worker)."""

    merged: Path | None = None
    sweep: Path | None = None
    base: Path | None = None  # the three-domain base that the finetune line extends


@pytest.fixture(scope="module")
def readme_project(tmp_path_factory, cache_dir: Path, trained: dict[str, TrainedRun]) -> Project:
    """A clone whose outputs/runs holds the session's trained runs, as after `python train.py`."""
    proj = Project(tmp_path_factory.mktemp("readme") / "project", cache_dir)
    for run in trained.values():
        link = proj.root / "outputs" / "runs" / run.run_dir.parent.name / run.run_dir.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(run.run_dir)
    (proj.root / "prompt.txt").write_text("def fib(n):\n")
    return proj


def substitute(line: str, proj: Project, trained: dict[str, TrainedRun]) -> list[str]:
    """The README line's words with placeholders → files made by earlier commands (`[data=...]`,
    optional, dropped). Placeholders are filled in the text: some hold spaces."""
    a, b = trained["lm"], trained["lm_seed1"]
    run_rel = str(a.run_dir.relative_to(a.run_dir.parents[1]))  # <name>/<run>
    fills = {
        " [data=...]": "",
        "models=[<ckpt>,<ckpt>]": f"models=[{a.ckpt},{b.ckpt}]",
        "models=[<a>,<b>]": f"models=[{a.ckpt},{b.ckpt}]",
        "out=<ckpt>": f"out={proj.root / 'merged.ckpt'}",
        "strategy.pretrained=<ckpt>": f"strategy.pretrained={Made.base}",
        "<any ckpt, merged ones too>": str(Made.merged),
        "<ckpt>": str(a.ckpt),
        "outputs/runs/<name>/<run>": f"outputs/runs/{run_rel}",
        "outputs/runs/<name>/<time>": f"outputs/runs/{run_rel}",
        "outputs/multiruns/<time>": str(Made.sweep),
    }
    for placeholder, value in fills.items():
        if placeholder in line:
            assert value != "None", f"{placeholder}: the command making it runs first (CHAINS)"
            line = line.replace(placeholder, value)
    words = shlex.split(line, comments=True)
    assert not [w for w in words if re.search(r"<\w+>", w)], f"unknown placeholder in {line}"
    return words


def check_promises(cmd: str, line: str, res: CliResult, proj: Project) -> None:
    """The files and lines each kind of command promises (README 'Every run writes …').

    `cmd` is the README's command, `line` what ran (placeholders filled, smoke switch added).
    """
    words, ran = shlex.split(cmd), shlex.split(line)
    if cmd.startswith(("python train.py", "make train")) and "-m" not in words:
        run = res.run_dir
        for name in (".hydra/config.yaml", "config_tree.txt", "checkpoints/last.ckpt"):
            assert (run / name).is_file(), f"{cmd}: no {name} in {run}"
        # the recorded config is the model trained (debug=tiny's sizes were missing from it)
        trained = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
        recorded = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
        assert recorded["model"] == trained["hyper_parameters"]["cfg"]["model"], cmd
        assert list(run.glob("csv/version_*/metrics.csv")), cmd
        debug = any("debug=" in w for w in ran)  # also make's ARGS=debug=tiny
        if not debug or {"logger=wandb", "logger=many"} & set(ran):  # debug: CSV unless asked
            assert list(run.glob("wandb/offline-run-*")), f"{cmd}: no offline W&B run"
        if "logger=many" in words:
            assert list(run.glob("tensorboard/**/events.out.tfevents.*")), cmd
        assert "advarch run summary" in res.stdout
        if "data.domains=[text,net,concurrency]" in ran:
            Made.base = run / "checkpoints" / "last.ckpt"
        if "--config-dir" in words:  # a user's own model samples like any other LM
            ckpt = run / "checkpoints" / "last.ckpt"
            cmd = f"python scripts/generate.py ckpt_path={ckpt} prompt=def max_new_tokens=8"
            sampled = proj.shell(f"source .venv/bin/activate && {cmd}").check()
            assert sampled.stdout.startswith("def") and len(sampled.stdout) > len("def\n")
    elif cmd.startswith("python train.py"):
        sweep = res.sweep_dir
        jobs = sorted(p for p in sweep.iterdir() if p.name.isdigit())
        assert jobs and all((j / "checkpoints" / "last.ckpt").is_file() for j in jobs), sweep
        assert (sweep / "summary.md").is_file() and (sweep / "summary.csv").is_file()
        # each trial's output names it (a parallel sweep's trials print at once)
        for job in jobs:
            assert re.search(f"^advarch run summary · trial {job.name}\\b", res.stdout, re.M)
        if "model.depth=2,4" in words:
            assert len(jobs) == 2
            assert "advarch run summary · trial 1 (model.depth=4) ─" in res.stdout
            assert "\ntrial 1 (model.depth=4)\n┏━" in res.stdout  # the model's table
            Made.sweep = sweep
        if "hydra/launcher=local_parallel" in words:  # (not every joblib option: an address)
            assert "[HYDRA] 1 trial in 2 worker processes (hydra.launcher.n_jobs=2)\n" in res.output
            assert "trial 0 Epoch " in res.stdout and "Joblib.Parallel(" not in res.output
        if "hparams_search=" in cmd:
            assert "\x1b[" not in res.output, "escape codes (Optuna's colours) in a pipe"
            assert len(jobs) == 2  # the smoke switch's n_trials
            assert (sweep / "optimization_results.yaml").is_file()
            best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
            assert "best_params" in best
        if "hparams_search=optuna" in words:
            check_optuna_sweep(sweep, best)
    elif cmd.startswith("python eval.py"):
        assert (res.run_dir / "metrics.json").is_file()
        if "outputs/runs/<name>/<run>" in cmd:  # the session's CLI-trained run `lm`
            check_eval_of_a_trained_run(res, proj.root / Path(ran[2].split("=", 1)[1]))
    elif cmd.startswith("python scripts/merge.py"):
        out = Path(re.search(r"out=(\S+)", " ".join(ran)).group(1))
        assert out.is_file()
        Made.merged = out
    elif "scripts/generate.py" in cmd and "bench=true" in words:
        assert "cached" in res.stdout
        assert not res.new_runs, f"{cmd}: generation writes no files, yet left {res.new_runs}"
    elif "scripts/generate.py" in cmd:
        assert res.stdout.startswith("def fib(n):") and len(res.stdout) > len("def fib(n):\n")
        assert not res.new_runs, f"{cmd}: generation writes no files, yet left {res.new_runs}"
    elif "scripts/report.py" in cmd:
        folder = Path(ran[2]) if Path(ran[2]).is_absolute() else proj.root / ran[2]
        assert (folder / "report" / "report.md").is_file()
        said = f"report: {Path(ran[2]) / 'report' / 'report.md'}"  # the path as typed
        assert res.stdout.splitlines()[0] == said, res.stdout
        if "--wandb" not in words:
            assert res.stdout.strip() == said, res.stdout  # that line alone
        if "--wandb" in words:  # in the W&B group of the sweep's trials (their resolved name)
            run_name = yaml.safe_load((folder / "0" / "csv" / "version_0" / "hparams.yaml"
                                       ).read_text())["run_name"]  # fmt: skip
            report = offline_run(folder / "report")
            assert report["group"] == f"{run_name}-sweep-{folder.name}", report["group"]
            assert run_name.startswith("debug-tiny-") and "${" not in run_name
            assert report["config"]["best_run"] and "best_overrides" in report["config"]
            assert f"sync to W&B later: wandb sync {folder / 'report' / 'wandb'}" in res.stdout
    elif "scripts/merge_demo.py" in cmd:  # (a rerun wrote over the last one's folder)
        (table,) = (proj.root / "outputs" / "merge_demo").glob("*_*/merge_table.md")
        folder = table.parent.relative_to(proj.root)
        assert res.stdout.startswith(f"merge demo: writing into {folder}\n"), res.stdout
        # (new user 38 L12) its smoke form says so under the table, as the reports do
        note = ("note: --base-steps 4 --task-steps 4: sizes too small for the accuracies to "
                "mean anything (a smoke run)")  # fmt: skip
        assert table.read_text().rstrip().endswith(f"\n\n{note}") and note in res.stdout
    elif "scripts/bench.py" in cmd:
        assert "| moe" in res.stdout  # the table, here of the smoke form's one suite
        assert re.search(r"^\[1/\d\] moe … done in \d+ s$", res.stderr, re.M)  # (not a hang)


def check_optuna_sweep(sweep: Path, best: dict) -> None:
    """`python train.py -m hparams_search=optuna`: a row per trial holding its sampled values,
    each trial's value its own run's final val/loss, and Optuna's best the smallest."""
    with (sweep / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    assert {"optimizer.lr", "optimizer.weight_decay", "model.dim"} <= set(rows[0])
    for row in rows:
        final = series(read_metrics(sweep / row["trial"]), "val/loss")[-1]
        assert float(row["val/loss"]) == pytest.approx(final, rel=1e-6)
    assert best["best_value"] == pytest.approx(min(float(r["val/loss"]) for r in rows), rel=1e-6)
    assert float(best["best_params"]["model.dim"]) == float(rows[0]["model.dim"])


def check_eval_of_a_trained_run(res: CliResult, ckpt: Path) -> None:
    """`python eval.py ckpt_path=<a CLI-trained run's last.ckpt>`: the run's own test metrics
    (it tested 2 of its 6 test batches, debug=tiny's limit: eval.py must do the same), and a
    W&B run in the training run's group, filterable by its tags."""
    run_dir = ckpt.parents[1]
    tested = [r for r in read_metrics(run_dir) if "test/loss" in r][-1]
    evaluated = json.loads((res.run_dir / "metrics.json").read_text())
    for key in ("test/loss", "test/acc", "test/bpb"):
        assert evaluated[key] == pytest.approx(tested[key], rel=1e-6), key
    run, eval_run = offline_run(run_dir), offline_run(res.run_dir)
    assert "baseline" in run["tags"]  # (the session runs' typed tags=[baseline])
    assert eval_run["job_type"] == "eval" and eval_run["group"] == run["group"]
    assert eval_run["tags"] == [*run["tags"], "eval"]  # filterable like the training run
    assert eval_run["config"]["model"] == run["config"]["model"]
    trained = torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]
    assert eval_run["config"]["eval"]["trained_steps"] == trained > 0
    typed = eval_run["config"]["ckpt_path"]  # what it read (the run's: what it resumed)
    assert typed.startswith("outputs/runs/") and ckpt.as_posix().endswith(f"/{typed}")
    assert "test/bpb" in eval_run["summary"]
    (offline,) = (res.run_dir / "wandb").glob("offline-run-*")  # (eval.py never named it)
    assert res.stdout.strip().endswith(f"sync to W&B later: wandb sync {offline}")


def test_every_readme_bash_line_is_collected() -> None:
    cmds = [command_id(line) for line in readme_commands()]
    assert "make train" in cmds and "python scripts/bench.py" in cmds
    assert all(c.startswith(("make ", "python ", "source ")) for c in cmds), cmds


def test_smoke_switches_are_documented() -> None:
    for _prefix, extra in [*SMOKE, ("", OPTUNA_SMOKE)]:
        assert shlex.join(extra) in README, f"README does not document the smoke switch {extra}"


# Placeholder → (what fills it, the README command that makes it): run first if not yet made.
MADE_BY = {
    "<any ckpt, merged ones too>": ("merged", "python scripts/merge.py method=ties"),
    "outputs/multiruns/<time>": ("sweep", "python train.py -m model.depth=2,4"),
    "strategy.pretrained=<ckpt>": (
        "base",
        "python train.py model=moe strategy=naive 'data.domains",
    ),
}


def run_readme(cmd: str, proj: Project, trained: dict[str, TrainedRun]) -> None:
    """Run one README command with its smoke switch; check what it promises."""
    for placeholder, (attr, maker) in MADE_BY.items():
        if placeholder in LINE_OF[cmd] and getattr(Made, attr) is None:
            run_readme(next(c for c in LINE_OF if LINE_OF[c].startswith(maker)), proj, trained)
    words = substitute(LINE_OF[cmd], proj, trained)
    line = shlex.join([*words, *smoke(shlex.split(cmd))])
    res = proj.shell(f"source .venv/bin/activate && {line}").check()
    noise = [  # logged errors (console format: `ERROR: …`), W&B's warnings
        x
        for x in res.output.splitlines()
        if x.startswith("ERROR: ") or "[ERROR]" in x or "wandb: WARNING" in x
    ]
    assert not noise, f"{cmd}: error/warning lines in the console of a run that worked: {noise}"
    if "retr" in cmd or "bench=true" in cmd:  # they build retrieval databases: no bar redraws
        assert "\r" not in res.output, f"{cmd}: progress-bar redraws (\\r) in piped output"
    check_promises(cmd, line, res, proj)


@pytest.mark.parametrize("cmd", params())
def test_readme_command(cmd: str, readme_project: Project, trained: dict[str, TrainedRun]) -> None:
    if cmd.startswith("source "):
        res = readme_project.shell(f"{cmd} && python -c 'import sys; print(sys.prefix)'")
        assert res.check().stdout.strip() == str(readme_project.root / ".venv")
        return
    run_readme(cmd, readme_project, trained)
