"""A streamed prune's calibration child (`python -c "...child_main(...)"`, comprune/calibration.py) run in a
fork of the calling process instead of a new interpreter: the same function in a process of its own, so the
tokenizer's heap still leaves with it, without ~3-6 s of imports per prune. Used by the test harness only
(tests/_fault_driver.py, tests/_reliability.main); the real subprocess stays covered by the tests that run the
CLI in a fresh interpreter (test_stream.py::test_stream_cli_never_imports_transformers_modeling, ...)."""
import os
import subprocess
import sys
import tempfile
from contextlib import contextmanager

from _forking import fork


class ForkedCalibration:
    """Stands in for the `subprocess` module inside comprune.calibration."""
    DEVNULL = subprocess.DEVNULL

    def __init__(self, real_renames=None):
        self.real_renames = real_renames  # (os.replace, os.rename) to restore in the child, if hooked

    def run(self, cmd, **kw):
        if cmd[:2] != [sys.executable, "-c"] or "child_main" not in cmd[2]:
            return subprocess.run(cmd, **kw)
        with tempfile.TemporaryFile() as err:
            def body():
                if self.real_renames:  # a child's renames are not the job's
                    os.replace, os.rename = self.real_renames
                import torch
                torch.set_num_threads(1)  # no thread pool of the parent's survives a fork
                os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
                os.dup2(err.fileno(), 2)
                # the caller's sys.stderr may be pytest's capture buffer, not fd 2
                sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
                from comprune.calibration import child_main
                child_main(*cmd[3:])
                return 0
            pid = fork(body)
            _, status = os.waitpid(pid, 0)
            err.seek(0)
            return subprocess.CompletedProcess(cmd, os.waitstatus_to_exitcode(status), "",
                                               err.read().decode(errors="replace"))


@contextmanager
def forked_calibration():
    """comprune.calibration's child runs as a fork of this process while the context is open."""
    import comprune.calibration
    real = comprune.calibration.subprocess
    comprune.calibration.subprocess = ForkedCalibration()
    try:
        yield
    finally:
        comprune.calibration.subprocess = real
