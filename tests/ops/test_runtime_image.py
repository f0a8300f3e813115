"""The Bento's runtime image, read from the Dockerfile BentoML generates (docker cannot run
here): the compilers that build llama-cpp-python are removed after the packages install, and
the container runs as a non-root user."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "docker" / "drop-build-tools.sh"


def _instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", dockerfile)
    result = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


@pytest.fixture(scope="module")
def dockerfile(tmp_path_factory: pytest.TempPathFactory) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCPROXY_")}
    env.update(BENTOML_HOME=str(tmp_path_factory.mktemp("home")), BENTOML_DO_NOT_TRACK="true")
    script = """
import sys
from bentoml.bentos import build_bentofile
from bentoml._internal.container import construct_containerfile
bento = build_bentofile("bentofile.yaml", build_ctx=".")
with construct_containerfile(bento, enable_buildkit=False) as (context, dockerfile):
    sys.stdout.write(open(dockerfile).read())
    import glob, os
    for path in sorted(glob.glob(os.path.join(context, "env", "docker", "script__*"))):
        sys.stdout.write("\\n--- " + os.path.basename(path) + " ---\\n" + open(path).read())
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_compilers_are_removed_after_the_packages_are_built(dockerfile: str) -> None:
    text, _, scripts = dockerfile.partition("\n--- script__")
    steps = _instructions(text)
    runs = [i for i, (keyword, _) in enumerate(steps) if keyword == "RUN"]
    install = next(i for i in runs if "pip install -r" in steps[i][1])
    installs_tools = [i for i in runs if "build-essential" in steps[i][1]]
    drops_tools = [i for i in runs if "./env/docker/script__" in steps[i][1]]
    assert installs_tools and installs_tools[-1] < install  # the compilers are there for the build
    assert drops_tools and drops_tools[-1] > install  # and gone after it
    # Nothing after the removal installs system packages again.
    assert not any("apt-get install" in steps[i][1] for i in runs if i > drops_tools[-1])
    # The script the image runs is this repository's, and it fails the build if a compiler stays.
    assert scripts.partition(" ---\n")[2] == SCRIPT.read_text()
    body = SCRIPT.read_text()
    assert re.search(r"apt-get purge -y --auto-remove build-essential cmake gcc g\+\+", body)
    assert "apt-mark manual libgomp1" in body  # llama.cpp's OpenMP runtime stays
    assert re.search(r"for tool in cc gcc g\+\+ c\+\+ cmake make;.*command -v.*exit 1", body, re.S)


def test_the_container_runs_as_a_non_root_user(dockerfile: str) -> None:
    steps = _instructions(dockerfile.partition("\n--- script__")[0])
    users = [(i, args) for i, (keyword, args) in enumerate(steps) if keyword == "USER"]
    entrypoint = max(i for i, (keyword, _) in enumerate(steps) if keyword == "ENTRYPOINT")
    assert users, "no USER instruction: the container would run as root"
    last_index, last_user = users[-1]
    assert last_index < entrypoint
    assert last_user not in ("root", "0", "0:0") and not last_user.startswith(("root:", "0:"))
    # The user exists: the image creates it before switching to it.
    assert any(keyword == "ARG" and args == f"BENTO_USER={last_user}" for keyword, args in steps)
    assert not any(keyword == "USER" for keyword, _ in steps[last_index + 1 :])
