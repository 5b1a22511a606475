"""One writer per output: results logs, training checkpoints and poison checkpoints are locked while written."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import engine
from engine import data, models
from engine.cli import run_certify
from engine.fileio import ExclusiveLock, FileInUseError


def test_lock_excludes_a_second_writer_and_names_the_first(tmp_path):
    target = tmp_path / "out.tsv"
    with ExclusiveLock(target):
        with pytest.raises(FileInUseError, match=rf"out.tsv is being written by another process \(pid {os.getpid()}\)"):
            ExclusiveLock(target).acquire()
    with ExclusiveLock(target):  # released on exit
        pass


def test_a_killed_writer_leaves_no_stale_lock(tmp_path):
    target = tmp_path / "ckpt.safetensors"
    code = (
        "import time\nfrom engine.fileio import ExclusiveLock\n"
        f"held = ExclusiveLock({str(target)!r}).acquire()\nprint('held', flush=True)\ntime.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(FileInUseError, match=f"pid {child.pid}"):
            ExclusiveLock(target).acquire()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    deadline = time.time() + 10
    while True:  # the kernel drops the lock with the process
        try:
            ExclusiveLock(target).acquire().release()
            break
        except FileInUseError:
            assert time.time() < deadline
            time.sleep(0.05)


def test_certify_log_and_training_checkpoint_refuse_a_concurrent_run(tmp_path):
    images, labels = data.load_mnist(data.embedded_mnist_root(), "test")
    model = models.mlp_mnist().eval()
    out = tmp_path / "run.tsv"
    kw = dict(sigma=0.5, n0=5, n=10, alpha=0.01, batch_size=None, seed=0, show_progress=False)
    with ExclusiveLock(out):
        with pytest.raises(FileInUseError):
            run_certify(model, images, labels, [0, 1], out, {"s": 1}, **kw)
    assert not out.exists()  # nothing was touched
    summ = run_certify(model, images, labels, [0, 1], out, {"s": 1}, **kw)
    assert summ["images"] == 2 and summ["planned_images"] == 2

    x, y = data.load_mnist(data.embedded_mnist_root(), "train")
    ckpt = tmp_path / "train.ckpt.safetensors"
    args = dict(method="gaussian", sigma=0.25, epochs=1, batch_size=32, checkpoint=ckpt)
    net = models.mlp_mnist()
    with ExclusiveLock(ckpt):
        with pytest.raises(FileInUseError):
            engine.train(net, (x[:64], y[:64]), **args)
    assert not ckpt.exists() and all(p.is_contiguous() for p in net.parameters())
    _, hist = engine.train(net, (x[:64], y[:64]), **args)
    assert len(hist) == 1 and ckpt.exists()
    assert torch.isfinite(torch.tensor(hist[0]["loss"]))


def test_lock_is_keyed_on_the_file_not_the_name(tmp_path):
    """A second writer through a symbolic link (or another spelling of the path) to the same file is refused."""
    real = tmp_path / "runs" / "out.tsv"
    real.parent.mkdir()
    real.write_text("")
    link = tmp_path / "link.tsv"
    link.symlink_to(real)
    with ExclusiveLock(real):
        with pytest.raises(FileInUseError, match=r"link.tsv \(that is .*runs/out.tsv\) is being written"):
            ExclusiveLock(link).acquire()
        with pytest.raises(FileInUseError):
            ExclusiveLock(tmp_path / "runs" / ".." / "runs" / "out.tsv").acquire()
    dir_link = tmp_path / "alias"
    dir_link.symlink_to(real.parent)
    with ExclusiveLock(dir_link / "out.tsv"):
        with pytest.raises(FileInUseError):
            ExclusiveLock(real).acquire()


def test_a_clean_release_removes_the_lock_file(tmp_path):
    target = tmp_path / "out.tsv"
    lock = ExclusiveLock(target).acquire()
    assert lock.path.exists() and lock.path.read_text() == str(os.getpid())
    lock.release()
    assert list(tmp_path.iterdir()) == []
    with ExclusiveLock(target):  # and it can be taken again
        pass
    assert list(tmp_path.iterdir()) == []


def test_lock_follows_hard_links_and_names_an_uncreatable_lock(tmp_path):
    a = tmp_path / "a.tsv"
    a.write_text("x")
    b = tmp_path / "b.tsv"
    os.link(a, b)
    with ExclusiveLock(a):
        with pytest.raises(FileInUseError, match="the same file under another name"):
            ExclusiveLock(b).acquire()
    fresh = tmp_path / "new.tsv"  # created after locking: bind() takes its identity
    lock = ExclusiveLock(fresh).acquire()
    fresh.write_text("")
    lock.bind()
    os.link(fresh, tmp_path / "other.tsv")
    with pytest.raises(FileInUseError):
        ExclusiveLock(tmp_path / "other.tsv").acquire()
    lock.release()
    ExclusiveLock(tmp_path / "other.tsv").acquire().release()
    with pytest.raises(OSError, match="cannot create the lock file"):
        ExclusiveLock("/proc/engine-test/r.tsv").acquire()
