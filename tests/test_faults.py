"""Faults while a run writes, in real child processes: a full disk, Ctrl-C, a killed run and the next one, two runs on
one --out. Each ends in one line and a documented exit code, and leaves nothing half-written beside --out."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import build_peft_adapter

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def slow_inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A model big enough that a run lasts a few seconds (≈ 270 MB of bf16), so it can be interrupted midway."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    root = tmp_path_factory.mktemp("faults")
    base = root / "base"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8000, hidden_size=768, intermediate_size=2048, num_hidden_layers=16,
                         num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(base)
    adapter = build_peft_adapter(root / "adapter", base, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return base, adapter


# Ctrl-C as in a terminal: a shell or CI runner that starts the suite in the background ignores SIGINT, children
# inherit that, and Python then never turns SIGINT into KeyboardInterrupt (the run would just finish).
_TERMINAL_SIGINT = "import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)"


def start(base: Path, adapter: Path, out: Path, *extra: str, prelude: str = "") -> subprocess.Popen:
    code = f"{_TERMINAL_SIGINT}\n{prelude}\nfrom exporter.cli import main\nmain()"
    return subprocess.Popen([sys.executable, "-c", code, "-q", "run", "--base", str(base), "--adapter", str(adapter),
                             "--out", str(out), "--no-progress", "--to", "safetensors", *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def staging_of(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


def wait_for_staged_bytes(out: Path, proc: subprocess.Popen, minimum: int = 1 << 20, timeout: float = 60) -> Path:
    """The run's staging folder, once it holds some data (the run is midway)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        for staging in staging_of(out):
            if sum(p.stat().st_size for p in staging.rglob("*") if p.is_file()) >= minimum:
                return staging
        time.sleep(0.02)
    raise AssertionError("the run never started writing")


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(("error:", "interrupted:", "internal error:"))]


def test_ctrl_c_exits_130_and_leaves_nothing(slow_inputs, tmp_path):
    base, adapter = slow_inputs
    out = tmp_path / "out"
    proc = start(base, adapter, out)
    wait_for_staged_bytes(out, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert error_lines(stderr) == ["interrupted: the run was stopped; nothing was written."], stderr
    assert "Traceback" not in stderr and not out.exists() and leftovers(out) == []


def test_a_killed_run_is_cleaned_up_by_the_next(slow_inputs, tmp_path):
    base, adapter = slow_inputs
    out = tmp_path / "out"
    proc = start(base, adapter, out)
    staging = wait_for_staged_bytes(out, proc)
    proc.kill()
    proc.wait()
    assert staging.is_dir()  # SIGKILL leaves it: nothing can run after that signal
    rerun = start(base, adapter, out, "--parity", "off")
    _, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, stderr
    assert f"removed {staging.name}" in stderr and f"process {proc.pid}" in stderr
    assert (out / "model.safetensors").is_file() and leftovers(out) == []


def test_a_second_run_on_the_same_out_is_refused(slow_inputs, tmp_path):
    base, adapter = slow_inputs
    out = tmp_path / "out"
    first = start(base, adapter, out)
    wait_for_staged_bytes(out, first)
    second = start(base, adapter, out, "--parity", "off")
    _, stderr = second.communicate(timeout=60)
    assert second.returncode == 2, stderr
    assert error_lines(stderr) == [f"error: {out}: is being written by another lora-export run (process "
                                   f"{first.pid}). Fix: wait for it to finish, or choose another --out."]
    _, first_stderr = first.communicate(timeout=300)
    assert first.returncode == 0, first_stderr
    assert (out / "report.json").is_file() and leftovers(out) == []


def test_no_space_while_writing_is_one_line(slow_inputs, tmp_path):
    """The disk fills up midway (simulated in the child: its sixth positional write fails with ENOSPC)."""
    base, adapter = slow_inputs
    out = tmp_path / "out"
    prelude = """
import errno, os
_real, _count = os.pwrite, [0]
def _pwrite(fd, data, offset):
    _count[0] += 1
    if _count[0] > 5:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return _real(fd, data, offset)
os.pwrite = _pwrite
"""
    proc = start(base, adapter, out, "--dtype", "float32", "--parity", "off", prelude=prelude)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr
    lines = error_lines(stderr)
    assert len(lines) == 1 and "No space left on device (ENOSPC)" in lines[0] and "nothing was written" in lines[0]
    assert "Fix: free space on that disk" in lines[0] and "Traceback" not in stderr
    assert not out.exists() and leftovers(out) == []


def _small_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_disk_too_small_is_refused_before_the_merge(slow_inputs, tmp_path, monkeypatch):
    """On a real 4 MB tmpfs when the tests run as root; otherwise the free space the run sees is made small."""
    from click.testing import CliRunner

    from exporter.cli import main

    base, adapter = slow_inputs
    disk = tmp_path / "disk"
    mounted = _small_tmpfs(disk, "4m")
    if not mounted:
        disk.mkdir()
        real = shutil.disk_usage
        monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=4 * 2**20))
    try:
        result = CliRunner().invoke(main, ["-q", "run", "--base", str(base), "--adapter", str(adapter), "--out",
                                           str(disk / "out"), "--no-progress"])
        assert result.exit_code == 2, result.output
        line = error_lines(result.output)[0]
        weights = sum(p.stat().st_size for p in base.glob("*.safetensors"))  # bf16 in, bf16 out
        assert f"the output needs {weights / 1e9:.2f} GB and the disk has 0.00 GB free" in line and "Fix:" in line
        assert list(disk.iterdir()) == []
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=True)


def test_a_disk_that_fills_up_mid_onnx_export_is_one_line(slow_inputs, tmp_path, monkeypatch):
    """A real full disk under the ONNX data file (its own writer, not the positional one above): a 24 MB tmpfs when the tests run as root (the
    pre-flight is told there is room, so the kernel's ENOSPC comes mid-write); otherwise the writer's file write
    raises ENOSPC after a few tensors."""
    import errno

    target = "onnx:fp16"

    from click.testing import CliRunner

    from exporter.cli import main

    base, adapter = slow_inputs
    disk = tmp_path / "disk"
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=2**40))
    mounted = _small_tmpfs(disk, "24m")
    if not mounted:
        disk.mkdir()
        from converters.onnx import weights

        original, calls = weights.DataFile.append, [0]

        def append(self, name, array):
            calls[0] += 1
            if calls[0] > 5:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return original(self, name, array)

        monkeypatch.setattr(weights.DataFile, "append", append)
    try:
        result = CliRunner().invoke(main, ["-q", "run", "--base", str(base), "--adapter", str(adapter), "--out",
                                           str(disk / "out"), "--no-progress", "--parity", "off", "--to", target])
        assert result.exit_code == 2, result.output
        lines = error_lines(result.output)
        assert len(lines) == 1 and "No space left on device (ENOSPC)" in lines[0], result.output
        assert "nothing was written" in lines[0] and "Fix: free space on that disk" in lines[0]
        assert list(disk.iterdir()) == []
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=True)
