"""Does retrieval help? RETRO with its neighbours vs padding neighbours vs the plain decoder.

    python scripts/retro_report.py [--retrofit] [--split val|test] [hydra overrides]
    python scripts/retro_report.py experiment=retro_lookup           # the lookup task
    python scripts/retro_report.py experiment=retro_vs_plain --retrofit  # stdlib text
    python scripts/retro_report.py --retrofit --retrofit-steps 1200 --plain-ckpt <plain>

Composes the overrides (default `experiment=retro_vs_plain`), then
1. trains the plain decoder (`model=transformer`, the same data, batches and steps);
2. trains RETRO from scratch, or with `--retrofit` starts it from the plain decoder's
   checkpoint (`strategy=retrofit`: the decoder frozen, the neighbour encoder and CCA trained;
   `--unfreeze` trains the decoder too); with `--retrofit`, also trains the plain
   decoder on from its checkpoint for as many steps (the same strategy and schedule, every
   weight trainable): the plain decoder of equal total steps, the control RETRO must beat;
3. evaluates RETRO on the held-out split with its retrieved neighbours, with every neighbour
   replaced by padding (the same weights, nothing retrieved), and with the neighbours of
   another sequence of the batch (a random-neighbour control), and the plain decoder(s).

Reports loss (nats per scored token), accuracy of scored tokens (the lookup task scores only
its answers) and, for text, bits per byte — plus RETRO's analysis (Borgeaud et al. 2022,
§4.4): the neighbour quality of every held-out chunk, i.e. the longest run of tokens its first
neighbour's continuation shares with the true continuation (the tokens that chunk's neighbours
help predict), and the bits-per-byte gain of neighbours over padding split by it. Prints a table
and writes `<out>/retro_report.json` and `<out>/by_quality.png` (bits/byte per quality bucket,
one bar per model); runs go under `outputs/retro_report/<time>_<id>/`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from advarch.benchmarks.timing import tiny_overrides, too_small
from advarch.checkpoint import load_with_config
from advarch.config.choices import check_command_line
from advarch.config.combinations import with_strategy_defaults
from advarch.config.compose import compose_run
from advarch.config.runs import config_mismatch
from advarch.errors import ConfigError, exit_on_config_error
from advarch.output_folders import stamped_folder
from advarch.reports.figures import plot_retrieval_by_quality
from advarch.train import run

OVERLAP_BINS = (0, 8, 32)  # quality buckets: shared run of [0, 8), [8, 32), ≥ 32 tokens
LN2 = math.log(2)  # nats per bit
MODES = {"neighbours": "RETRO, neighbours", "padding": "RETRO, padding neighbours",
         "shuffled": "RETRO, another sequence's neighbours"}  # fmt: skip
PLAIN_EQUAL = "plain decoder, equal steps"  # trained on for the retrofit's steps


def longest_shared_run(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Longest common substring length of rows a (N, n) and b (N, n): (N,) int.

    Dynamic programming over a's positions (run[j] = length of the common run ending at
    a[i], b[j]), vectorised over rows and b's positions.
    """
    run = np.zeros(b.shape, dtype=np.int32)
    best = np.zeros(len(a), dtype=np.int32)
    for i in range(a.shape[1]):
        match = a[:, i : i + 1] == b  # (N, n)
        run = np.where(match, np.pad(run[:, :-1], ((0, 0), (1, 0))) + 1, 0)
        best = np.maximum(best, run.max(1))
    return best


def chunk_quality(batch: dict[str, torch.Tensor], m: int, pad_id: int) -> np.ndarray:
    """(B, L−1) longest run shared by chunk u's first neighbour's continuation and the tokens
    its neighbours help predict (labels at positions [u·m + m − 1, (u+1)·m + m − 1))."""
    labels, nb = batch["labels"], batch["neighbours"]
    b, t = labels.shape
    num = t // m - 1  # the last chunk's continuation runs past the sequence
    true = labels[:, m - 1 : m - 1 + num * m].reshape(b * num, m).numpy()
    found = nb[:, :num, 0, m:].reshape(b * num, m).numpy()
    found = np.where(found == pad_id, -1, found)  # padding shares nothing
    return longest_shared_run(true, found).reshape(b, num)


def runs_batch_count(cfg: Any, split: str, batches: int) -> int:
    """How many of a split's `batches` the run scored: its `trainer.limit_<split>_batches`
    (a count, or a fraction as Lightning rounds it down)."""
    limit = OmegaConf.select(cfg, f"trainer.limit_{split}_batches")
    if limit is None:
        return batches
    return min(batches, limit if isinstance(limit, int) else int(batches * limit))


@torch.no_grad()
def evaluate(ckpt: Path, split: str, modes: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Per mode: token-weighted loss, accuracy, bits per byte and, for text, each chunk's bits
    and bytes (`chunk_bits`, `chunk_bytes`: a quality bucket pools them), with the chunks'
    neighbour quality; over the batches the run scored (`runs_batch_count`)."""
    from advarch.pipeline import build_all

    state, cfg = load_with_config(ckpt)
    cfg.strategy.pop("pretrained", None)  # the weights come from the checkpoint itself
    datamodule, spec, module = build_all(cfg)
    module.load_state_dict(state["state_dict"])
    module.on_load_checkpoint(state)  # the model's state beside its weights (closed experts)
    model = module.model.eval()
    datamodule.setup("validate")
    loader = datamodule.val_dataloader() if split == "val" else datamodule.test_dataloader()
    bpt, m = spec.bytes_per_token(split), spec.retrieval_chunk
    # bits per byte over the scored tokens' own UTF-8 bytes (a checkpoint without their
    # table: the split's bytes per token), as training's metrics count them
    table = None if spec.token_bytes is None else torch.tensor(spec.token_bytes).double()
    sums = {mode: {"loss": 0.0, "correct": 0, "count": 0} for mode in modes}
    per_chunk: dict[str, list[torch.Tensor]] = {mode: [] for mode in modes}
    chunk_bytes: list[torch.Tensor] = []
    scored_bytes = 0.0
    quality: list[np.ndarray] = []
    batches = list(itertools.islice(loader, runs_batch_count(cfg, split, len(loader))))
    others = _neighbours_of_others(batches) if "shuffled" in modes else None
    for batch in batches:
        labels = batch["labels"].masked_fill(batch["labels"] == spec.pad_id, -100)
        nb = batch.get("neighbours")
        b, t = labels.shape
        num = t // m - 1  # (the first chunk has no neighbours yet)
        if table is not None:
            target_bytes = table[labels.clamp_min(0)] * (labels != -100)  # (B, T)
            scored_bytes += float(target_bytes.sum())
        if nb is not None and bpt:
            quality.append(chunk_quality(batch, m, spec.pad_id))
            if table is not None:
                chunk_bytes.append(_chunks(target_bytes, m, num))
        for mode in modes:
            given = nb
            if mode == "padding":
                given = torch.full_like(nb, spec.pad_id)
            elif mode == "shuffled":
                given = next(others)
            logits = model(batch["input_ids"], neighbours=given).logits
            nll = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")  # (B, T)
            scored = labels != -100
            sums[mode]["loss"] += float(nll[scored].sum())
            sums[mode]["correct"] += int((logits.argmax(-1) == labels)[scored].sum())
            sums[mode]["count"] += int(scored.sum())
            if nb is not None and bpt:
                per_chunk[mode].append(_chunks(nll.double(), m, num))
    out = {}
    for mode, s in sums.items():
        loss = s["loss"] / max(s["count"], 1)
        row = {"loss": loss, "acc": s["correct"] / max(s["count"], 1)}
        if bpt:
            row["bpb"] = (s["loss"] / scored_bytes if table is not None else loss / bpt) / LN2
        if quality:
            nats = torch.cat(per_chunk[mode]).flatten()
            each = torch.cat(chunk_bytes).flatten() if table is not None else bpt * m
            row["chunk_bits"] = (nats / LN2).numpy()  # bits and bytes: a bucket's bpb pools them
            row["chunk_bytes"] = (each * torch.ones_like(nats)).numpy()
        out[mode] = row
    if quality:
        out["quality"] = np.concatenate([q.ravel() for q in quality])
    return out


def _chunks(values: torch.Tensor, m: int, num: int) -> torch.Tensor:
    """(B, num) sums over each retrieval chunk of `m` targets after the first chunk: the
    targets chunk c's neighbours inform (its last token's through the next chunk's)."""
    return values[:, m - 1 : m - 1 + num * m].reshape(values.shape[0], num, m).sum(-1)


def _neighbours_of_others(batches: list[dict[str, torch.Tensor]]) -> Iterator[torch.Tensor]:
    """Per batch, its sequences' neighbours replaced by those of the split's previous sequence
    (the last one's for the first): the random-neighbour control, even for batches of one."""
    every = torch.cat([batch["neighbours"] for batch in batches]).roll(1, 0)
    if len(every) < 2:
        raise ConfigError(
            "the held-out split has 1 sequence: the other-sequence neighbour "
            "control needs 2 (a longer split, or a shorter data.seq_len)"
        )
    return iter(every.split([len(batch["neighbours"]) for batch in batches]))


def split_by_quality(rows: dict[str, dict], quality: np.ndarray) -> list[dict[str, float]]:
    """Per quality bucket: share of chunks, bpb of every row, gain of neighbours over padding."""
    edges = [*OVERLAP_BINS, 10**9]
    table = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (quality >= lo) & (quality < hi)
        entry: dict[str, float] = {"min_shared": lo, "fraction": float(sel.mean())}
        for name, row in rows.items():
            if "chunk_bits" in row and sel.any():  # Σ bits / Σ bytes of the bucket's chunks
                entry[name] = float(row["chunk_bits"][sel].sum() / row["chunk_bytes"][sel].sum())
        if sel.any():
            entry["gain_vs_padding"] = entry[MODES["padding"]] - entry[MODES["neighbours"]]
            if PLAIN_EQUAL in entry:
                entry["gain_vs_plain"] = entry[PLAIN_EQUAL] - entry[MODES["neighbours"]]
        table.append(entry)
    return table


def quality_table(buckets: list[dict[str, float]]) -> str:
    """The bpb of every row and the gains per quality bucket: a line per row, a column per
    bucket, on the grid of the table above. (With a column per row it ran 136 characters wide,
    190 with --retrofit, and a terminal wrapped its header apart from its values.)"""
    ends = [*OVERLAP_BINS[1:], None]
    heads = [f"{b['min_shared']}-{end - 1}" if end else f"{b['min_shared']}+"
             for b, end in zip(buckets, ends, strict=True)]  # fmt: skip
    every = dict.fromkeys(k for b in buckets for k in b)  # (an empty bucket has no bpbs)
    names = [k for k in every if k not in ("min_shared", "fraction")]
    lines = [f"{'tokens shared':40s}" + "".join(f" {h:>8s}" for h in heads)]
    lines.append(f"{'chunks':40s}" + "".join(f" {100 * b['fraction']:7.1f}%" for b in buckets))
    lines += [f"{n:40s}" + "".join(f" {b.get(n, math.nan):8.4f}" for b in buckets) for n in names]
    return "\n".join(lines)


def check_options(
    args: argparse.Namespace, overrides: list[str], plain: Sequence[str] = ()
) -> None:
    """Exit with one `error:` line naming the first bad option, or override of the RETRO run,
    or a `--plain-ckpt` that is not the plain decoder of the `plain` overrides, before any
    training. (Each failed only after the plain decoder trained, naming keys the user never
    typed, `ckpt_path` or `trainer.max_steps`, or advising `+model.dimm=3`; `--unfreeze` alone
    was ignored; another model's checkpoint was compared as the plain decoder, on its own data,
    or ended in an IndexError after training.)"""
    if args.unfreeze and not args.retrofit:
        sys.exit("error: --unfreeze trains the decoder of a retrofit: add --retrofit")
    if args.retrofit_steps is not None and not args.retrofit:  # (it was ignored)
        sys.exit("error: --retrofit-steps sets the steps of a retrofit: add --retrofit, or set "
                 "trainer.max_steps for the runs without one")  # fmt: skip
    if args.retrofit_steps is not None and args.retrofit_steps < 1:
        sys.exit(f"error: --retrofit-steps {args.retrofit_steps} must be at least 1")
    plain_ckpt = None
    if args.plain_ckpt is not None:  # a file of train.py's, with its config, as evaluate reads
        plain_ckpt, _ = load_with_config(args.plain_ckpt, "--plain-ckpt")
    check_command_line(with_strategy_defaults(overrides), "train")  # as train.py checks its own
    retro = compose_run(with_strategy_defaults(overrides), Path("outputs/retro_report/retro"))
    if OmegaConf.select(retro, "model.retro") is None:  # (its rows were a plain model's)
        model = next((o for o in reversed(overrides) if o.startswith("model=")), "the model")
        sys.exit(
            f"error: {model} has no RETRO adapter (model.retro is null): this report "
            "compares RETRO (model=retro or model=retro_moe) with a plain decoder"
        )
    if plain_ckpt is not None and plain:  # (its sizes and data are what is compared)
        expected = compose_run(list(plain), Path("outputs/retro_report/plain"))
        other = config_mismatch(plain_ckpt, expected, ("model", "data"))
        if other:
            sys.exit(
                f"error: --plain-ckpt {args.plain_ckpt} is not the plain decoder these runs "
                f"compare RETRO with (model=transformer, their sizes and data): {other}"
            )


def compare() -> None:
    """Read the command line, train the models it asks for and write their comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    parser.add_argument(
        "--retrofit",
        action="store_true",
        help="start RETRO from the plain decoder (strategy=retrofit)",
    )
    parser.add_argument("--split", choices=("val", "test"), default="val")
    parser.add_argument(
        "--plain-ckpt",
        type=Path,
        default=None,
        help="reuse this trained plain decoder (of the same overrides: its model and data must "
        "be those of the plain run) instead of training one",
    )
    parser.add_argument(
        "--unfreeze",
        action="store_true",
        help="with --retrofit: train the decoder too (strategy.trainable=[*])",
    )
    parser.add_argument(
        "--retrofit-steps",
        type=int,
        default=None,
        help="with --retrofit: steps of the retrofit and of the equal-steps plain control "
        "(default: the overrides' trainer.max_steps, as for the plain decoder)",
    )
    args = parser.parse_intermixed_args()  # options may follow the overrides
    root = stamped_folder(Path("outputs/retro_report"))  # (two reports never share one)
    base = list(args.overrides)
    if not any(o.startswith("experiment=") for o in base):
        base.insert(0, "experiment=retro_vs_plain")
    runs: dict[str, dict] = {}
    plain_ckpt = (args.plain_ckpt or root / "plain" / "checkpoints" / "last.ckpt").resolve()
    plain_model = ["model=transformer", "model.retro=null"]
    plain_base = [o for o in base if not o.startswith("model.retro.")]  # RETRO's own options
    todo: list[tuple[str, list[str]]] = [("plain", plain_model), ("retro", [])]
    if args.retrofit:
        on = ["strategy=retrofit", f"strategy.pretrained={plain_ckpt}"]
        if args.retrofit_steps is not None:
            on.append(f"trainer.max_steps={args.retrofit_steps}")
        unfrozen = ["strategy.trainable=[*]"]
        todo = [
            todo[0],
            ("retro", on + unfrozen * args.unfreeze),
            ("plain_more", [*plain_model, *on, *unfrozen]),
        ]
    check_options(args, [*base, *dict(todo)["retro"]], [*plain_base, *plain_model])
    for name, extra in todo:
        if name == "plain" and args.plain_ckpt is not None:
            continue
        t0, cpu0 = time.perf_counter(), time.process_time()
        overrides = [*(base if name == "retro" else plain_base), *extra]
        metrics = run(compose_run(overrides, root / name))
        runs[name] = {
            "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - cpu0,
            "metrics": {k: float(v) for k, v in metrics.items()},
        }
    ckpt = root / "retro" / "checkpoints" / "last.ckpt"
    found = evaluate(ckpt, args.split, tuple(MODES))
    rows = {MODES[mode]: found[mode] for mode in MODES}
    rows["plain decoder"] = evaluate(plain_ckpt, args.split, ("neighbours",))["neighbours"]
    if args.retrofit:
        more = root / "plain_more" / "checkpoints" / "last.ckpt"
        rows[PLAIN_EQUAL] = evaluate(more, args.split, ("neighbours",))["neighbours"]
    report: dict = {"overrides": base, "retrofit": args.retrofit, "split": args.split,
                    "unfreeze": args.unfreeze, "retrofit_steps": args.retrofit_steps}  # fmt: skip
    report["runs"] = runs
    has_bpb = "bpb" in rows["plain decoder"]
    print(f"\n{'model (' + args.split + ')':40s} {'loss':>8s} {'acc':>8s}"
          + (f" {'bpb':>8s}" if has_bpb else ""))  # fmt: skip
    for name, row in rows.items():
        print(f"{name:40s} {row['loss']:8.4f} {row['acc']:8.4f}"
              + (f" {row['bpb']:8.4f}" if has_bpb else ""))  # fmt: skip
    tiny = tiny_overrides(base)
    if tiny:  # (as bench.py and generate.py say under their tables at these sizes)
        print(f"note: {' '.join(tiny)}: {too_small('losses')}")
    if "quality" in found:
        q = found["quality"]
        report["split_by_quality"] = split_by_quality(rows, q)
        report["quality"] = {"chunks": int(len(q)), "mean_shared": float(q.mean()),
                             "fraction_shared_ge_32": float((q >= 32).mean())}  # fmt: skip
        print(f"\nneighbour quality: {len(q)} chunks, {100 * (q >= 32).mean():.1f}% share ≥ 32 "
              "tokens with the true continuation; bpb by quality:")  # fmt: skip
        print(quality_table(report["split_by_quality"]))
        figure = plot_retrieval_by_quality(report["split_by_quality"], root / "by_quality.png")
        if figure is not None:
            print(f"figure: {figure}")
    kept = {n: {k: v for k, v in r.items() if not k.startswith("chunk_")} for n, r in rows.items()}
    report["rows"] = kept
    (root / "retro_report.json").write_text(json.dumps(report, indent=1))
    print(f"written to {root / 'retro_report.json'}")


def main() -> None:
    """The command line: `compare`, a bad config key or value as one `error:` line."""
    exit_on_config_error(compare)
