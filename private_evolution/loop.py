"""The Private Evolution loop: rounds of noisy nearest-neighbour votes, selection and variation.

Before round 0 the number of privacy units is released once as a DP count (it checks δ and can
size the population). Round t (0-based) votes on population P_t: the ledger is charged, the noisy
histogram is drawn and written to disk, and only then does selection read it. Rounds before the
last keep the n_t best (optionally) and add ``variation_folds`` variations of each; the last round
selects the ``num_samples`` outputs. Every round leaves a checkpoint of JSON/JSONL and .npy/.npz
files (no pickle); ``resume=True`` continues after the last complete round, re-reading released
histograms.

The release rules: every noise draw has its own ledger entry, ever. A resumed run re-reads what
was released; a release lost after something was derived from it is never drawn again (the run
refuses); a release charged but never written (a crash in between) is drawn again only as a new,
charged release. A ledger is never created beside released state, and one process at a time holds
a state directory. Nothing derived from the private data except DP releases is written to the
state directory: the exact number of units and the data's fingerprint go to ``private_dir``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from private_evolution import accounting
from private_evolution.accounting import NoisePlan, PrivacyLedger
from private_evolution.count import NoisyCount, dp_count
from private_evolution.files import (
    atomic_save_npy,
    atomic_save_npz,
    atomic_write_json,
    atomic_write_jsonl,
    load_npz,
    read_jsonl,
)
from private_evolution.histogram import (
    Backend,
    Metric,
    NoiseSource,
    NoisyHistogram,
    dp_histogram,
    privatize,
    weight_histogram,
)
from private_evolution.population import Population, Selection, derive_seed, next_generation, select
from private_evolution.protocols import Embedder, Generator

S = TypeVar("S")

__all__ = ["PEConfig", "PEResult", "PrivacyPlanError", "PrivateEvolution", "RoundResult", "RunStateError"]


class RunStateError(RuntimeError):
    """The state directory does not fit the requested run (exists without resume, differs, is
    inconsistent, or is held by another process)."""


class PrivacyPlanError(ValueError):
    """The privacy parameters do not fit the data (judged from the DP count, never the exact N)."""


@dataclass(frozen=True)
class PEConfig:
    """Settings of one PE run. Sequences give per-round schedules.

    ``population_size``: samples kept after each round before the last (an int or T−1 values);
    the last round selects ``num_samples``. ``strength``: variation strength used after each round
    (an int/float or T−1 values). ``initial_population``: size of the random-API population voted
    on in round 0 (default n_0 · (1 + folds), the steady-state size).

    Privacy: ``delta`` is public — the user's, else 1/(B·ln B) for a public upper bound
    ``units_bound`` on the number of units, else :data:`~private_evolution.accounting.DEFAULT_DELTA`.
    ``count_share`` is the share of μ² spent on the DP count of units (0: no count);
    ``seeding_share`` the share of one DP histogram over public keys before round 0 (0: none).

    ``population_size="auto"`` sizes the population from the DP count: the number kept per round
    is chosen so that a candidate expects about ``target_signal`` · σ votes a round (N̂ / M = S·σ),
    within ``auto_population_bounds`` (and never below what ``num_samples`` needs).
    """

    iterations: int
    num_samples: int
    epsilon: float
    delta: float | None = None
    population_size: int | tuple[int, ...] | None = None
    variation_folds: int = 6
    initial_population: int | None = None
    strength: float | tuple[float, ...] = 1.0
    selection: Selection = "rank"
    keep_selected: bool = True
    k: int = 1
    metric: Metric = "l2"
    threshold: float = 0.0
    lookahead: int = 0
    seed: int = 0
    noise_multiplier: float | None = None
    units_bound: int | None = None
    count_share: float = accounting.DEFAULT_COUNT_SHARE
    target_signal: float = 2.0
    auto_population_bounds: tuple[int, int] = (8, 2000)
    seeding_share: float = 0.0
    distinct_release: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.auto_population_bounds, list):
            object.__setattr__(self, "auto_population_bounds", tuple(self.auto_population_bounds))
        for name in ("population_size", "strength"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        self.validate()

    # -- schedules -------------------------------------------------------------------------
    @property
    def auto_population(self) -> bool:
        return self.population_size == "auto"

    def kept(self, round_index: int) -> int:
        """Samples selected after ``round_index`` (``num_samples`` after the last round)."""
        if round_index == self.iterations - 1:
            return self.num_samples
        if self.auto_population:
            raise ValueError("population_size='auto' is sized from the DP count: call sized_for(count) first")
        ps = self.population_size if self.population_size is not None else self.num_samples
        return int(ps[round_index]) if isinstance(ps, tuple) else int(ps)

    def strength_at(self, round_index: int) -> float:
        s = self.strength
        return float(s[min(round_index, len(s) - 1)]) if isinstance(s, tuple) else float(s)

    def population_at(self, round_index: int) -> int:
        """Number of candidates voted on in ``round_index``."""
        if round_index == 0:
            if self.initial_population is not None:
                return self.initial_population
            return self.kept(0) * (self.variation_folds + int(self.keep_selected)) or self.kept(0)
        return self.kept(round_index - 1) * (self.variation_folds + int(self.keep_selected))

    def validate(self) -> None:
        def bad(msg: str) -> ValueError:
            return ValueError(f"invalid PE settings: {msg}")

        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            raise bad(f"iterations must be an integer >= 1, got {self.iterations!r}")
        if self.num_samples < 1:
            raise bad(f"num_samples must be >= 1, got {self.num_samples}")
        if self.variation_folds < 0 or (self.iterations > 1 and self.variation_folds + self.keep_selected < 1):
            raise bad("variation_folds must be >= 1 when keep_selected is off")
        if self.auto_population:
            lo, hi = self.auto_population_bounds
            if not (1 <= lo <= hi):
                raise bad(f"auto_population_bounds must be 1 <= low <= high, got {self.auto_population_bounds}")
            if not self.target_signal > 0:
                raise bad(f"target_signal must be > 0, got {self.target_signal}")
            if self.count_share <= 0:
                raise bad("population_size='auto' needs the DP count of units: count_share must be > 0")
        elif self.population_size is not None and isinstance(self.population_size, str):
            raise bad(f"population_size must be an integer, a schedule or 'auto', got {self.population_size!r}")
        if not 0 <= self.seeding_share < 1 or self.count_share + self.seeding_share >= 1:
            raise bad("seeding_share must be in [0, 1) and leave budget for the rounds with count_share")
        if self.auto_population:
            self._validate_common(bad)
            return
        for name, n_needed in (("population_size", self.iterations - 1), ("strength", self.iterations - 1)):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) < n_needed:
                raise bad(f"{name} schedule has {len(value)} values but {n_needed} rounds need one")
        for t in range(self.iterations - 1):
            if self.kept(t) < 1:
                raise bad(f"population_size must be >= 1 (round {t})")
            if not self.strength_at(t) >= 0:
                raise bad(f"strength must be >= 0 (round {t})")
        if self.initial_population is not None and self.initial_population < 1:
            raise bad("initial_population must be >= 1")
        if self.selection == "rank":
            for t in range(self.iterations):
                if self.kept(t) > self.population_at(t):
                    raise bad(
                        f"round {t} ranks {self.population_at(t)} candidates but must keep {self.kept(t)}; "
                        "raise the population or use selection='sample'"
                    )
        if self.k < 1 or self.k > min(self.population_at(t) for t in range(self.iterations)):
            raise bad(f"k={self.k} must be between 1 and the smallest population")
        self._validate_common(bad)

    def _validate_common(self, bad: Callable[[str], ValueError]) -> None:
        if self.selection not in ("rank", "sample"):
            raise bad(f"selection must be 'rank' or 'sample', got {self.selection!r}")
        if self.metric not in ("l2", "cosine"):
            raise bad(f"metric must be 'l2' or 'cosine', got {self.metric!r}")
        if self.lookahead < 0:
            raise bad("lookahead must be >= 0")
        if math.isnan(self.epsilon) or self.epsilon <= 0:
            raise bad(f"epsilon must be > 0 (inf for no privacy), got {self.epsilon}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise bad(f"delta must be in (0, 1), got {self.delta}")
        if self.noise_multiplier is not None and not (self.noise_multiplier >= 0):
            raise bad("noise_multiplier must be >= 0")
        if self.units_bound is not None and (isinstance(self.units_bound, bool) or self.units_bound < 3):
            raise bad(f"units_bound must be an integer >= 3, got {self.units_bound!r}")
        if not 0 <= self.count_share < 1:
            raise bad(f"count_share must be in [0, 1), got {self.count_share!r}")

    def sized_for(self, count: NoisyCount | None, noise_multiplier: float) -> PEConfig:
        """This config with an ``"auto"`` population replaced by the size the DP count calls for."""
        if not self.auto_population:
            return self
        if count is None:
            raise ValueError("population_size='auto' needs the DP count of units")
        per_round = self.variation_folds + int(self.keep_selected)
        lo, hi = self.auto_population_bounds
        lo = max(lo, -(-self.num_samples // per_round))
        if noise_multiplier == 0:
            kept = hi
        else:
            kept = math.floor(max(count.value, 0.0) / (self.target_signal * noise_multiplier * per_round))
        return dataclasses.replace(self, population_size=int(min(max(kept, lo), max(lo, hi))))

    def resolve_delta(self) -> float:
        """δ from public inputs only (never from the number of private units)."""
        return accounting.public_delta(delta=self.delta, units_bound=self.units_bound)

    def noise_plan(self) -> NoisePlan:
        """σ of the rounds and of the DP count, from public inputs only."""
        plan = accounting.plan_noise(
            epsilon=self.epsilon,
            delta=self.resolve_delta(),
            rounds=self.iterations,
            count_share=self.count_share,
            seeding_share=self.seeding_share,
        )
        if self.noise_multiplier is None:
            return plan
        sigmas = [float(self.noise_multiplier)] * self.iterations + [
            s for s in (plan.count_noise_multiplier, plan.seeding_noise_multiplier) if s
        ]
        return dataclasses.replace(
            plan, round_noise_multiplier=float(self.noise_multiplier), gdp_mu=accounting.gdp_mu(sigmas)
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["epsilon"] = "inf" if math.isinf(self.epsilon) else self.epsilon
        for key in ("population_size", "strength", "auto_population_bounds"):
            if isinstance(d[key], tuple):
                d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PEConfig:
        d = dict(d)
        d["epsilon"] = math.inf if d["epsilon"] == "inf" else float(d["epsilon"])
        return cls(**d)


@dataclass
class RoundResult(Generic[S]):
    """What a callback sees after a round."""

    round_index: int
    population: Population[S]
    histogram: NoisyHistogram
    selected: np.ndarray
    epsilon_spent: float
    resumed: bool = False


@dataclass
class PEResult(Generic[S]):
    """The DP output: ``num_samples`` selected samples and the ledger that accounts for them."""

    samples: list[S]
    ids: list[str]
    votes: np.ndarray
    ledger: PrivacyLedger
    noise_multiplier: float
    delta: float
    plan: NoisePlan
    unit_count: NoisyCount | None = None
    rounds_resumed: list[int] = field(default_factory=list)
    redrawn: list[str] = field(default_factory=list)
    config: PEConfig | None = None  # as run (an "auto" population sized from the DP count)
    seeding: NoisyHistogram | None = None

    @property
    def epsilon(self) -> float:
        return self.ledger.spent_epsilon()


def _fingerprint(private: np.ndarray, units: np.ndarray | None, seeding: np.ndarray | None = None) -> str:
    h = hashlib.sha256()
    h.update(str((tuple(private.shape), np.dtype(private.dtype).str)).encode())
    step = max(1, (64 * 2**20) // max(1, private[:1].nbytes))  # hash in blocks: a memory-mapped file streams
    for start in range(0, private.shape[0], step):
        h.update(np.ascontiguousarray(private[start : start + step]).tobytes())
    if units is not None:
        h.update(np.ascontiguousarray(np.asarray(units).astype(str)).tobytes())
    if seeding is not None:
        h.update(b"seeding")
        h.update(np.ascontiguousarray(seeding, dtype=np.float64).tobytes())
    return h.hexdigest()


class PrivateEvolution(Generic[S]):
    """Runs PE over a state directory. Only :func:`dp_histogram` ever sees the private embeddings.

    Files under ``state_dir`` (public or DP only): ``config.json``, ``ledger.json``,
    ``unit_count.json`` (the DP count), ``round_XXX/`` with ``population.jsonl`` (candidates),
    ``embeddings.npy``, ``histogram.npz`` (the DP release, naming its ledger entry),
    ``selected.json`` and ``complete.json``; ``result.jsonl`` once done; ``.lock`` while running.
    Under ``private_dir`` (default ``state_dir/private``, owner-only): the fingerprint of the
    private data that resume checks.
    """

    def __init__(
        self,
        generator: Generator[S],
        embedder: Embedder[S],
        config: PEConfig,
        state_dir: str | Path,
        *,
        private_dir: str | Path | None = None,
        backend: Backend = "auto",
        device: str | None = None,
        chunk_size: int | None = None,
        save_embeddings: bool = True,
        _noise: NoiseSource | None = None,
    ) -> None:
        self.generator = generator
        self.embedder = embedder
        self.requested_config = config  # as given (population may be "auto"); config.json holds it
        self.config = config  # as run: sized from the DP count once it is released
        self.state_dir = Path(state_dir)
        self.private_dir = Path(private_dir) if private_dir is not None else self.state_dir / "private"
        self.backend: Backend = backend
        self.device = device
        self.chunk_size = chunk_size
        self.save_embeddings = save_embeddings
        self._noise = _noise  # tests only: replaces the OS-entropy noise
        self._redrawn: list[str] = []

    # -- paths -----------------------------------------------------------------------------
    def round_dir(self, t: int) -> Path:
        return self.state_dir / f"round_{t:03d}"

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "ledger.json"

    @property
    def count_path(self) -> Path:
        return self.state_dir / "unit_count.json"

    @property
    def seeding_path(self) -> Path:
        return self.state_dir / "seeding.npz"

    def completed_rounds(self) -> list[int]:
        return [t for t in range(self.config.iterations) if (self.round_dir(t) / "complete.json").exists()]

    def _released_state(self) -> list[Path]:
        """Files that exist only once something was released."""
        found = [
            p
            for p in (self.ledger_path, self.count_path, self.seeding_path, self.state_dir / "result.jsonl")
            if p.exists()
        ]
        found += sorted(self.state_dir.glob("round_*/histogram.npz"))
        found += sorted(self.state_dir.glob("round_*/selected.json"))
        return found

    # -- set-up ----------------------------------------------------------------------------
    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One process at a time in a state directory (POSIX advisory lock, freed if we die)."""
        import fcntl

        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.state_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                raise RunStateError(
                    f"{self.state_dir} is in use by another process (pid {holder}); wait for it to finish"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _prepare(
        self, private: np.ndarray, units: np.ndarray | None, seeding: np.ndarray | None, resume: bool
    ) -> tuple[PrivacyLedger, NoisePlan]:
        cfg = self.requested_config
        plan = cfg.noise_plan()
        meta = {
            "config": cfg.to_dict(),
            "delta": plan.delta,
            "noise_multiplier": plan.round_noise_multiplier,
            "count_noise_multiplier": plan.count_noise_multiplier,
            "seeding_noise_multiplier": plan.seeding_noise_multiplier,
        }
        fingerprint = {"private_fingerprint": _fingerprint(private, units, seeding)}
        config_path = self.state_dir / "config.json"
        fingerprint_path = self.private_dir / "fingerprint.json"
        if config_path.exists():
            if not resume:
                raise RunStateError(
                    f"{self.state_dir} already holds a PE run; pass resume=True to continue it or use a new directory"
                )
            saved = json.loads(config_path.read_text())
            diffs = [k for k in meta if saved.get(k) != meta[k]]
            if not fingerprint_path.exists() or json.loads(fingerprint_path.read_text()) != fingerprint:
                diffs.append("private data")
            if diffs:
                raise RunStateError(
                    f"cannot resume {self.state_dir}: it was started with different {', '.join(diffs)}; "
                    "use the original settings and data, or a new directory"
                )
            if not self.ledger_path.exists():
                raise RunStateError(
                    f"{self.ledger_path} is missing but {self.state_dir} holds a run: the privacy spent so far is "
                    "unknown, so the run cannot continue; start a new run in a new directory"
                )
            ledger = PrivacyLedger.load(self.ledger_path)
            for t in range(cfg.iterations):
                self._refuse_lost_release(t)
            if plan.count_noise_multiplier is not None:
                self._refuse_lost_count()
            if plan.seeding_noise_multiplier is not None:
                self._refuse_lost_seeding()
        else:
            released = self._released_state()
            if released:
                raise RunStateError(
                    f"{config_path} is missing but {self.state_dir} holds released state ({released[0].name}); "
                    "a new ledger must not be started beside it: restore the file or use a new directory"
                )
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self.private_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(self.private_dir, 0o700)
            ledger = PrivacyLedger(epsilon=cfg.epsilon, delta=plan.delta, path=self.ledger_path)
            ledger.save()
            atomic_write_json(fingerprint_path, fingerprint)
            atomic_write_json(config_path, meta)
        # The run refuses to start (or continue) when what it still has to draw exceeds the budget.
        todo = [plan.round_noise_multiplier] * sum(
            1 for t in range(cfg.iterations) if not (self.round_dir(t) / "histogram.npz").exists()
        )
        if plan.count_noise_multiplier is not None and not self.count_path.exists():
            todo.append(plan.count_noise_multiplier)
        if plan.seeding_noise_multiplier is not None and not self.seeding_path.exists():
            todo.append(plan.seeding_noise_multiplier)
        ledger.check_plan(todo)
        return ledger, plan

    def _charge_draw(self, ledger: PrivacyLedger, base: str, *, noise_multiplier: float, meta: dict[str, Any]) -> str:
        """Charge one noise draw under a fresh ledger name (``base``, then ``base#2``, …)."""
        name, attempt = base, 1
        while name in ledger:
            attempt += 1
            name = f"{base}#{attempt}"
        if attempt > 1:
            self._redrawn.append(name)
        ledger.charge(name, noise_multiplier=noise_multiplier, meta=meta)
        return name

    def _refuse_lost_count(self) -> None:
        if not self.count_path.exists() and (
            self.seeding_path.exists() or any(self.state_dir.glob("round_*/histogram.npz"))
        ):
            raise RunStateError(
                f"{self.count_path} is missing but releases after it were derived from it; "
                "it cannot be drawn again: restore it or use a new directory"
            )

    def _refuse_lost_seeding(self) -> None:
        if not self.seeding_path.exists() and (self.round_dir(0) / "population.jsonl").exists():
            raise RunStateError(
                f"{self.seeding_path} is missing but the first population was drawn from it; "
                "it cannot be drawn again: restore it or use a new directory"
            )

    def _release_count(self, ledger: PrivacyLedger, plan: NoisePlan, num_units: int) -> NoisyCount | None:
        """The DP count of units: re-read if released, else charged, drawn and written first."""
        if plan.count_noise_multiplier is None:
            return None
        if self.count_path.exists():
            data = json.loads(self.count_path.read_text())
            if data.get("release") not in ledger:
                raise RunStateError(
                    f"{self.count_path} names no release of {self.ledger_path}; the state is inconsistent"
                )
            return NoisyCount.from_dict(data)
        self._refuse_lost_count()
        name = self._charge_draw(
            ledger, "unit_count", noise_multiplier=plan.count_noise_multiplier, meta={"kind": "unit_count"}
        )
        count = dp_count(num_units, noise_multiplier=plan.count_noise_multiplier, _noise=self._noise)
        atomic_write_json(self.count_path, count.to_dict() | {"release": name})
        return count

    def _release_seeding(
        self, ledger: PrivacyLedger, plan: NoisePlan, weights: np.ndarray | None, units: np.ndarray | None
    ) -> NoisyHistogram | None:
        """The seeding release: a DP histogram of the private rows' affinities to public keys."""
        sigma = plan.seeding_noise_multiplier
        if sigma is None:
            return None
        if self.seeding_path.exists():
            arrays = load_npz(self.seeding_path)
            if str(arrays.get("release")) not in ledger:
                raise RunStateError(f"{self.seeding_path} names no release of {self.ledger_path}")
            return NoisyHistogram.from_arrays(arrays)
        self._refuse_lost_seeding()
        if weights is None:
            raise ValueError("seeding_share > 0 needs seeding_weights: one row of key affinities per private row")
        name = self._charge_draw(ledger, "seeding", noise_multiplier=sigma, meta={"kind": "seeding"})
        noisy = privatize(weight_histogram(weights, units), noise_multiplier=sigma, _noise=self._noise)
        atomic_save_npz(self.seeding_path, noisy.as_arrays() | {"release": np.array(name)})
        return noisy

    # -- the loop --------------------------------------------------------------------------
    def run(
        self,
        private_embeddings: np.ndarray,
        *,
        units: np.ndarray | Sequence[Any] | None = None,
        callbacks: Sequence[Callable[[RoundResult[S]], None]] = (),
        resume: bool = False,
        seeding_weights: np.ndarray | None = None,
        on_start: Callable[[PEConfig, NoisyCount | None], None] | None = None,
    ) -> PEResult[S]:
        """Run (or with ``resume=True`` continue) PE against the private embeddings.

        ``units`` gives a privacy-unit id per private row for unit-level DP (default: one row, one unit).
        ``seeding_weights`` (rows × keys, with ``seeding_share > 0``): each private row's affinity to
        public keys; their DP histogram is passed to ``generator.condition`` before the first
        population is drawn. ``on_start(config, count)`` is called once the DP count has sized the run.
        """
        private = private_embeddings
        units_arr = None if units is None else np.asarray(units)
        if units_arr is not None and units_arr.shape != (private.shape[0],):
            raise ValueError(f"units must have one id per private row ({private.shape[0]}), got {units_arr.shape}")
        if private.shape[0] == 0:
            raise ValueError("there is no private data to vote with")
        weights = None if seeding_weights is None else np.asarray(seeding_weights, dtype=np.float64)
        if weights is not None and weights.shape[0] != private.shape[0]:
            raise ValueError(f"seeding_weights must have one row per private row ({private.shape[0]})")
        with self._exclusive():
            return self._run_locked(private, units_arr, weights, callbacks, resume, on_start)

    def _run_locked(
        self,
        private: np.ndarray,
        units_arr: np.ndarray | None,
        weights: np.ndarray | None,
        callbacks: Sequence[Callable[[RoundResult[S]], None]],
        resume: bool,
        on_start: Callable[[PEConfig, NoisyCount | None], None] | None,
    ) -> PEResult[S]:
        ledger, plan = self._prepare(private, units_arr, weights, resume)
        num_units = int(private.shape[0]) if units_arr is None else len(np.unique(units_arr))
        count = self._release_count(ledger, plan, num_units)
        if count is not None:
            try:
                count.check_delta(plan.delta)
            except ValueError as exc:
                raise PrivacyPlanError(str(exc)) from None
        sigma = plan.round_noise_multiplier
        self.config = cfg = self.requested_config.sized_for(count, sigma)
        if on_start is not None:
            on_start(cfg, count)
        seeding = self._release_seeding(ledger, plan, weights, units_arr)
        condition = getattr(self.generator, "condition", None)
        if seeding is not None and callable(condition):
            condition(seeding.values)
        resumed: list[int] = []

        population = self._initial_population()
        selected_idx = np.empty(0, dtype=np.int64)
        noisy: NoisyHistogram | None = None
        for t in range(cfg.iterations):
            rdir = self.round_dir(t)
            noisy, was_released = self._release(t, population, private, units_arr, ledger, sigma)
            if was_released:
                resumed.append(t)
            selected_path = rdir / "selected.json"
            if selected_path.exists():
                selected_idx = np.asarray(json.loads(selected_path.read_text()), dtype=np.int64)
            else:
                rng = np.random.default_rng(derive_seed(cfg.seed, t, "select"))
                if t == cfg.iterations - 1 and cfg.selection == "rank" and cfg.distinct_release:
                    selected_idx = _rank_distinct(noisy.values, population.samples, cfg.kept(t))
                else:
                    selected_idx = select(noisy.values, cfg.kept(t), method=cfg.selection, rng=rng)
                atomic_write_json(selected_path, selected_idx.tolist())
            if t < cfg.iterations - 1:
                next_path = self.round_dir(t + 1) / "population.jsonl"
                if next_path.exists():
                    next_population: Population[S] = Population.from_rows(read_jsonl(next_path))
                else:
                    next_population = next_generation(
                        population.take(selected_idx),
                        self.generator,
                        variation_folds=cfg.variation_folds,
                        strength=cfg.strength_at(t),
                        keep_selected=cfg.keep_selected,
                        round_index=t,
                        seed=cfg.seed,
                    )
                    atomic_write_jsonl(next_path, next_population.to_rows())
            complete = rdir / "complete.json"
            if not complete.exists():
                atomic_write_json(complete, {"round": t, "epsilon_spent": _finite(ledger.spent_epsilon())})
                result = RoundResult(t, population, noisy, selected_idx, ledger.spent_epsilon(), resumed=was_released)
                for callback in callbacks:
                    callback(result)
            if t < cfg.iterations - 1:
                population = next_population

        assert noisy is not None
        final = population.take(selected_idx)
        result_rows = [
            {"id": i, "votes": float(noisy.values[j]), "sample": s}
            for i, j, s in zip(final.ids, selected_idx, final.samples, strict=True)
        ]
        atomic_write_jsonl(self.state_dir / "result.jsonl", result_rows)
        return PEResult(
            samples=final.samples,
            ids=final.ids,
            votes=noisy.values[selected_idx],
            ledger=ledger,
            noise_multiplier=sigma,
            delta=ledger.delta,
            plan=plan,
            unit_count=count,
            rounds_resumed=resumed,
            redrawn=list(self._redrawn),
            config=cfg,
            seeding=seeding,
        )

    def _initial_population(self) -> Population[S]:
        path = self.round_dir(0) / "population.jsonl"
        if path.exists():
            return Population.from_rows(read_jsonl(path))
        n = self.config.population_at(0)
        samples = self.generator.random(n, seed=derive_seed(self.config.seed, 0, "random"))
        if len(samples) != n:
            raise RuntimeError(f"generator.random returned {len(samples)} samples, expected {n}")
        population: Population[S] = Population(samples, [f"r0-{j}" for j in range(n)])
        atomic_write_jsonl(path, population.to_rows())
        return population

    def _candidate_embeddings(self, t: int, population: Population[S]) -> np.ndarray:
        path = self.round_dir(t) / "embeddings.npy"
        if path.exists():
            return np.load(path, allow_pickle=False)
        cfg = self.config
        if cfg.lookahead > 0:
            copies = [
                self.generator.vary(
                    population.samples, cfg.strength_at(t), seed=derive_seed(cfg.seed, t, "lookahead", j)
                )
                for j in range(cfg.lookahead)
            ]
            stacked = np.stack([np.asarray(self.embedder.embed(c)) for c in copies], axis=1)
            emb = stacked.mean(axis=1)
        else:
            emb = np.asarray(self.embedder.embed(population.samples))
        if emb.shape[0] != len(population):
            raise RuntimeError(f"embedder returned {emb.shape[0]} rows for {len(population)} samples")
        if self.save_embeddings:
            atomic_save_npy(path, emb)
        return emb

    def _derived_from_round(self, t: int) -> list[Path]:
        """What exists only once round t's histogram was read: its selection and everything after."""
        found = [p for p in (self.round_dir(t) / "selected.json", self.state_dir / "result.jsonl") if p.exists()]
        found += [p for p in self.state_dir.glob("round_*") if p.is_dir() and int(p.name[6:]) > t and any(p.iterdir())]
        return found

    def _refuse_lost_release(self, t: int) -> None:
        """Round t's histogram is missing while something derived from it exists: never redraw it."""
        path = self.round_dir(t) / "histogram.npz"
        if path.exists():
            return
        derived = self._derived_from_round(t)
        if derived:
            raise RunStateError(
                f"{path} is missing but results derived from it exist ({derived[0].relative_to(self.state_dir)}); "
                "a released round is never drawn again: restore the file or start a new run in a new directory"
            )

    def _release(
        self,
        t: int,
        population: Population[S],
        private: np.ndarray,
        units: np.ndarray | None,
        ledger: PrivacyLedger,
        sigma: float,
    ) -> tuple[NoisyHistogram, bool]:
        """The noisy histogram of round t: re-read if it was released, else charged, drawn, written."""
        path = self.round_dir(t) / "histogram.npz"
        if path.exists():
            arrays = load_npz(path)
            if "release" not in arrays or str(arrays["release"]) not in ledger:
                raise RunStateError(
                    f"{path} names no release of {self.ledger_path}; the state directory is inconsistent"
                )
            return NoisyHistogram.from_arrays(arrays), True
        self._refuse_lost_release(t)
        candidates = self._candidate_embeddings(t, population)
        # Charged before any noise is drawn. A round charged earlier but never written (a crash in
        # between) gets a new entry: every draw is a release, even one nobody saw.
        name = self._charge_draw(
            ledger, f"round_{t:03d}", noise_multiplier=sigma, meta={"round": t, "num_candidates": len(population)}
        )
        cfg = self.config
        noisy = dp_histogram(
            private,
            candidates,
            noise_multiplier=sigma,
            k=cfg.k,
            metric=cfg.metric,
            units=units,
            threshold=cfg.threshold,
            backend=self.backend,
            chunk_size=self.chunk_size,
            device=self.device,
            _noise=self._noise,
        )
        atomic_save_npz(path, noisy.as_arrays() | {"release": np.array(name)})
        return noisy, False


def _rank_distinct(votes: np.ndarray, samples: Sequence[Any], n: int) -> np.ndarray:
    """The final release: the n highest-voted candidates, skipping copies of a sample already taken
    (copy fallbacks and kept samples make identical candidates); copies fill in only when there are
    fewer than n distinct samples. Post-processing of the noisy votes, like rank selection."""
    order = np.argsort(-np.asarray(votes, dtype=np.float64), kind="stable")
    seen: set[str] = set()
    first: list[int] = []
    rest: list[int] = []
    for i in order:
        key = json.dumps(samples[int(i)], sort_keys=True)
        (rest if key in seen else first).append(int(i))
        seen.add(key)
    return np.asarray((first + rest)[:n], dtype=np.int64)


def _finite(x: float) -> float | str:
    return "inf" if math.isinf(x) else x
