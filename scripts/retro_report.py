"""Retrieval on vs off: validation loss and bits per byte of RETRO and the plain decoder.

    python scripts/retro_report.py [hydra overrides, e.g. trainer.max_steps=100]

Composes `experiment=retro_vs_plain` (plus the overrides), then
1. trains the RETRO model and evaluates it on the validation split with its neighbours
   ("on") and with every neighbour replaced by padding ("off": CCA then adds nothing);
2. trains the plain decoder of the same size for the same steps (`model=transformer`, the
   same data and batches) and evaluates it the same way;
and prints a table, also written to `<out>/retro_report.json`. Runs go under
`outputs/retro_report/<time>/{retro,plain}`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from advarch.config.compose import compose_run
from advarch.train import run


@torch.no_grad()
def validation_loss(ckpt: Path, blank_neighbours: bool) -> dict[str, float]:
    """Token-weighted validation loss (nats) and bits per byte of a trained checkpoint."""
    from advarch.checkpoint import load_with_config
    from advarch.pipeline import build_all

    state, cfg = load_with_config(ckpt)
    datamodule, spec, module = build_all(cfg)
    module.load_state_dict(state["state_dict"])
    model = module.model.eval()
    total, count = 0.0, 0
    for batch in datamodule.val_dataloader():
        nb = batch.get("neighbours")
        if nb is not None and blank_neighbours:
            nb = torch.full_like(nb, spec.pad_id)
        logits = model(batch["input_ids"], neighbours=nb).logits
        labels = batch["labels"].masked_fill(batch["labels"] == spec.pad_id, -100)
        total += float(F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum"))
        count += int((labels != -100).sum())
    loss = total / count
    return {"loss": loss, "bpb": loss / math.log(2) / spec.extras["bytes_per_token"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both runs")
    args = parser.parse_args()
    root = Path("outputs/retro_report") / time.strftime("%Y-%m-%d_%H-%M-%S")
    base = ["experiment=retro_vs_plain", *args.overrides]
    rows: dict[str, dict[str, float]] = {}
    for name, extra in (("retro", []), ("plain", ["model=transformer"])):
        t0 = time.perf_counter()
        metrics = run(compose_run([*base, *extra], root / name))
        ckpt = root / name / "checkpoints" / "last.ckpt"
        label = "RETRO, neighbours" if name == "retro" else "plain decoder"
        rows[label] = validation_loss(ckpt, blank_neighbours=False)
        rows[label] |= {"seconds": time.perf_counter() - t0, "logged_val_bpb": metrics["val/bpb"]}
        if name == "retro":
            rows["RETRO, neighbours = padding"] = validation_loss(ckpt, blank_neighbours=True)
    print(f"\n{'model':32s} {'val loss':>9s} {'val bpb':>8s}")
    for name, r in rows.items():
        print(f"{name:32s} {r['loss']:9.4f} {r['bpb']:8.4f}")
    (root / "retro_report.json").write_text(json.dumps({"overrides": base, "rows": rows}, indent=1))
    print(f"written to {root / 'retro_report.json'}")


if __name__ == "__main__":
    main()
