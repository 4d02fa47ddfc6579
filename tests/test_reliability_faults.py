"""Reliability matrix, part 3: faults x writers (prune, prune --stream, export, the first-use model cache).

Faults: SIGKILL at every rename of a tiny run (what `strace -e inject=rename:signal=SIGKILL:when=N` does),
ENOSPC at a rename, writes failing past a file-size limit (a full disk for Python and Rust writers alike), a
read-only output, a busy output (another run holds it), a resume against a different model, the umask.
Each faulted run either resumes to the uninterrupted run's bytes or refuses with one clean line, and leaves
nothing behind. Reliability audit (docs/reliability.md) items 3, 4, 11, 12, 13 and the leftovers of the minor
list."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from _reliability import (assert_clean_error, calib_text, export_ready, jobs, main, prune_args, siblings, strip_manifest,
                          tiny_dir)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    src = tiny_dir(root / "tiny")
    other = tiny_dir(root / "other", seed=1)  # same shapes, different weights
    exportable = export_ready(root / "exportable")
    text = calib_text(root / "calib.txt")
    refs = {"memory": root / "ref-memory", "stream": root / "ref-stream"}
    res = jobs([{"argv": prune_args(src, refs["memory"], text)},
                {"argv": prune_args(src, refs["stream"], text, "--stream")}], root)
    for r in res:
        assert r["rc"] == 0, r["stderr"][-2000:]
    return {"src": src, "other": other, "exportable": exportable, "text": text, "refs": refs, "renames": {
        "memory": res[0]["renames"], "stream": res[1]["renames"]}, "sites": {
        "memory": res[0]["sites"], "stream": res[1]["sites"]}, "root": root}


def output_bytes(d: Path) -> dict:
    """Every file of an output, volatile manifest fields (time, memory) dropped."""
    out = {}
    for f in sorted(d.iterdir()):
        if f.name in ("README.md", "recipe.json"):  # rendered from pruning.json: times, paths, how it ran
            continue
        if f.name == "pruning.json":
            man = strip_manifest(json.loads(f.read_text()))
            man.pop("base_model", None)
            out[f.name] = json.dumps(man, sort_keys=True)
        else:
            out[f.name] = f.read_bytes()
    return out


# ------------------------------------------------------------------------------ kill at every rename (4)
def kill_points(sites: list[str]) -> list[int]:
    """The renames (1-based) at which a streamed run is killed: the first and the last of each rename site
    (_fault_driver.py: the renaming function and the target's name pattern). A site's renames in the blocks
    between run the same code on the same kind of checkpoint; its first and last are where a resume starts
    from nothing and from a finished walk."""
    first, last = {}, {}
    for i, site in enumerate(sites, 1):
        first.setdefault(site, i)
        last[site] = i
    return sorted(set(first.values()) | set(last.values()))


def test_kill_points_cover_every_site():
    sites = ["state", "block#", "acts", "state", "block#", "acts", "state", "out-#", "out-#", "publish"]
    assert kill_points(sites) == [1, 2, 3, 5, 6, 7, 8, 9, 10]


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_kill_at_every_rename_then_resume(env, tmp_path, mode):
    n = env["renames"][mode]
    assert n >= 5, n
    extra = ["--stream"] if mode == "stream" else []
    # in memory: every rename of the run; streamed: every rename site, at its first and last occurrence
    whens = list(range(1, n + 1)) if mode == "memory" else kill_points(env["sites"][mode])
    assert whens[-1] == n and len(set(env["sites"][mode])) >= {"memory": 4, "stream": 7}[mode]  # every kind
    outs = {w: tmp_path / f"k{w}" / "out" for w in whens}
    for o in outs.values():
        o.parent.mkdir()
    killed = jobs([{"argv": prune_args(env["src"], outs[w], env["text"], *extra), "kill_at_rename": w}
                   for w in whens], tmp_path)
    for w, r in zip(whens, killed):
        assert r["rc"] == -9, (w, r["rc"], r["stderr"][-1500:])
    resumed = jobs([{"argv": prune_args(env["src"], outs[w], env["text"], *extra, "--resume")} for w in whens],
                   tmp_path)
    want = output_bytes(env["refs"][mode])
    for w, r in zip(whens, resumed):
        o = outs[w]
        if r["rc"] == 0:
            got = output_bytes(o)
            assert got.keys() == want.keys(), (w, sorted(got), sorted(want))
            diff = [k for k in want if got[k] != want[k]]
            assert not diff, f"kill at rename {w}: resume gave different {diff}"
        else:
            line = assert_clean_error(r["rc"], r["stderr"])
            assert "exists" in line or "resume" in line, (w, line)
        assert siblings(o) <= {o.name}, (w, siblings(o))


# ------------------------------------------------------------------------------ resume identity (3)
@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_resume_refuses_a_different_model(env, tmp_path, mode):
    extra = ["--stream"] if mode == "stream" else []
    out = tmp_path / "out"
    other = shutil.copytree(env["src"], tmp_path / "model")  # the same path is resumed with other weights
    r1, = jobs([{"argv": prune_args(other, out, env["text"], *extra), "kill_at_rename": 5}], tmp_path)
    assert r1["rc"] == -9
    shutil.copy(env["other"] / "model.safetensors", other / "model.safetensors")
    r2, r3 = jobs([{"argv": prune_args(other, out, env["text"], *extra, "--resume")},
                   {"argv": prune_args(env["other"], out, env["text"], *extra, "--resume")}], tmp_path)
    for r in (r2, r3):
        assert_clean_error(r["rc"], r["stderr"], "different")
    assert not out.exists()


# ------------------------------------------------------------------------------ full disk (11)
WRITERS = ["memory", "stream", "export"]


def writer_argv(env, mode, out):
    if mode == "export":
        return ["export", env["exportable"], "--gguf", out]
    return prune_args(env["src"], out, env["text"], *(["--stream"] if mode == "stream" else []))


@pytest.mark.parametrize("fault", ["enospc-first-rename", "enospc-last-rename", "write-limit"])
@pytest.mark.parametrize("mode", WRITERS)
def test_full_disk_is_one_line_and_leaves_nothing(env, tmp_path, mode, fault):
    if mode == "export":
        pytest.importorskip("gguf")
    out = tmp_path / ("m.gguf" if mode == "export" else "out")
    n = {"memory": env["renames"]["memory"], "stream": env["renames"]["stream"], "export": 1}[mode]
    job = {"argv": writer_argv(env, mode, out)}
    if fault == "write-limit":
        job["enospc_on_write_over"] = 64 * 1024
    else:
        job["enospc_at_rename"] = 1 if fault == "enospc-first-rename" else n
    r, again = jobs([job, {"argv": writer_argv(env, mode, out)}], tmp_path)
    assert_clean_error(r["rc"], r["stderr"], out.name)
    # nothing half-written, and a clean error leaves no checkpoint that would make the re-run "interrupted"
    assert again["rc"] == 0, again["stderr"][-1500:]
    assert siblings(out) == {out.name}, siblings(out)


# ------------------------------------------------------------------------------ read-only output (12)
@pytest.fixture
def readonly_dir(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() == 0:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d)], capture_output=True)
        if r.returncode != 0:
            pytest.skip("cannot mount a read-only tmpfs here")
        yield d
        subprocess.run(["umount", str(d)])
    else:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)


@pytest.mark.parametrize("mode", WRITERS)
def test_read_only_output_is_refused_first(env, readonly_dir, tmp_path, capsys, mode):
    out = readonly_dir / ("m.gguf" if mode == "export" else "out")
    argv = writer_argv(env, mode, out)
    if mode != "export":  # a missing calibration file: the output check must speak first, before any work
        argv = prune_args(env["src"], out, tmp_path / "missing.txt", *(["--stream"] if mode == "stream" else []))
    code, err = main(argv, capsys)
    assert_clean_error(code, err, "writ")


@pytest.mark.parametrize("where", ["new", "existing"])
def test_compare_read_only_out_is_refused_first(readonly_dir, tmp_path, capsys, monkeypatch, where):
    from comprune.compare.runner import Comparison

    def no_work(*a, **k):
        raise AssertionError("work started before the output was checked")
    monkeypatch.setattr(Comparison, "prune_run", no_work)
    monkeypatch.setattr(Comparison, "runtime_floor", no_work)
    src = tiny_dir(tmp_path / "tiny", tokenizer=False)
    out = readonly_dir / "cmp" if where == "new" else readonly_dir
    code, err = main(["compare", src, "--out", out, "--methods", "layer-drop", "--ratios", "0.5", "--skip",
                      "ppl,speed,stream,zeroshot,full,llamacpp"], capsys)
    assert_clean_error(code, err, "writ")


# ------------------------------------------------------------------------------ busy output (13)
def _hold_lock(out: Path):
    """Take the lock a comprune run takes on `out` (docs/reliability.md: `.NAME.lock` beside it, flock)."""
    f = open(out.parent / f".{out.name}.lock", "a+")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return f


@pytest.mark.parametrize("planted", ["lock", "export-tmp"])
def test_link_planted_at_a_hidden_name_is_not_followed(env, tmp_path, capsys, planted):
    """A link at `.NAME.lock` (or an export's temporary) must not make comprune create or write its target."""
    mode = "export" if planted == "export-tmp" else "memory"
    out = tmp_path / ("m.gguf" if mode == "export" else "out")
    target = tmp_path / "elsewhere" / "victim"
    target.parent.mkdir()
    name = f".{out.name}.lock" if planted == "lock" else f".{out.name}.tmp{os.getpid()}"
    (out.parent / name).symlink_to(target)
    code, err = main(writer_argv(env, mode, out), capsys)
    assert not target.exists(), "a file was created through the planted link"
    if planted == "lock":
        assert_clean_error(code, err, name, "symbolic link")
        assert not out.exists()
    else:
        assert code == 0, err[-2000:]


@pytest.mark.parametrize("mode", WRITERS)
def test_busy_output_is_refused_at_once(env, tmp_path, capsys, mode):
    out = tmp_path / ("m.gguf" if mode == "export" else "out")
    lock = _hold_lock(out)
    try:
        code, err = main(writer_argv(env, mode, out), capsys)
        assert_clean_error(code, err, "another")
        assert not out.exists()
    finally:
        lock.close()
    code, err = main(writer_argv(env, mode, out), capsys)
    assert code == 0, err[-1500:]
    assert siblings(out) == {out.name}


def test_two_prunes_at_once(env, tmp_path):
    """Two real runs (concurrent processes) into one --out: one finishes, the other refuses at once (not after
    all its work)."""
    out = tmp_path / "out"
    res = [(r["rc"], r["stderr"]) for r in jobs([{"argv": prune_args(env["src"], out, env["text"])}] * 2, tmp_path,
                                                together=True)]
    codes = sorted(c for c, _ in res)
    assert codes[0] == 0, res
    if codes[1] != 0:  # the second one either found the output busy or, started later, already existing
        err = next(e for c, e in res if c != 0)
        line = assert_clean_error(2, err)
        assert "another" in line or "exists" in line, line
    assert siblings(out) == {out.name}


# ------------------------------------------------------------------------------ leftovers (minor list)
def test_killed_export_leaves_nothing_after_a_rerun(env, tmp_path):
    out = tmp_path / "m.gguf"
    r1, r2 = jobs([{"argv": writer_argv(env, "export", out), "kill_at_rename": 1},
                   {"argv": writer_argv(env, "export", out)}], tmp_path)
    assert r1["rc"] == -9 and r2["rc"] == 0, r2["stderr"][-1500:]
    assert siblings(out) == {out.name}, siblings(out)


def test_stale_first_use_conversion_is_cleaned(env, tmp_path, capsys, monkeypatch):
    """A kill during the embedded model's first-use conversion leaves a temporary directory in the cache; the
    next use removes it."""
    from comprune.loading import EMBEDDED
    folder = EMBEDDED["smollm2"][2]
    monkeypatch.setenv("COMPRUNE_CACHE", str(tmp_path / "cache"))
    shutil.copytree(env["src"], tmp_path / "cache" / folder)  # a finished cache (the tiny model stands in)
    stale = tmp_path / "cache" / f".{folder}.k1ll3d"
    stale.mkdir()
    with open(stale / "model.safetensors", "wb") as f:
        f.truncate(64 << 20)  # sparse, as the killed conversion leaves it
    code, err = main(["eval", "smollm2", "--ppl", env["text"], "--seqlen", "32", "--max-tokens", "64"], capsys)
    assert code == 0, err[-1500:]
    assert not stale.exists()


@pytest.mark.parametrize("mode", WRITERS)
def test_outputs_follow_the_umask(env, tmp_path, capsys, mode):
    out = tmp_path / ("m.gguf" if mode == "export" else "out")
    old = os.umask(0o022)
    try:
        code, err = main(writer_argv(env, mode, out), capsys)
    finally:
        os.umask(old)
    assert code == 0, err[-1500:]
    if mode == "export":
        assert out.stat().st_mode & 0o777 == 0o644
    else:
        assert out.stat().st_mode & 0o777 == 0o755
        for f in out.iterdir():
            assert f.stat().st_mode & 0o777 == 0o644, f
