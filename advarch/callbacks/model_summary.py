"""A compact model summary: the module tree with parameter counts, nothing else.

Lightning's `RichModelSummary` adds a FLOPs column and a `Total FLOPs: 0` line (it never runs
a forward to count them) and train/eval mode counts; on a research console they are noise.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import RichModelSummary
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from rich.console import Console
from rich.table import Table


class ModelSummary(RichModelSummary):
    """Name, type and parameters of each module down to `max_depth`, then the totals."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        columns = dict(summary_data)
        table = Table(header_style="bold")
        for name in ("Name", "Type", "Params"):
            table.add_column(name, justify="right" if name == "Params" else "left")
        for row in zip(columns["Name"], columns["Type"], columns["Params"], strict=True):
            table.add_row(*row)
        console = Console(soft_wrap=True)
        console.print(table)
        frozen = total_parameters - trainable_parameters
        console.print(
            f"params: {get_human_readable_count(trainable_parameters).strip()} trainable, "
            f"{get_human_readable_count(frozen).strip()} frozen, {model_size:.1f} MB",
            highlight=False,
        )
