"""The run directory: ``private/`` (never share), ``state/`` (checkpoints), ``release/`` (DP outputs).

``private/`` holds captions of private images and private embeddings. They are NOT differentially
private; the folder and everything in it are owner-only (folders 0700, files 0600) with a README
that says so, and nothing in it is ever copied to ``release/``. ``state/`` is owner-only too (0700):
it is not for sharing. ``release/`` is made shareable as it is by :meth:`RunDirectory.share_release`
(folders 0755, files 0644).

One process at a time: every command that writes into a run directory holds
:meth:`RunDirectory.lock` (an exclusive ``flock`` on ``RUN_DIR/.lock``) for its whole duration.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from private_evolution.files import SHARED_FILE_MODE, atomic_write_json, atomic_write_text
from spti.config import FIELD_ROLES, RunConfig, config_from_saved, model_spec_with
from spti.errors import SptiError

PRIVATE_README = """\
THIS FOLDER HOLDS PRIVATE DATA. IT IS NOT DIFFERENTIALLY PRIVATE. NEVER SHARE IT.

It contains captions written from your private images, their embeddings and feature vectors, and
a manifest of your private files. Only ../release/ holds outputs covered by the DP guarantee.
Delete this folder when the run is finished and you no longer need to resume or evaluate it.
"""

STAGES = ("caption", "evolve", "render")

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
SHARED_DIR_MODE = 0o755

LOCK_NAME = ".lock"

# Roots locked by this process (root -> [fd, depth]): a command that takes the lock again in the
# same process (a stage function called from a command) nests instead of locking itself out.
_HELD: dict[Path, list[int]] = {}


def apply_modes(root: Path, *, dir_mode: int, file_mode: int) -> None:
    """Set ``dir_mode`` on ``root`` and every folder below it, ``file_mode`` on every file (no links)."""
    if not root.exists():
        return
    os.chmod(root, dir_mode)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, dir_mode)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, file_mode)


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

    @property
    def lock_path(self) -> Path:
        return self.root / LOCK_NAME

    # -- one process at a time -------------------------------------------------------------
    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run directory exclusively (``flock`` on ``RUN_DIR/.lock``, which names the holder's pid).

        A second process gets a one-line :class:`SptiError` at once instead of waiting. The kernel
        drops the lock when its holder dies, so a crashed run never leaves a stale lock behind. The
        folder must exist (a new run creates it first, then creates the run under the lock).
        """
        held = _HELD.get(self.root)
        if held is not None:  # already ours (same process): nest
            held[1] += 1
            try:
                yield
            finally:
                held[1] -= 1
            return
        if not self.root.is_dir():
            raise SptiError(f"{self.root} is not an spti run directory")
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = ""
            with suppress(OSError):
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise SptiError(f"cannot lock {self.lock_path}: {exc.strerror}") from None
            who = f"pid {holder}" if holder.isdigit() else "pid unknown"
            raise SptiError(f"{self.root} is in use by another spti process ({who}); wait for it to finish") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
            _HELD[self.root] = [fd, 1]
            yield
        finally:
            _HELD.pop(self.root, None)
            os.close(fd)  # closing the descriptor releases the flock

    def is_empty(self) -> bool:
        """No files at all, or only the lock file (a new run directory made by its lock holder)."""
        return not self.root.exists() or all(p.name == LOCK_NAME for p in self.root.iterdir())

    # -- life cycle ------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.config_path.exists()

    def check_creatable(self) -> None:
        """Refuse (one line) to make a new run in an existing run or in a folder that holds other files."""
        if self.exists():
            done = [s for s in STAGES if self.stage_done(s)]
            state = f"finished stages: {', '.join(done)}" if done else "an unfinished run"
            raise SptiError(
                f"{self.root} already holds a run ({state}); pass --resume to continue it, or choose a new --output"
            )
        if self.root.exists() and not self.root.is_dir():
            raise SptiError(f"{self.root} is a file; choose a new --output folder")
        if not self.is_empty():
            raise SptiError(f"{self.root} exists and is not an spti run directory; choose a new --output")
        self._check_writable()

    def _check_writable(self) -> None:
        """The folder to create the run in (the output itself, or its nearest existing parent) takes
        new files: a read-only folder or file system, or an immutable folder, is refused in one line."""
        folder = self.root
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise SptiError(f"{folder} is a file, so {self.root} cannot be made; choose another --output")
        fix = "choose an --output folder you can write to"
        if not os.access(folder, os.W_OK | os.X_OK):
            raise SptiError(f"cannot write to {folder} (permission denied); {fix}")
        try:  # root passes os.access everywhere; a read-only mount or an immutable folder shows here
            os.rmdir(tempfile.mkdtemp(prefix=".spti-write-check-", dir=folder))
        except OSError as exc:
            raise SptiError(f"cannot write to {folder} ({exc.strerror or exc}); {fix}") from None

    def create(self, config: RunConfig) -> RunConfig:
        """Create a new run directory for ``config``; refuses an existing run or a foreign folder."""
        self.check_creatable()
        for d in (self.root, self.state, self.release):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state, PRIVATE_DIR_MODE)
        os.chmod(self.release, SHARED_DIR_MODE)
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
            if key in FIELD_ROLES:  # a model flag names its role whole: compare the resolved specs
                wanted = model_spec_with(saved, key, value)
                if wanted == saved.model_spec(FIELD_ROLES[key]):
                    continue
                if key not in also_allowed:
                    raise SptiError(
                        f"cannot change {key.replace('_', '-')} when resuming {self.root} "
                        f"(run has {str(saved.model_spec(FIELD_ROLES[key]))!r}, flag gives {str(wanted)!r}); "
                        "drop the flag or start a new run"
                    )
                values[key] = value
                values["models"] = {r: v for r, v in values["models"].items() if r != FIELD_ROLES[key]}
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
        os.chmod(self.private, PRIVATE_DIR_MODE)
        readme = self.private / "README.txt"
        if not readme.exists():
            atomic_write_text(readme, PRIVATE_README, mode=PRIVATE_FILE_MODE)
        return self.private

    def seal_private(self) -> None:
        """Owner-only modes on the whole private tree (folders 0700, files 0600)."""
        apply_modes(self.private, dir_mode=PRIVATE_DIR_MODE, file_mode=PRIVATE_FILE_MODE)

    def share_release(self) -> None:
        """Make ``release/`` shareable as it is: folders 0755, files 0644 (it holds DP outputs only)."""
        apply_modes(self.release, dir_mode=SHARED_DIR_MODE, file_mode=SHARED_FILE_MODE)

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
        """Record ``stage`` as done, with public facts only (``state/`` is outside ``private/``).

        The facts recorded for the stage by :meth:`record_private_endpoints` and
        :meth:`record_unit_source` are kept; anything else a previous ``mark`` wrote is replaced.
        """
        stages = self.stages()
        kept = {k: v for k, v in stages.get(stage, {}).items() if k in self._RECORDED}
        stages[stage] = {**kept, "done": True, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info}
        atomic_write_json(self.stages_path, stages)

    # -- facts for privacy.json ------------------------------------------------------------
    _RECORDED = frozenset({"private_data_sent_to", "unit_source"})

    def record_private_endpoints(self, stage: str, endpoints: dict[str, str]) -> None:
        """Add ``endpoints`` ({role: endpoint}) to those that received private data in ``stage``.

        Kept in ``state/stages.json``, so they add up over resumes and processes; a role that sent
        private data to two endpoints (say, a resume with another ``--base-url``) lists both.
        """
        if not endpoints:
            return
        stages = self.stages()
        entry = stages.setdefault(stage, {})
        sent: dict[str, str] = entry.setdefault("private_data_sent_to", {})
        for role, endpoint in endpoints.items():
            known = [e for e in sent.get(role, "").split(", ") if e]
            if endpoint not in known:
                known.append(endpoint)
            sent[role] = ", ".join(known)
        atomic_write_json(self.stages_path, stages)

    def private_data_endpoints(self) -> dict[str, dict[str, str]]:
        """Stage -> {role: endpoint} for every stage ever run in this directory that sent private data."""
        return {
            stage: dict(entry["private_data_sent_to"])
            for stage, entry in self.stages().items()
            if isinstance(entry, dict) and entry.get("private_data_sent_to")
        }

    CAPTIONS_FILE_UNITS = "captions file 'unit' field"

    def record_unit_source(self, source: str) -> None:
        """Where the privacy units came from when not from the run's ``privacy_unit`` (imported captions)."""
        stages = self.stages()
        stages.setdefault("caption", {})["unit_source"] = source
        atomic_write_json(self.stages_path, stages)

    def unit_source(self) -> str:
        """``"image"``, ``"folder"`` or ``"captions file 'unit' field"``: what one privacy unit is here."""
        recorded = self.stages().get("caption", {}).get("unit_source")
        if recorded:
            return str(recorded)
        return self.load_config().privacy_unit
