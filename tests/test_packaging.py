"""The distribution: what `pip install .` puts on a machine (metadata, files, console script, version).

The wheel is built from a copy of the tracked files without the C++ extension (ENGINE_SKIP_EXTENSION=1),
so this runs in seconds; `make install-check` does the whole install into a fresh virtual environment.
"""

import email
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import engine

ROOT = Path(__file__).resolve().parent.parent


def _tracked_copy(dest: Path) -> Path:
    try:
        files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                               capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: cannot list the tracked files")
    for name in files.decode().split("\0"):
        if not name or name.startswith("bench/"):  # bench/ is not part of the distribution
            continue
        src, dst = ROOT / name, dest / name
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    src = _tracked_copy(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("wheel")
    env = {**os.environ, "ENGINE_SKIP_EXTENSION": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(out), str(src)],
        capture_output=True, text=True, env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_installs_kernels_under_the_engine_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert "kernels" not in tops, "a top-level `kernels` package would collide with the PyPI project of that name"
    assert {"engine"} == {t for t in tops if not t.endswith(".dist-info")}
    for needed in ("engine/kernels/__init__.py", "engine/kernels/noisy_batch.py", "engine/kernels/philox_normal.py",
                   "engine/py.typed", "engine/_version.py", "engine/assets/mnist_small/train-images-idx3-ubyte.gz"):
        assert needed in names, needed
    assert not any(n.startswith(("tests/", "bench/", "csrc/")) for n in names)


def test_wheel_metadata(wheel):
    zf = zipfile.ZipFile(wheel)
    info = next(n.split("/")[0] for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
    meta = email.message_from_bytes(zf.read(f"{info}/METADATA"))
    assert meta["Name"] == "pacd-engine"
    assert meta["Version"] == engine.__version__  # one version, read from engine/_version.py
    assert meta["Requires-Python"] == ">=3.11"
    assert meta["License-Expression"] == "MIT"
    requires = meta.get_all("Requires-Dist")
    plain = {r.split(";")[0].split(">")[0].split("<")[0].split("=")[0].strip() for r in requires if "extra ==" not in r}
    assert {"torch", "numpy", "scipy", "safetensors", "tqdm", "matplotlib"} <= plain
    extras = {r.split("extra ==")[1].strip().strip("'\"") for r in requires if "extra ==" in r}
    assert {"triton", "dev"} <= extras
    dev = [r for r in requires if "extra ==" in r and "dev" in r.split("extra ==")[1]]
    assert {"pytest", "pytest-benchmark", "ruff"} <= {r.split(">")[0].split("=")[0].strip() for r in dev}
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in zf.namelist())
    entry = zf.read(f"{info}/entry_points.txt").decode()
    assert "pacd-engine = engine.cli:main" in entry


def test_version_flag():
    for cmd in ([sys.executable, "-m", "engine", "--version"],):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == f"pacd-engine {engine.__version__}"
    script = shutil.which("pacd-engine", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the pacd-engine console script is not installed in this environment")
    proc = subprocess.run([script, "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"pacd-engine {engine.__version__}", proc.stderr
    proc = subprocess.run([script, "certify", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: pacd-engine certify"), proc.stdout + proc.stderr


def test_engine_kernels_from_an_uninstalled_source_tree(tmp_path):
    """From a checkout that was not installed (the repository on sys.path, no install's finder), engine.kernels is
    still the top-level kernels/ folder, and its submodules import under the engine's namespace."""
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import engine.kernels.philox_normal as p\n"
        "import engine\n"
        "print(p.__name__, p.__file__, engine.kernels.__name__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    name, path, package = proc.stdout.split()
    assert name == "engine.kernels.philox_normal" and package == "engine.kernels"
    assert Path(path) == ROOT / "kernels" / "philox_normal.py"


def test_tracked_tree_stays_under_40_mb():
    """The tracked files fit a GPU call (64 MiB) with room to spare: the project keeps them under 40 MB (summaries in
    git, artefacts such as float32 poisons and per-image logs of screens out of it)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    sizes = {n: (ROOT / n).stat().st_size for n in out.decode().split("\0") if n and (ROOT / n).is_file()}
    total = sum(sizes.values())
    largest = sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
    assert total < 40_000_000, f"tracked tree is {total / 1e6:.1f} MB (largest: {largest})"
