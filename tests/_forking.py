"""One fork-and-exit for the test harness's in-process children (tests/_fault_driver.py, tests/_forked_calibration.py):
the child runs `body()` and leaves with its exit code, never returning into the parent's code."""
import os
import sys
import traceback


def fork(body) -> int:
    """The child's pid; in the child, `body()` runs and its return value (or SystemExit's code) is the exit code;
    any other exception is printed and exits 1."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        code = body()
    except SystemExit as e:
        code = e.code
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)
