"""Train/validation/test splits (official, random, Murcko-scaffold) and class-balanced samples."""

from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from .errors import ConfigError, DataError

if TYPE_CHECKING:
    from .data import Dataset

SplitMethod = Literal["official", "random", "scaffold"]


def balanced_sample(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """`n` test indices, alternating between classes so both labels show up."""
    rng = np.random.default_rng(seed)
    pools = [list(rng.permutation(np.flatnonzero(y == c))) for c in np.unique(y)]
    picked = []
    while len(picked) < min(n, len(y)):
        for pool in pools:
            if pool and len(picked) < n:
                picked.append(pool.pop())
    return np.asarray(picked, dtype=int)


@dataclass
class Split:
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    method: str


def split_dataset(
    ds: Dataset,
    method: SplitMethod | None = None,
    test_fraction: float = 0.2,
    valid_fraction: float = 0.1,
    seed: int = 0,
    valid_method: Literal["random", "scaffold"] = "random",
) -> Split:
    """Train/validation/test indices. `None` = official split when the data has one, else random.

    The validation part is a seeded random subset of the training part, or with
    `valid_method="scaffold"` whole scaffold groups of it (like a scaffold test part: `fit` chooses
    models on such a part, so that its choice is judged on unseen scaffolds as the test will be).
    """
    for name, value, example in (
        ("test", test_fraction, "--test-fraction 0.2"),
        ("validation", valid_fraction, "0.1"),
    ):
        if not 0 < value < 1:
            raise DataError(
                f"{name} fraction {value!r} must be strictly between 0 and 1 (a share of the molecules); "
                f"use e.g. {example}"
            )
    if method is None:
        method = "official" if ds.official_split is not None else "random"
    rng = np.random.default_rng(seed)
    n = len(ds)
    if method == "official":
        if ds.official_split is None:
            raise DataError(f"dataset {ds.task.name!r} has no official split; use --split random or scaffold")
        test = np.flatnonzero(ds.official_split == "test")
        trainval = np.flatnonzero(ds.official_split != "test")
    elif method == "random":
        perm = rng.permutation(n)
        n_test = max(1, int(round(test_fraction * n)))
        test, trainval = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    elif method == "scaffold":
        if ds.is_tabular:
            raise DataError(
                f"dataset {ds.task.name!r} has numeric rows, no molecules to take scaffolds of; use --split random"
            )
        trainval, test = _scaffold_split(ds.smiles, test_fraction, rng)
    else:
        raise DataError(f"unknown split {method!r}; expected official, random or scaffold")
    if valid_method == "scaffold" and not ds.is_tabular:
        inner_train, inner_valid = _scaffold_split([ds.smiles[i] for i in trainval], valid_fraction, rng)
        train, valid = trainval[inner_train], trainval[inner_valid]
    elif valid_method in ("random", "scaffold"):
        perm = rng.permutation(trainval)
        n_valid = int(round(valid_fraction * len(trainval)))
        valid, train = np.sort(perm[:n_valid]), np.sort(perm[n_valid:])
    else:
        raise DataError(f"unknown validation split {valid_method!r}; expected random or scaffold")
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"split {method!r} left an empty train or test set ({n} molecules); use more data")
    return Split(train, valid, test, method)


FoldGroups = Literal["auto", "balanced", "rare"]
FOLD_GROUPS: tuple[FoldGroups, ...] = ("auto", "balanced", "rare")


def check_fold_groups(groups: str, name: str = "inner fold groups") -> None:
    """A `ConfigError` naming `name` (a field or a flag) and the value unless it is one of `FOLD_GROUPS`."""
    if groups not in FOLD_GROUPS:
        raise ConfigError(f"{name} {groups}: choose {', '.join(FOLD_GROUPS[:-1])} or {FOLD_GROUPS[-1]}")


RARE_POOL = 0.5  # "rare" folds validate on the smallest scaffold groups holding this share of the rows
# "auto": rare folds when one scaffold group would fill more than this share of a balanced fold
DOMINANT_SHARE = 0.5


def inner_folds(
    ds: Dataset, rows: np.ndarray, k: int, method: str, seed: int, groups: FoldGroups = "balanced"
) -> list[Split]:
    """`k` (train, valid) pairs of `rows`. With `method="scaffold"`, validation parts are whole scaffold groups:
    - `groups="balanced"`: every group, largest first, each to the fold with the fewest molecules so far (ties
      broken by the seed); the validation parts partition the rows, so a metric averaged over the folds judges a
      variant on all of them;
    - `groups="rare"`: only the groups a scaffold split of `rows` with test fraction `RARE_POOL` would test on
      (the smallest; a big group that does not fit beside the larger ones too, unless it alone would outgrow a
      fold), shared out the same way; the others always train. A scaffold test split is made of the smallest
      groups of the data (on bace, clintox and herg: single-molecule scaffolds only), so these folds validate on
      molecules like the test's, where balanced folds also validate on whole large series, which the test never
      holds;
    - `groups="auto"`: `fold_groups_for` decides (rare when one scaffold group would fill more than half of a
      balanced fold).
    Otherwise seeded random shares of all the rows."""
    rows = np.sort(np.asarray(rows, dtype=int))
    if not 2 <= k <= len(rows):
        raise DataError(f"{k} inner folds for {len(rows)} molecules: use between 2 and {len(rows)}")
    check_fold_groups(groups)
    rng = np.random.default_rng(seed)
    fold_of = np.full(len(rows), -1, dtype=int)  # -1: always trains
    if method == "scaffold" and not ds.is_tabular:
        found = list(_scaffold_groups(ds, rows).values())
        sets = sorted((found[i] for i in rng.permutation(len(found))), key=len, reverse=True)
        if fold_groups_for(ds, rows, k, groups) == "rare":  # as `_scaffold_split` makes a test part
            trains, pool = 0, []  # 1 - RARE_POOL of the rows always train, the rest is shared out
            for g in sets:  # the largest groups that fit in train, and any too big for one rare fold
                if trains + len(g) <= (1 - RARE_POOL) * len(rows) or len(g) > RARE_POOL * len(rows) / k:
                    trains += len(g)
                else:
                    pool.append(g)
            sets = pool
        sizes = np.zeros(k, dtype=int)
        for g in sets:
            f = int(np.argmin(sizes))
            fold_of[g], sizes[f] = f, sizes[f] + len(g)
    else:
        fold_of[rng.permutation(len(rows))] = np.arange(len(rows)) % k
    return [Split(rows[fold_of != f], rows[fold_of == f], np.array([], dtype=int), method) for f in range(k)]


def fold_groups_for(ds: Dataset, rows: np.ndarray, k: int, groups: FoldGroups = "auto") -> str:
    """The fold groups `inner_folds` uses on `rows`: `groups` itself unless it is "auto", which gives "rare"
    when the largest scaffold group of `rows` holds more than `DOMINANT_SHARE` of a balanced fold
    (`len(rows) / k` molecules), else "balanced". Such a group makes one balanced fold nearly by itself, a
    series the scaffold test split never holds: on ames and tox21 (acyclic molecules, then benzenes: 17-21 % of
    the rows each) the 2 folds fit validated on, of the 5, held these two groups only; on clintox (145
    benzenes, 129 acyclics among 1,167 training molecules) they filled 55-62 % of two folds, and rare folds chose
    better there (+0.047 ROC-AUC over seeds 0-2, session 15). On herg, bace and lipophilicity the largest group
    fills 11-31 % of a fold, and rare folds, half the size, chose worse on herg (52 molecules each, -0.026) and
    the same on bace (evaluation/PERFORMANCE.md, sessions 14, 15 and 20)."""
    check_fold_groups(groups)
    if groups != "auto":
        return groups
    if ds.is_tabular or len(rows) == 0:
        return "balanced"
    largest = max(len(g) for g in _scaffold_groups(ds, rows).values())
    return "rare" if largest > DOMINANT_SHARE * len(rows) / k else "balanced"


def _scaffold_groups(ds: Dataset, rows: np.ndarray) -> dict[str, list[int]]:
    """Positions in `rows` by Murcko scaffold, in the order of `rows`."""
    by_scaffold: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_scaffold[murcko_scaffold(ds.smiles[r])].append(i)
    return by_scaffold


@functools.lru_cache(maxsize=1 << 16)
def murcko_scaffold(smiles: str) -> str:
    """The Murcko scaffold of a SMILES ("" for acyclic molecules and unparsable SMILES), cached: the inner folds
    and the splits ask for the same molecules' scaffolds several times per search."""
    from rdkit import Chem, RDLogger
    from rdkit.Chem.Scaffolds import MurckoScaffold

    RDLogger.DisableLog("rdApp.*")  # "not removing hydrogen atom without neighbors" on [H+] (tox21)
    mol = Chem.MolFromSmiles(smiles)
    return MurckoScaffold.MurckoScaffoldSmiles(mol=mol, includeChirality=False) if mol else ""


def _scaffold_split(smiles: list[str], test_fraction: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """Whole scaffold groups go to one side: large groups to train, the seeded rest fills test."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(smiles):
        groups[murcko_scaffold(s)].append(i)
    sets = list(groups.values())
    order = rng.permutation(len(sets))
    # big scaffolds first (they belong in train), random order among equal sizes
    sets = sorted((sets[i] for i in order), key=len, reverse=True)
    n_train_target = len(smiles) - int(round(test_fraction * len(smiles)))
    train, test = [], []
    for g in sets:
        (train if len(train) + len(g) <= n_train_target else test).extend(g)
    return np.sort(np.asarray(train, dtype=int)), np.sort(np.asarray(test, dtype=int))


def can_score(ds: Dataset, rows: np.ndarray) -> bool:
    """Whether a metric can be computed on `rows`: some rows, and for classification two classes of every task."""
    if len(rows) == 0:  # e.g. a "rare" inner fold when fewer small scaffold groups than folds were left
        return False
    if not ds.task.is_classification:
        return True
    y = np.asarray(ds.y[rows], dtype=float).reshape(len(rows), -1)
    return all(len(np.unique(col[np.isfinite(col)])) >= 2 for col in y.T)
