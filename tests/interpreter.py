"""Triton launchers on CPU tensors under TRITON_INTERPRET=1.

TRITON_INTERPRET must be set before triton is first imported (triton.language's own helpers
are decorated at import), so a test file that checks launchers runs itself again in a
subprocess with it set (`run_under_interpreter`); its numerics tests, marked
`needs_interpreter`, run only in that subprocess.
"""
import os
import subprocess
import sys

import pytest

UNDER_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not UNDER_INTERPRETER, reason="runs in the TRITON_INTERPRET=1 subprocess")
not_in_subprocess = pytest.mark.skipif(UNDER_INTERPRETER, reason="this is the subprocess")


def run_under_interpreter(test_file, tmp_path):
    """pytest on test_file with TRITON_INTERPRET=1; asserts that it passed."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    # cwd outside the repository: `python -m pytest` puts cwd on sys.path, and from the
    # repository root that would import the source tree instead of the installed package
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(test_file)],
                            cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
    assert " passed" in result.stdout, result.stdout[-2000:]
