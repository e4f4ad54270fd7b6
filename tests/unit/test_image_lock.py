"""requirements.lock: both images install exactly its versions, the local cluster's offline
builds fetch the same ones, and tools/lock.py --check (run by `make lint`) notices a lock that
pyproject.toml has moved away from."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.fixtures.cluster import load_localcluster

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = {"operator": "operator/Dockerfile", "trainer": "trainer-image/Dockerfile"}
lc = load_localcluster()


def _load_lock_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("graft_lock_tool", REPO / "tools" / "lock.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


lock = _load_lock_tool()
PYPROJECT = (REPO / "pyproject.toml").read_text()
LOCK = (REPO / "requirements.lock").read_text()


def _dockerfile(name: str) -> str:
    """The Dockerfile with its continuation lines joined, as docker reads it."""
    return (REPO / DOCKERFILES[name]).read_text().replace("\\\n", "")


def _stages(text: str) -> list[str]:
    return re.split(r"(?m)^FROM ", text)[1:]


def test_lock_is_current() -> None:
    assert lock.check(PYPROJECT, LOCK) == [], "run `make lock`"


def test_lock_pins_torch_and_its_cuda_runtime() -> None:
    pins = lock.parse_pins(LOCK)
    assert [v for v, _ in pins["torch"]] == ["2.13.0"]  # PyPI's build, not a local `+cpu`
    linux = lock.IMAGE_ENV
    cuda = [n for n, vs in pins.items() if n.startswith("nvidia-") and vs[0][1] is not None]
    assert cuda and all(pins[n][0][1].evaluate(linux) for n in cuda)
    assert "triton" in pins


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        # a new dependency: the recorded digest no longer matches
        (lambda p, lk: (p.replace('"rich>=13",', '"rich>=13",\n  "tqdm>=4",'), lk), "changed"),
        # torch moved on in pyproject.toml and the lock was only re-stamped
        (
            lambda p, lk: (
                p.replace('"torch==2.13.0"', '"torch==2.14.0"'),
                re.sub(
                    r"(?m)^# inputs-sha256: .*$",
                    "# inputs-sha256: "
                    + lock.inputs_digest(
                        lock.lock_inputs(p.replace('"torch==2.13.0"', '"torch==2.14.0"'))
                    ),
                    lk,
                ),
            ),
            "torch==2.14.0: pinned ['2.13.0']",
        ),
        # a pin removed by hand
        (lambda p, lk: (p, re.sub(r"(?m)^peft==.*\n", "", lk)), "peft>=0.17: pinned nowhere"),
        # a lock made with the CPU wheel's folder on uv's find-links
        (
            lambda p, lk: (p, lk.replace("\ntorch==2.13.0\n", "\ntorch==2.13.0+cpu\n")),
            "a local build",
        ),
        (lambda p, lk: (p, lk.replace("# inputs-sha256: ", "# sha: ")), "no '# inputs-sha256:'"),
        (lambda p, lk: (p, lk.replace("\npeft==", "\npeft>=")), "not an exact pin"),
    ],
)
def test_check_notices(edit, problem: str) -> None:
    pyproject, text = edit(PYPROJECT, LOCK)
    assert pyproject != PYPROJECT or text != LOCK
    problems = lock.check(pyproject, text)
    assert any(problem in p for p in problems), problems


def test_check_ignores_order_and_comments() -> None:
    pyproject = PYPROJECT.replace(
        '  "pyyaml>=6",\n  "boto3>=1.34",', '  "boto3 >= 1.34",\n  "pyyaml>=6",  # yaml'
    )
    assert pyproject != PYPROJECT
    assert lock.check(pyproject, LOCK) == []


@pytest.mark.parametrize("name", list(DOCKERFILES))
def test_dockerfile_installs_from_the_lock(name: str) -> None:
    text = _dockerfile(name)
    deps, final = _stages(text)[0], _stages(text)[-1]
    assert "requirements.lock" in re.search(r"(?m)^COPY .*requirements\.lock.*$", deps).group()
    installs = re.findall(r"pip install [^;&\n]*", deps)
    assert installs
    for cmd in installs:  # every dependency install is held to the lock
        assert "-c /src/requirements.lock" in cmd, cmd
    # the project itself goes in without dependencies; the wheelhouse never reaches the image
    assert re.findall(r"pip install [^;&\n]*", final) == [
        "pip install --no-deps --no-build-isolation /src "
    ]
    assert "wheelhouse" not in final and "COPY --from=deps /opt/graft/venv" in final


@pytest.mark.parametrize("name", list(DOCKERFILES))
def test_dockerfile_requirements_are_the_wheelhouse_and_the_locks(name: str, tmp_path) -> None:
    """The requirement list the Dockerfile builds is what the local cluster's wheelhouse
    fetches, and the lock was made from all of it."""
    code = re.search(r"python3 -c '(import tomllib;.*?)'", _dockerfile(name)).group(1)
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code.replace("/src/pyproject.toml", str(tmp_path / "pyproject.toml")), {})
    reqs = out.getvalue().split()
    assert sorted(set(reqs)) == lc.trainer_requirements(PYPROJECT, name)
    assert {lock.Requirement(r).name for r in reqs} <= {
        lock.Requirement(r).name for r in lock.lock_inputs(PYPROJECT)
    }


def test_local_builds_copy_what_the_dockerfiles_copy() -> None:
    for name in DOCKERFILES:
        for line in re.findall(r"(?m)^COPY (?!--from)(.*)$", _dockerfile(name)):
            for src in line.split()[:-1]:
                if "WHEELHOUSE" not in src:
                    assert src.split("/")[0] in lc.CONTEXT_ITEMS, (name, src)


def test_trainer_dockerfile_checks_torch_flavour() -> None:
    text = _dockerfile("trainer")
    assert "ARG TORCH=cuda" in text
    assert re.search(r"want == got or sys\.exit", text)
    assert {v[3] for v in lc.IMAGES.values()} == {"cpu", "cuda", None}
    assert lc.IMAGES["trainer"][3] == "cpu"  # the image the tests and the demo run
