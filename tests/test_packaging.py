"""What a new user meets first: the built distributions, and a missing optional extra.

The sdist and the wheel are built here with the installed setuptools (`--no-isolation`: no
network), as a release would build them.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return sdist, wheel, done.stdout + done.stderr


def test_the_distribution_is_coalesce_cache_with_license_and_classifiers(
    built: tuple[Path, Path, str],
) -> None:
    sdist, wheel, output = built
    assert sdist.name == "coalesce_cache-0.2.0.tar.gz"
    assert wheel.name == "coalesce_cache-0.2.0-py3-none-any.whl"
    assert "SetuptoolsDeprecationWarning" not in output
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = Parser().parsestr(archive.read(meta_name).decode())
    assert meta["Name"] == "coalesce-cache" and meta["License-Expression"] == "MIT"
    classifiers = meta.get_all("Classifier") or []
    assert "Typing :: Typed" in classifiers and "Framework :: FastAPI" in classifiers
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert "coalesce/py.typed" in names and "coalesce/fastapi/route.py" in names
    assert not any(n.startswith("tests/") for n in names)  # the wheel is the package only


def test_the_sdist_carries_what_its_tests_need(built: tuple[Path, Path, str]) -> None:
    sdist, _, _ = built
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {
        "tests/conftest.py",
        "tests/redis_servers.py",
        "tests/nginx_server.py",
        "tests/nginx_app.py",
        "LICENSE",
        "CHANGELOG.md",
    } <= names
    assert {n for n in names if n.startswith("tests/test_")} == {
        "tests/" + p.name for p in (ROOT / "tests").glob("test_*.py")
    }


# what users install: the dependencies and these extras (not test, bench, demo)
_USER_EXTRAS = {"fastapi", "starlette", "flask", "django", "prometheus", "otel"}


def test_every_declared_floor_is_pinned_in_ci_lowest_txt(
    built: tuple[Path, Path, str],
) -> None:
    """`.ci/lowest.txt` pins each floor (`>=X`) of the wheel's requirements at exactly X, so
    a run of the suite on it tests what `pip install coalesce-cache` may give.
    (The floor `redis>=5.0` was wrong: redis-py 5.0.0 has no `Redis.from_pool`, and 5.0.x
    answers a wrong password with "No connection available.")"""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    _, wheel, _ = built
    with zipfile.ZipFile(wheel) as archive:
        (meta_name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        meta = Parser().parsestr(archive.read(meta_name).decode())
    floors: dict[str, Version] = {}
    for line in meta.get_all("Requires-Dist") or []:
        requirement = Requirement(line)
        marker = str(requirement.marker or "")
        if requirement.name == "coalesce-cache" or (
            marker and not any(f'extra == "{extra}"' in marker for extra in _USER_EXTRAS)
        ):
            continue
        (floor,) = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        floors[canonicalize_name(requirement.name)] = Version(floor)
    pinned: dict[str, Version] = {}
    for line in (ROOT / ".ci" / "lowest.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pinned[canonicalize_name(name)] = Version(version)
    assert {"redis", "cachetools", "msgpack", "fastapi", "django"} <= floors.keys()
    assert {name: pinned.get(name) for name in floors} == floors


def _without(module: str, code: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter where `module` cannot be imported."""
    blocked = f"import sys; sys.modules[{module!r}] = None\n"
    return subprocess.run(
        [sys.executable, "-c", blocked + code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_import_coalesce_fastapi_without_fastapi_names_the_extra() -> None:
    done = _without("fastapi", "import coalesce.fastapi")
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("coalesce.errors.MissingDependencyError: coalesce.fastapi needs")
    assert "pip install 'coalesce-cache[fastapi]'" in last


@pytest.mark.parametrize("module", ["httpx", "uvicorn", "fastapi"])
def test_the_demo_without_its_extra_exits_2_naming_it(module: str) -> None:
    done = _without(module, "import sys\nfrom coalesce.cli import main\nsys.exit(main(['demo']))")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"coalesce: error: the demo needs {module}, which the 'fastapi' extra installs: "
        "pip install 'coalesce-cache[fastapi]'"
    ]
