"""summary.json as a type: written by the loop, read by `hpcdistill report` and reproduction/.

The mode-specific sections (codistill, async, distill) are made by the component that owns them
(teachers.py, strategies/) and kept as plain JSON objects here; the top level and the per-group
results, which every reader uses, are typed. Unknown keys are kept (a newer writer, an older reader).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from hpcdistill.metrics import write_json_atomic


class GroupResult(BaseModel):
    model_config = ConfigDict(extra="allow")

    group: int
    ranks: list[int]
    steps: int
    test_loss: float
    test_accuracy: float
    val_loss: float
    val_accuracy: float


class RunSummary(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    mode: str
    world_size: int
    num_groups: int
    steps: int
    wall_seconds: float
    samples_per_second: float
    dataset: str
    model: str
    run_dir: str
    groups: list[GroupResult]
    codistill: Optional[dict] = None
    async_: Optional[dict] = Field(None, alias="async")
    distill: Optional[dict] = None

    def write(self, path: Path) -> None:
        write_json_atomic(Path(path), self.model_dump(by_alias=True, exclude_none=True))

    @classmethod
    def load(cls, path: Path) -> "RunSummary":
        return cls.model_validate(json.loads(Path(path).read_text()))
