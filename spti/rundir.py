"""The run directory: ``private/`` (never share), ``state/`` (checkpoints), ``release/`` (DP outputs).

``private/`` holds captions of private images and private embeddings. They are NOT differentially
private; the folder is created owner-only (0700) with a README that says so, and nothing in it is
ever copied to ``release/``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from private_evolution.files import atomic_write_json, atomic_write_text
from spti.config import RunConfig, config_from_saved
from spti.errors import SptiError

PRIVATE_README = """\
THIS FOLDER HOLDS PRIVATE DATA. IT IS NOT DIFFERENTIALLY PRIVATE. NEVER SHARE IT.

It contains captions written from your private images, their embeddings and feature vectors, and
a manifest of your private files. Only ../release/ holds outputs covered by the DP guarantee.
Delete this folder when the run is finished and you no longer need to resume or evaluate it.
"""

STAGES = ("caption", "evolve", "render")


class RunDirectory:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()

    # -- layout ----------------------------------------------------------------------------
    @property
    def private(self) -> Path:
        return self.root / "private"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def release(self) -> Path:
        return self.root / "release"

    @property
    def config_path(self) -> Path:
        return self.root / "config.toml"

    @property
    def stages_path(self) -> Path:
        return self.state / "stages.json"

    # -- life cycle ------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.config_path.exists()

    def create(self, config: RunConfig) -> RunConfig:
        """Create a new run directory for ``config``; refuses an existing run or a foreign folder."""
        if self.exists():
            done = [s for s in STAGES if self.stage_done(s)]
            state = f"finished stages: {', '.join(done)}" if done else "an unfinished run"
            raise SptiError(
                f"{self.root} already holds a run ({state}); pass --resume to continue it, or choose a new --output"
            )
        if self.root.exists() and any(self.root.iterdir()):
            raise SptiError(f"{self.root} exists and is not an spti run directory; choose a new --output")
        for d in (self.root, self.state, self.release):
            d.mkdir(parents=True, exist_ok=True)
        self.ensure_private()
        atomic_write_text(self.config_path, config.to_toml())
        atomic_write_json(self.stages_path, {})
        return config

    # Settings that change how a run executes, not what it computes or releases.
    RESUMABLE_CHANGES = frozenset(
        {
            "device",
            "dtype",
            "batch_size",
            "concurrency",
            "requests_per_minute",
            "tokens_per_minute",
            "base_url",
        }
    )

    # Settings of the render stage: post-processing of the release, free to change afterwards.
    RENDER_CHANGES = frozenset(
        {"image_model", "render_size", "upscaler", "upscale", "upscaler_model", "steps", "guidance"}
    )

    def reopen(
        self, overrides: dict[str, Any] | None = None, *, also_allowed: frozenset[str] = frozenset()
    ) -> RunConfig:
        """The saved config of an existing run, with execution-only ``overrides`` applied.

        A flag that would change what the run computes (ε, models, population…) is refused: the
        ledger and checkpoints belong to the settings the run started with. ``also_allowed`` names
        further settings a caller may change (e.g. :attr:`RENDER_CHANGES` for ``spti render``).
        """
        saved = self.load_config()
        values = saved.to_dict()
        for key, value in (overrides or {}).items():
            if value is None or key == "preset":
                continue
            if key in self.RESUMABLE_CHANGES or key in also_allowed:
                values[key] = value
            elif values.get(key) != value and not (key == "epsilon" and values[key] == "inf" and value == float("inf")):
                raise SptiError(
                    f"cannot change {key.replace('_', '-')} when resuming {self.root} "
                    f"(run has {values.get(key)!r}, flag gives {value!r}); drop the flag or start a new run"
                )
        values["epsilon"] = float(values["epsilon"])
        return RunConfig(**values).validate()

    def ensure_private(self) -> Path:
        self.private.mkdir(parents=True, exist_ok=True)
        os.chmod(self.private, 0o700)
        readme = self.private / "README.txt"
        if not readme.exists():
            atomic_write_text(readme, PRIVATE_README)
        return self.private

    def load_config(self) -> RunConfig:
        if not self.exists():
            raise SptiError(f"{self.root} is not an spti run directory (no config.toml)")
        return config_from_saved(self.config_path)

    # -- stage bookkeeping -----------------------------------------------------------------
    def stages(self) -> dict[str, Any]:
        if not self.stages_path.exists():
            return {}
        return json.loads(self.stages_path.read_text())

    def stage_done(self, stage: str) -> bool:
        return bool(self.stages().get(stage, {}).get("done"))

    def mark(self, stage: str, **info: Any) -> None:
        stages = self.stages()
        stages[stage] = {"done": True, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info}
        atomic_write_json(self.stages_path, stages)
