"""`scripts/release-check`, the release checklist in one command (issue 13)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "release-check"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COALESCE_")}
    env["PYTHON"] = sys.executable  # check with the interpreter running the tests
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_release_check_passes_against_a_real_redis_and_prints_the_tag_command() -> None:
    done = run("--skip-tests")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "two processes, one computation: ok" in done.stdout
    import coalesce

    version = coalesce.__version__
    assert f"git tag -a v{version} -m 'coalesce-cache {version}'" in done.stdout


def test_release_check_refuses_an_unknown_option() -> None:
    done = run("--fast")
    assert done.returncode == 2
    assert "unknown option --fast" in done.stderr
