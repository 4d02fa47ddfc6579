"""Run many `comprune` CLI invocations fast, each in a forked child, with faults injected.

Usage: python _fault_driver.py SPEC.json  (prints one JSON result per job on stdout, as a list), or
python _fault_driver.py --serve: one interpreter for a whole test session (tests/_reliability.py): reads one
SPEC path per line on stdin ({"jobs": [...], "environ": {...}, "cwd": "...", "together": false}: the caller's
environment and directory, which every job starts from; with `together` all jobs run at once), writes the
results to SPEC.out and prints `done SPEC`.

SPEC is a list of jobs: {"argv": [...], "env": {...}, "cwd": "...", "stdin": "...",
"kill_at_rename": N, "enospc_at_rename": N, "enospc_on_write_over": BYTES}.

The parent imports torch, transformers and comprune once (it never runs a torch op, so forking is safe), then
forks one child per job. In the child:
- `kill_at_rename=N`: the N-th call of os.replace/os.rename (Path.replace, Path.rename, shutil.move) delivers
  SIGKILL to the process instead of renaming (what `strace -e inject=rename:signal=SIGKILL:when=N` does);
- `enospc_at_rename=N`: the N-th rename raises OSError(ENOSPC) instead;
- `enospc_on_write_over=B`: RLIMIT_FSIZE caps every file at B bytes and SIGXFSZ is ignored, so a larger write
  (from Python or from safetensors' Rust writer) fails with EFBIG, as a full disk fails a write with ENOSPC.
A streamed prune's calibration child (`python -c "...child_main(...)"`, comprune/calibration.py) runs in a
fork of the job instead of a new interpreter: the same function in a process of its own, without ~3 s of
imports per run (its renames are not counted, as they were not in a child process). The real subprocess
is exercised by the in-process CLI tests.
Each result holds the exit code (negative: killed by that signal), stderr, stdout, the number of renames and
their sites: one label per rename, the comprune function that renamed and the target's name with digits as #
(so the per-block renames of one checkpoint step share a label; see rename_sites).
"""
import errno
import json
import os
import re
import resource
import signal
import sys
import tempfile

from _forked_calibration import ForkedCalibration
from _forking import fork

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

for mod in ("torch", "safetensors.torch", "transformers", "transformers.models.llama.modeling_llama",
            "transformers.models.auto.tokenization_auto", "tokenizers", "comprune", "comprune.cli",
            "comprune.cli_prune", "comprune.prune", "comprune.stream", "comprune.methods", "comprune.export.gguf"):
    try:
        __import__(mod)
    except ImportError:
        pass


def _site(dst) -> str:
    """Where a rename comes from: the innermost comprune function on the stack, and the target's name with its
    digits and random parts as # (a checkpoint's per-block files, temporary names)."""
    frame = sys._getframe(2)
    while frame is not None and "comprune" not in frame.f_code.co_filename:
        frame = frame.f_back
    where = f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_code.co_name}" if frame else "?"
    name = re.sub(r"[0-9]+", "#", os.path.basename(os.fspath(dst)))
    return f"{where} -> {re.sub(r'[a-z_]*#[a-z0-9_#]*', '#', name) if name.startswith('.') else name}"


def _child(job: dict, count_path: str):
    import torch
    torch.set_num_threads(1)
    counter = {"n": 0}
    real_replace, real_rename = os.replace, os.rename

    def hook(real):
        def fn(src, dst, *a, **kw):
            counter["n"] += 1
            n = counter["n"]
            with open(count_path, "a") as f:
                f.write(_site(dst) + "\n")
            if job.get("kill_at_rename") == n:
                os.kill(os.getpid(), signal.SIGKILL)
            if job.get("enospc_at_rename") == n:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
            return real(src, dst, *a, **kw)
        return fn

    os.replace, os.rename = hook(real_replace), hook(real_rename)
    import comprune.calibration
    comprune.calibration.subprocess = ForkedCalibration((real_replace, real_rename))
    if job.get("enospc_on_write_over"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        limit = int(job["enospc_on_write_over"])
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    from comprune.cli import main
    return main(job["argv"])


def run(jobs: list[dict], environ: dict | None = None, cwd: str | None = None, together: bool = False) -> list[dict]:
    """The jobs one after the other, or (`together`) all started at once and then waited for."""
    with tempfile.TemporaryDirectory() as tmp:
        if together:
            started = [_start(job, os.path.join(tmp, str(i)), environ, cwd) for i, job in enumerate(jobs)]
            return [_finish(*s) for s in started]
        return [_finish(*_start(job, os.path.join(tmp, str(i)), environ, cwd)) for i, job in enumerate(jobs)]


def _start(job: dict, tmp: str, environ, cwd) -> tuple[int, str]:
    os.mkdir(tmp)
    out, err, cnt = (os.path.join(tmp, n) for n in ("out", "err", "count"))
    stdin = os.path.join(tmp, "in")
    with open(stdin, "w") as f:
        f.write(job.get("stdin", ""))
    def body():
        os.dup2(os.open(stdin, os.O_RDONLY), 0)
        os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT), 1)
        os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT), 2)
        if environ is not None:
            os.environ.clear()
            os.environ.update(environ)
        os.environ.update(job.get("env", {}))
        if job.get("cwd") or cwd:
            os.chdir(job.get("cwd") or cwd)
        return _child(job, cnt)
    pid = fork(body)
    return pid, tmp


def _finish(pid: int, tmp: str) -> dict:
    _, status = os.waitpid(pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    read = lambda n: open(os.path.join(tmp, n), errors="replace").read() \
        if os.path.exists(os.path.join(tmp, n)) else ""  # noqa: E731
    sites = read("count").splitlines()
    return {"rc": rc, "stdout": read("out"), "stderr": read("err"), "renames": len(sites), "sites": sites}


def serve():
    for line in sys.stdin:
        path = line.strip()
        if not path:
            continue
        with open(path) as f:
            batch = json.load(f)
        results = run(batch["jobs"], batch.get("environ"), batch.get("cwd"), batch.get("together", False))
        with open(path + ".out", "w") as f:
            json.dump(results, f)
        print(f"done {path}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        serve()
    else:
        with open(sys.argv[1]) as f:
            jobs = json.load(f)
        print(json.dumps(run(jobs)))
