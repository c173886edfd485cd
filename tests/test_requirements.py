"""The torch pin: setup.py and the import-time check agree, and an old torch stops `import dinov2`
with one line naming the version needed."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dinov2 import MIN_TORCH, MIN_TORCH_REASONS, check_torch_version

REPO = Path(__file__).resolve().parents[1]
NEEDED = ".".join(map(str, MIN_TORCH))


@pytest.mark.parametrize("version", ["2.7.1", "2.7.1+cu126", "2.5.0+cpu", "1.13.1"])
def test_an_older_torch_is_refused_in_one_line(version):
    with pytest.raises(ImportError) as error:
        check_torch_version(version)
    assert str(error.value) == f"dinov2 needs torch>={NEEDED} ({MIN_TORCH_REASONS}); found {version}: pip install -U 'torch>={NEEDED}'"


@pytest.mark.parametrize(
    "version", [f"{NEEDED}.0", f"{NEEDED}.0a0+git1234abc", "2.10.0", "2.11.0a0+gitdeadbee", "2.13.0+cpu", "3.0.0", "nightly"]
)
def test_the_minimum_and_newer_builds_pass(version):
    check_torch_version(version)  # "2.10" is newer than "2.8": versions compare as numbers, not text


def test_setup_py_pins_the_same_minimum():
    pins = re.findall(r'"torch>=([\d.]+)"', (REPO / "setup.py").read_text())
    assert pins == [NEEDED]


@pytest.mark.slow
def test_import_stops_on_an_old_installed_torch():
    fake_old_torch = "import importlib.metadata as m; m.version = lambda name: '2.6.0+cu124'; import dinov2"
    proc = subprocess.run([sys.executable, "-c", fake_old_torch], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"ImportError: dinov2 needs torch>={NEEDED} ({MIN_TORCH_REASONS}); found 2.6.0+cu124: pip install -U 'torch>={NEEDED}'"
    )
