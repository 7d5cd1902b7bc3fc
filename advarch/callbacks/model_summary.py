"""A compact model summary: the module tree with parameter counts, nothing else.

Lightning's `RichModelSummary` adds a FLOPs column and a `Total FLOPs: 0` line (it never runs
a forward to count them) and train/eval mode counts; on a research console they are noise.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import lightning as L
from lightning.pytorch.callbacks import RichModelSummary
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from rich.console import Console
from rich.table import Table


@runtime_checkable
class CountsParameters(Protocol):
    """A module that knows how many of its parameters train: `params/total`, `params/trainable`
    (strategies: a finetune trains some rows of a stacked expert tensor, which
    `requires_grad` cannot say)."""

    def parameter_counts(self) -> dict[str, int]: ...


class ModelSummary(RichModelSummary):
    """Name, type and parameters of each module down to `max_depth`, then the totals (the
    module's own counts when it has them)."""

    _counts: dict[str, int] | None = None
    run_label: str | None = None  # above the table in a sweep's trial (`NamesItsRun`)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(pl_module, CountsParameters):
            self._counts = pl_module.parameter_counts()
        super().on_fit_start(trainer, pl_module)

    def summarize(
        self,
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        if self._counts is not None:
            total_parameters = self._counts["params/total"]
            trainable_parameters = self._counts["params/trainable"]
        columns = dict(summary_data)
        table = Table(header_style="bold")
        for name in ("Name", "Type", "Params"):
            table.add_column(name, justify="right" if name == "Params" else "left")
        for row in zip(columns["Name"], columns["Type"], columns["Params"], strict=True):
            table.add_row(*row)
        console = Console(soft_wrap=True)
        if self.run_label:  # (its own line: as typed, not read as markup, never wrapped)
            console.print(self.run_label, markup=False, highlight=False)
        console.print(table)
        frozen = total_parameters - trainable_parameters
        share = f" ({trainable_parameters / total_parameters:.1%})" if frozen else ""
        console.print(
            f"params: {get_human_readable_count(trainable_parameters).strip()} trainable{share}, "
            f"{get_human_readable_count(frozen).strip()} frozen, {model_size:.1f} MB",
            highlight=False,
        )
