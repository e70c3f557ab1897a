"""Where molcloak keeps state on this machine, and the one writer of private files (keys, tokens)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def molcloak_home() -> Path:
    """`$MOLCLOAK_HOME`, else ~/.molcloak: client keys (keys/), downloaded client parts (clients/),
    the app's sessions (app/) and the PBS cost calibration."""
    return Path(os.environ.get("MOLCLOAK_HOME") or Path.home() / ".molcloak")


def write_private(path: str | Path, data: bytes, private_dir: bool = True) -> Path:
    """Write `data` readable by the owner only (file 0600; its directory 0700 with `private_dir`),
    atomically: a temporary sibling is fsynced and renamed into place, and removed if anything fails,
    so a full disk never leaves a partial file or a stray temporary behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if private_dir:
        os.chmod(path.parent, 0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def fixed_zip(directory: str | Path, names: tuple[str, ...]) -> bytes:
    """A zip of `directory`'s files `names` with fixed timestamps and modes: the same files always give
    the same bytes (a client part's download is compared by hash)."""
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name in names:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            z.writestr(info, (Path(directory) / name).read_bytes(), zipfile.ZIP_DEFLATED)
    return buf.getvalue()
