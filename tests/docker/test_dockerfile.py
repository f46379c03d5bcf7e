"""What can be checked about docker/ without Docker or a GPU."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DOCKERFILE = (DOCKER / "Dockerfile").read_text()


def _setup_kwargs() -> dict:
    """The keyword arguments setup.py passes to setuptools.setup."""
    import setuptools

    with mock.patch.object(setuptools, "setup") as setup:
        code = compile((REPO / "setup.py").read_text(), "setup.py", "exec")
        exec(code, {"__name__": "__main__", "__file__": str(REPO / "setup.py")})
    return setup.call_args.kwargs


def _instructions(name: str) -> list[str]:
    """Arguments of every ``name`` instruction (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    return [line.split(None, 1)[1] for line in text.splitlines() if line.strip().startswith(name + " ")]


def _pin(requirements, package):
    for req in requirements:
        m = re.fullmatch(rf"{re.escape(package)}==(\S+)", req.replace(" ", ""))
        if m:
            return m.group(1)
    raise AssertionError(f"{package} is not pinned in {requirements}")


def test_copied_files_exist_and_are_not_ignored():
    ignored = [p.strip() for p in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
               if p.strip() and not p.startswith("#")]
    copies = _instructions("COPY")
    assert copies, "the Dockerfile copies nothing"
    for args in copies:
        *sources, _dest = shlex.split(args)
        for src in sources:
            assert (REPO / src).exists(), f"COPY {src}: not in the repository"
            assert src.split("/")[0] not in ignored, f"COPY {src}: excluded by Dockerfile.dockerignore"


def test_pins_agree_with_setup_py():
    kw = _setup_kwargs()
    arg = re.search(r"^ARG MEGATRON_CORE_VERSION=(\S+)$", DOCKERFILE, re.M).group(1)
    assert arg == _pin(kw["install_requires"], "megatron-core")
    assert 'megatron-core==${MEGATRON_CORE_VERSION}' in DOCKERFILE
    # megaseg goes in with the extras it declares for GPUs.
    m = re.search(r'-e "\.\[([a-z,]+)\]"', DOCKERFILE)
    extras = m.group(1).split(",")
    assert "gpu" in extras and set(extras) <= set(kw["extras_require"])
    for pkg in ("transformer-engine", "triton"):
        assert pkg in kw["extras_require"]["gpu"]


def test_base_image_has_a_python_megaseg_supports():
    kw = _setup_kwargs()
    assert kw["python_requires"] == ">=3.11"
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", DOCKERFILE, re.M).group(1)
    m = re.fullmatch(r"nvcr\.io/nvidia/pytorch:(\d+)\.(\d+)-py3", base)
    assert m, base
    # NGC PyTorch images carry Python 3.12 from 25.01 on (3.10 before).
    assert (int(m.group(1)), int(m.group(2))) >= (25, 1)


def test_entrypoint_is_installed_and_dispatches(tmp_path):
    entry = DOCKER / "entrypoint.sh"
    assert os.access(entry, os.X_OK)
    assert "COPY docker/entrypoint.sh /usr/local/bin/megaseg-entrypoint" in DOCKERFILE
    assert '["/usr/local/bin/megaseg-entrypoint"]' in DOCKERFILE
    subprocess.run(["bash", "-n", str(entry)], check=True)
    env = dict(os.environ, MEGASEG_HOME=str(REPO))
    out = subprocess.run([str(entry), "python", "-c", "import os; print(os.getcwd())"], env=env,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(REPO)
    out = subprocess.run([str(entry), "gpu-check", "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--smoke" in out.stdout, out.stderr[-2000:]


@pytest.mark.skipif(sys.platform != "linux", reason="bash entry point")
def test_multinode_without_master_addr_or_scontrol_stops_with_a_message(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "MEGASEG_HOME": str(REPO), "SLURM_JOB_ID": "1", "SLURM_NNODES": "2", "NPROC": "1"}
    if subprocess.run(["bash", "-c", "command -v scontrol"], env=env, capture_output=True).returncode == 0:
        pytest.skip("scontrol is installed here")
    out = subprocess.run([str(DOCKER / "entrypoint.sh"), "--train-iters", "1"], env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "MASTER_ADDR" in out.stderr
