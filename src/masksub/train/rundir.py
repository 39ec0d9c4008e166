"""The run directory: one run, one process, a log that matches its checkpoint.

Claimed before any work (checked, then locked for the life of the run); a directory with no
checkpoint holds no run yet, so a rerun may start there again.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

from ..errors import MaskSubError

RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "summary.json", "config.yaml", "run.json")
CHECKPOINTS = ("last.pt", "best.pt")  # what makes a folder a run (the rest is its log)
LOCK_FILE = ".masksub.lock"


def resolve(output: str, run_name: str, recipe: str, sub: str, resume: str | None, run_dir: str | None) -> Path:
    """Where the run lives: given, the checkpoint's folder on resume, else output/name-stamp."""
    if run_dir:
        return Path(run_dir)
    if resume:
        p = Path(resume)
        return p if p.is_dir() else p.parent
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(output) / (run_name or f"{recipe or 'run'}-{sub}-{stamp}")


def check(run_dir: Path, ck: dict[str, Any] | None, *, overwrite: bool) -> str:
    """Refuse, before any work: a new run in a directory that holds one (unless ``overwrite``),
    a directory that cannot be written, a checkpoint of another run. Returns the run's id."""
    check_writable(run_dir, resuming=ck is not None)  # nothing made yet: an error leaves no empty run dir
    own = read_run_id(run_dir)
    if ck is None:
        held = [n for n in RUN_FILES if (run_dir / n).exists()]
        if held and not overwrite and any(n in held for n in CHECKPOINTS):
            raise MaskSubError(
                f"run directory {run_dir} already holds a run ({', '.join(held)}); continue it with: "
                f"masksub train --resume {run_dir}; or start it again with --overwrite (deletes it), or "
                "pick another --run-name")
        return uuid.uuid4().hex
    theirs = ck.get("run_id")
    if own is not None and theirs is not None and own != theirs:
        raise MaskSubError(
            f"the checkpoint in {run_dir} belongs to another run (run id {theirs[:8]}, this directory's "
            f"run is {own[:8]}; its config: {ck['config'].get('run_name') or ck['config'].get('recipe')!r}): "
            "resume that run's own directory, or copy the checkpoint into an empty directory to continue it there")
    return theirs or own or uuid.uuid4().hex


def unwritable_advice(run_dir: Path, resuming: bool) -> str:
    """What to do about a run directory that cannot be written: a resumed run cannot move."""
    if resuming:
        return ("make it writable, or copy the run folder somewhere writable and continue the copy with: "
                "masksub train --resume COPY")
    return "choose another --output (or --run-name)"


def check_writable(run_dir: Path, *, resuming: bool = False) -> None:
    """The run directory, or the nearest folder above it that exists, must be a writable folder."""
    p = run_dir.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    why = ("is not a folder" if not p.is_dir() else
           "is not writable" if not os.access(p, os.W_OK | os.X_OK) else None)
    if why:
        raise MaskSubError(f"cannot write the run directory {run_dir}: {p} {why}; "
                           f"{unwritable_advice(run_dir, resuming)}")


def read_run_id(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "run.json").read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def clear(run_dir: Path) -> None:
    """--overwrite (or a folder holding no checkpoint): the old files go, so nothing of them
    mixes into the new run."""
    for n in RUN_FILES:
        (run_dir / n).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "tb", ignore_errors=True)


def make(run_dir: Path, *, resuming: bool) -> None:
    """Create the folder (the first thing written, after every check)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MaskSubError(f"cannot write the run directory {run_dir} ({e.strerror or e}); "
                           f"{unwritable_advice(run_dir, resuming)}") from None


def lock(run_dir: Path) -> Any:
    """An exclusive lock for the life of the run (released by the OS if the process dies);
    None if another process holds it."""
    f = open(run_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.close()
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return None
        raise
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def locked_message(run_dir: Path) -> str:
    try:
        pid = (run_dir / LOCK_FILE).read_text().strip() or "?"
    except OSError:
        pid = "?"
    return (f"another masksub process (pid {pid}) is training in {run_dir}; wait for it to end, or stop it "
            f"(it writes a checkpoint) and then continue with: masksub train --resume {run_dir}")


def trim_metrics(run_dir: Path, ck: dict[str, Any]) -> None:
    """Drop the lines logged after the checkpoint (a process killed between a log line and its
    checkpoint): the resumed run logs them again. A failed rewrite (full disk) changes nothing."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
            after = r.get("step", 0) > ck["global_step"] or (r.get("kind") == "epoch" and r.get("epoch", 0) > ck["epoch"])
        except (ValueError, AttributeError, TypeError):
            after = True  # a line cut off by the kill
        if after:
            dropped += 1
        else:
            keep.append(line)
    if dropped:
        tmp = path.with_name(".metrics.jsonl.tmp")
        try:
            tmp.write_text("".join(f"{line}\n" for line in keep))
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise MaskSubError(
                f"cannot rewrite {path} ({e.strerror or e}): its last {dropped} line(s) come after the "
                f"checkpoint and must go before the run continues; nothing was changed. Free space, then "
                f"continue with: masksub train --resume {run_dir}") from None
        print(f"masksub train: dropped {dropped} line(s) of metrics.jsonl logged after the checkpoint "
              f"(step {ck['global_step']}); they are logged again", file=sys.stderr)
