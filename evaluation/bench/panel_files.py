"""The panel's files: which CSV of a panel folder holds which assay (SMILES column, targets, task), and loading one.

A panel is a folder of CSV files, each described by its SMILES column, target column(s) and task:
the built-in table (`BUILTIN`) covers the files of `../shared/data/panel`; a `panel.json` in the
folder overrides or adds entries (any folder of CSVs), e.g.
    {"mine": {"file": "mine.csv", "smiles_col": "SMILES", "targets": ["active"], "task": "binary"},
     "ames": null}
(`null` drops an entry; `file` defaults to NAME.csv, `smiles_col` to "smiles"; task: binary,
multiclass, multilabel or regression; several targets make a multi-label task, empty cells missing).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from molcloak.pipeline.data import Dataset, DataSource
from molcloak.pipeline.errors import ConfigError

DEFAULT_PANEL = Path("../shared/data/panel")
TASKS = ("binary", "multiclass", "multilabel", "regression")
TOX21_TASKS = (
    "NR-AR", "NR-AR-LBD", "NR-AhR", "NR-Aromatase", "NR-ER", "NR-ER-LBD", "NR-PPAR-gamma", "SR-ARE", "SR-ATAD5",
    "SR-HSE", "SR-MMP", "SR-p53",
)  # fmt: skip


@dataclass(frozen=True)
class PanelEntry:
    name: str
    file: str
    smiles_col: str
    targets: tuple[str, ...]
    task: str  # binary, multiclass, multilabel or regression

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "targets": list(self.targets)}


BUILTIN = {
    "bace": PanelEntry("bace", "bace.csv", "smiles", ("Class",), "binary"),
    "clintox": PanelEntry("clintox", "clintox.csv", "smiles", ("CT_TOX",), "binary"),
    "ames": PanelEntry("ames", "ames.csv", "smiles", ("Y",), "binary"),
    "herg": PanelEntry("herg", "herg.csv", "smiles", ("Y",), "binary"),
    "tox21": PanelEntry("tox21", "tox21.csv", "smiles", TOX21_TASKS, "multilabel"),
    "lipophilicity": PanelEntry("lipophilicity", "lipophilicity.csv", "smiles", ("exp",), "regression"),
}
EXCLUDED = {"hiv.csv": "throughput and screening at scale, not the accuracy table"}


def default_panel_dir() -> Path:
    """`../shared/data/panel` relative to the current directory, when it exists."""
    if not DEFAULT_PANEL.is_dir():
        raise ConfigError(
            f"no panel folder at {DEFAULT_PANEL} (relative to {Path.cwd()}); "
            "give one: molcloak bench --panel DIR"
        )
    return DEFAULT_PANEL.resolve()


def describe_panel(folder: str | Path) -> tuple[dict[str, PanelEntry], dict[str, str]]:
    """({name: entry} of the described files present, {file: why it is left out} for the other CSVs)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"panel folder {str(folder)!r} is not a directory; give a folder of CSV files")
    entries = {n: e for n, e in BUILTIN.items() if (folder / e.file).is_file()}
    overrides = _read_panel_json(folder / "panel.json")
    for name, spec in overrides.items():
        if spec is None:
            entries.pop(name, None)
        else:
            entries[name] = _entry(name, spec, folder)
    for e in entries.values():
        if not (folder / e.file).is_file():
            raise ConfigError(f"panel.json entry {e.name!r}: file {str(folder / e.file)!r} does not exist")
    described = {e.file for e in entries.values()}
    left_out = {
        p.name: EXCLUDED.get(p.name, "not described; add it to panel.json (smiles_col, targets, task)")
        for p in sorted(folder.glob("*.csv"))
        if p.name not in described
    }
    if not entries:
        raise ConfigError(
            f"no dataset described in {folder}; write a panel.json there, e.g. "
            '{"mine": {"file": "mine.csv", "smiles_col": "smiles", "targets": ["y"], "task": "binary"}}'
        )
    return entries, left_out


def _read_panel_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}); fix the file") from None
    data = data.get("datasets", data) if isinstance(data, dict) else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected an object {{name: {{file, smiles_col, targets, task}}}}")
    return data


def _entry(name: str, spec: dict, folder: Path) -> PanelEntry:
    where = f"{folder / 'panel.json'} entry {name!r}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected an object or null, got {spec!r}")
    unknown = set(spec) - {"file", "smiles_col", "targets", "target", "task"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; use file, smiles_col, targets, task")
    base = BUILTIN.get(name)
    targets = spec.get("targets", spec.get("target", base.targets if base else None))
    targets = (targets,) if isinstance(targets, str) else tuple(targets or ())
    task = spec.get("task", base.task if base else None)
    if not targets or task not in TASKS:
        raise ConfigError(f"{where}: needs targets (a column or a list) and task, one of {', '.join(TASKS)}")
    return PanelEntry(
        name,
        spec.get("file", base.file if base else f"{name}.csv"),
        spec.get("smiles_col", base.smiles_col if base else "smiles"),
        targets,
        task,
    )


def load_entry(folder: str | Path, entry: PanelEntry) -> Dataset:
    """The dataset as any user's file is loaded: invalid and duplicate SMILES skipped and reported."""
    ds = DataSource(
        dataset=str(Path(folder) / entry.file),
        smiles_col=entry.smiles_col,
        target_col=",".join(entry.targets),
        task="regression" if entry.task == "regression" else "classification",
        skip_invalid=True,
    ).load()
    if ds.task.kind != entry.task:
        raise ConfigError(
            f"{entry.file}: described as {entry.task} but the data makes a {ds.task.kind} task "
            f"(targets {', '.join(entry.targets)}); fix the task in panel.json"
        )
    return ds
