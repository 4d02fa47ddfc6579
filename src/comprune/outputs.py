"""Output safety: what every writer (prune, prune --stream, export) does before, during and after writing.

- `check_output`: refuse a bad `--out` / `--gguf` before any work (., .., an ancestor of the cwd, a name too
  long, a foreign directory under --force, an existing file without --force, a parent that cannot be created
  or written);
- `sibling`: the hidden names beside an output (`.NAME.checkpoint`, `.NAME.partial-*`, `.NAME.lock`, ...),
  shortened with a hash when NAME is long, so they fit the 255-byte name limit;
- `OutputLock`: an exclusive flock on `.NAME.lock` held for a run's life: a second run is refused at once;
- `guard_output`: lock, remove what a killed run left, and on any error (not a kill, not Ctrl-C) remove
  everything the run wrote beside the output, with OSErrors (full disk, read-only) turned into one line;
- `follow_umask`: temporary directories are created 0700; published outputs get the umask's modes;
- `json_text` / `dump_json`: strict JSON for every file comprune writes (no NaN or Infinity, which strict readers
  refuse): a non-finite float is written as null, or, in a resume file (`exact`), as {"$float": "inf"}, which
  `loads_exact` reads back.
See docs/reliability.md.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import CompruneError

MANIFEST = "pruning.json"
NAME_MAX = 255
_SUFFIX_ROOM = 40  # the longest hidden suffix (".partial-stream", ".partial-XXXXXXXX", ".tmpPID", ...) and more


def base_name(out: Path) -> str:
    """NAME in the hidden siblings `.NAME.<suffix>`: the output's name, or a hashed prefix when too long."""
    name = Path(out).name
    if len(name.encode()) + _SUFFIX_ROOM <= NAME_MAX:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    return name.encode()[:120].decode(errors="ignore") + "~" + digest


def sibling(out, suffix: str) -> Path:
    """`.NAME.<suffix>` beside `out` (e.g. sibling(out, "checkpoint"))."""
    out = Path(out)
    return out.parent / f".{base_name(out)}.{suffix}"


def hidden_prefix(out) -> str:
    """Prefix for tempfile.mkdtemp/mkstemp beside `out`: `.NAME.`."""
    return f".{base_name(Path(out))}."


def io_error(e: OSError, what) -> CompruneError:
    """One line for an OSError while writing `what` (the output; the file is named when known)."""
    code = e.errno
    where = f"{what}" + (f" ({e.filename})" if e.filename and str(e.filename) != str(what) else "")
    if code in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return CompruneError(f"no space left writing {where}: {os.strerror(code)}; free some space or choose "
                             "another output location (nothing was left behind)")
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return CompruneError(f"cannot write {where}: {os.strerror(code)}; choose a writable output location")
    if code == errno.ENAMETOOLONG:
        return CompruneError(f"a name is too long for the file system writing {where}: choose a shorter output "
                             "name")
    return CompruneError(f"cannot write {where}: {e.strerror or e}; check the output location")


def check_output(out, force: bool, kind: str = "dir", flag: str = "--out") -> Path:
    """Refuse a bad output before any work; creates the parent directory. `kind`: "dir" (prune) or "file"."""
    out = Path(out)
    if out.name in ("", ".", "..") or out.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
        raise CompruneError(f"{flag} {out} is the current directory or one of its parents: pass a new name, "
                            f"e.g. {flag} out/pruned")
    if len(out.name.encode()) > NAME_MAX:
        raise CompruneError(f"{flag} name is {len(out.name.encode())} bytes, more than the {NAME_MAX} a file "
                            "name may have: choose a shorter name")
    if out.is_symlink() and not out.exists():
        raise CompruneError(f"{flag} {out} is a dangling symbolic link: remove it or choose another name")
    if kind == "dir":
        if out.exists() and not out.is_dir():
            raise CompruneError(f"{out} exists and is not a directory: choose another {flag}")
        if out.exists() and not force:
            raise CompruneError(f"{out} already exists: choose another {flag} or pass --force to replace it")
        if out.exists() and not (out / MANIFEST).is_file():
            raise CompruneError(f"{out} exists and is not a comprune output (no {MANIFEST}): --force only replaces "
                                f"a previous comprune output; choose another {flag}")
    else:
        if out.is_dir():
            raise CompruneError(f"{flag} {out} is a directory: pass a file name, e.g. {out / 'model.gguf'}")
        if out.exists() and not force:
            raise CompruneError(f"{out} already exists: choose another {flag} or pass --force to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CompruneError(f"cannot create the directory of {flag} {out} ({e.strerror or e}): choose a "
                            "writable location") from None
    if not out.parent.is_dir():
        raise CompruneError(f"{out.parent} is not a directory: choose another {flag}")
    try:  # writable, for real: root ignores permission bits but not read-only mounts
        fd, probe = tempfile.mkstemp(prefix=hidden_prefix(out) + "probe-", dir=out.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CompruneError(f"cannot write beside {flag} {out} ({e.strerror or e}): choose a writable "
                            "location") from None
    return out


class OutputLock:
    """Exclusive, non-blocking flock on `.NAME.lock` beside `out`, for the life of a run. The kernel drops it
    when the process dies; the lock file is removed on release."""

    def __init__(self, out):
        self.out = Path(out)
        self.path = sibling(self.out, "lock")
        self.fd = None

    def acquire(self):
        for _ in range(5):
            try:  # never through a link planted at the lock's name: it would create or truncate its target
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise CompruneError(f"{self.path} is a symbolic link, not comprune's lock file: remove it "
                                        "and retry") from None
                raise io_error(e, self.path) from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise CompruneError(f"{self.path} is not a regular file, not comprune's lock file: remove it "
                                    "and retry")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise CompruneError(f"another comprune run is writing {self.out} (it holds {self.path}): wait for "
                                    "it to finish or choose another output") from None
            try:  # the file may have been removed by its previous holder between our open and flock: retry
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    self.fd = fd
                    return self
            except FileNotFoundError:
                pass
            os.close(fd)
        raise CompruneError(f"could not lock {self.path}: another run keeps replacing it; retry")

    def release(self):
        if self.fd is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def leftovers(out, keep_resumable: bool = False) -> list[Path]:
    """What runs on `out` leave beside it: checkpoint, partial and old directories, activation spills, export
    temporaries. With `keep_resumable`, what `--resume` continues from (checkpoint, streamed partial) is kept."""
    out = Path(out)
    b = base_name(out)
    names = [f".{b}.partial-*", f".{b}.old-*", f".{b}.activations", f".{b}.tmp*", f".{b}.probe-*"]
    if not keep_resumable:
        names += [f".{b}.checkpoint", f".{b}.partial-stream"]
    found = []
    for pattern in names:
        for p in out.parent.glob(pattern):
            if keep_resumable and p.name == f".{b}.partial-stream":
                continue
            found.append(p)
    return found


def remove(paths):
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                p.unlink()
            except OSError:
                pass


def _os_error_in(e: BaseException) -> OSError | None:
    """An OSError, or a writer's error that wraps one (safetensors' Rust writer: "... (os error 28)")."""
    if isinstance(e, OSError):
        return e
    m = re.search(r"os error (\d+)", str(e))
    if m:
        code = int(m.group(1))
        return OSError(code, os.strerror(code))
    return None


@contextmanager
def guard_output(out, resume: bool = False, before=None):
    """Hold the output's lock, run `before()` (a refusal raised there leaves everything as it is), clear what
    killed runs left (keeping what --resume needs when resuming), and on an error remove everything this run
    left beside the output. OSErrors become one-line CompruneErrors. KeyboardInterrupt keeps the checkpoint,
    so --resume continues (a kill keeps it too: nothing runs)."""
    out = Path(out)
    with OutputLock(out):
        if before is not None:
            before()
        remove(leftovers(out, keep_resumable=resume))
        try:
            yield out
        except CompruneError as e:
            remove(leftovers(out, keep_resumable=getattr(e, "keep_resumable", False)))
            raise
        except KeyboardInterrupt:
            remove(leftovers(out, keep_resumable=True))
            raise
        except Exception as e:
            remove(leftovers(out))
            os_error = _os_error_in(e)
            if os_error is not None:
                raise io_error(os_error, out) from None
            raise


def follow_umask(path):
    """Directories 0777 and files 0666 less the umask, for `path` and (a directory) everything in it."""
    mask = os.umask(0)
    os.umask(mask)
    path = Path(path)
    items = [path] + (list(path.rglob("*")) if path.is_dir() else [])
    for p in items:
        if p.is_symlink():
            continue
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


_FLOAT_TAG = "$float"


def strict_json(obj, exact: bool = False):
    """`obj` with every non-finite float replaced: by None, or with `exact` by {"$float": "nan" | "inf" | "-inf"}
    (a resume file must give back the very value it saved). Everything else is the same object, so a file
    without non-finite values is byte-identical to json.dumps of `obj`."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return {_FLOAT_TAG: repr(float(obj))} if exact else None
    if isinstance(obj, dict):
        return {k: strict_json(v, exact) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v, exact) for v in obj]
    return obj


def json_text(obj, exact: bool = False, **kw) -> str:
    """json.dumps(obj, **kw) as strict JSON (see strict_json); allow_nan=False guards against a value it missed."""
    return json.dumps(strict_json(obj, exact), allow_nan=False, **kw)


def dump_json(obj, f, exact: bool = False, **kw):
    """json.dump(obj, f, **kw) as strict JSON (see json_text)."""
    json.dump(strict_json(obj, exact), f, allow_nan=False, **kw)


def _exact_float(d: dict):
    return float(d[_FLOAT_TAG]) if len(d) == 1 and isinstance(d.get(_FLOAT_TAG), str) else d


def loads_exact(text: str):
    """What json_text(obj, exact=True) wrote, with its non-finite floats back."""
    return json.loads(text, object_hook=_exact_float)

