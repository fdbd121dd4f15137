"""The general helpers in patchforcing.utils: atomic writes, locks, temp files, writability,
local paths vs hub ids, devices and per-item seeding."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

import patchforcing.utils.io as uio
from patchforcing.data import augment
from patchforcing.utils.devices import DeviceError, resolve_device
from patchforcing.utils.io import (
    RunLock,
    RunLockedError,
    atomic_write,
    clean_temp_files,
    ensure_writable_dir,
    looks_local,
    read_json,
    torch_save_atomic,
    write_json_atomic,
)
from patchforcing.utils.seeding import hashed_generator, indexed_randn, item_hash

_TORCH_SHORT_WRITE = (
    "[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file data/3: "
    "file write failed, unexpected pos 65536 vs 131072"
)

# --------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------


def test_full_disk_is_an_enospc_error_naming_the_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"old")

    def short_write(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise RuntimeError(_TORCH_SHORT_WRITE)

    with pytest.raises(OSError) as err:
        atomic_write(target, short_write)
    assert err.value.errno == errno.ENOSPC
    assert str(target) in str(err.value) and "no space left" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
    assert target.read_bytes() == b"old"


def test_full_disk_through_torch_save(tmp_path, monkeypatch):
    def failing_save(obj, f, *args, **kwargs):
        raise RuntimeError(_TORCH_SHORT_WRITE)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError) as err:
        torch_save_atomic({"w": torch.zeros(3)}, tmp_path / "sub" / "last.pt")
    assert err.value.errno == errno.ENOSPC and str(tmp_path / "sub" / "last.pt") in str(err.value)
    assert list((tmp_path / "sub").iterdir()) == []


def test_other_write_errors_pass_through_unchanged(tmp_path):
    def broken(tmp):
        raise RuntimeError("something else")

    with pytest.raises(RuntimeError, match="^something else$"):
        atomic_write(tmp_path / "x", broken)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_follows_the_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        path = atomic_write(tmp_path / "f.bin", lambda tmp: open(tmp, "wb").close())
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_json_round_trip_and_bad_json_names_the_file(tmp_path):
    obj = {"a": [1, 2.5, None], "b": {"c": "d"}}
    path = write_json_atomic(tmp_path / "x.json", obj)
    assert read_json(path) == obj
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(ValueError, match=f"^{tmp_path / 'bad.json'} is not valid JSON"):
        read_json(tmp_path / "bad.json")


def test_clean_temp_files_removes_only_atomic_write_leftovers(tmp_path):
    left = [tmp_path / ".last.pt.abc123.tmp", tmp_path / ".model.safetensors.x.tmp"]
    kept = [tmp_path / "last.pt", tmp_path / "notes.tmp", tmp_path / ".hidden"]
    for p in left + kept:
        p.write_bytes(b"x")
    (tmp_path / ".dir.tmp").mkdir()  # a directory is never removed
    assert sorted(clean_temp_files(tmp_path)) == sorted(left)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".dir.tmp"] + [p.name for p in kept])
    assert clean_temp_files(tmp_path / "missing") == []


# --------------------------------------------------------------------------------------------
# writability
# --------------------------------------------------------------------------------------------


def test_ensure_writable_dir_creates_and_checks(tmp_path):
    d = ensure_writable_dir(tmp_path / "a" / "b")
    assert d.is_dir() and list(d.iterdir()) == []  # the probe file is gone
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=f"output directory {tmp_path / 'file'} exists and is not a directory"):
        ensure_writable_dir(tmp_path / "file")


def test_ensure_writable_dir_on_a_read_only_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: a read-only directory is still writable")
        with pytest.raises(PermissionError, match=f"^run directory {ro} is not writable$"):
            ensure_writable_dir(ro, "run directory")
        with pytest.raises(PermissionError, match="is not writable"):
            ensure_writable_dir(ro / "sub", "run directory")
    finally:
        ro.chmod(0o755)


# --------------------------------------------------------------------------------------------
# the run lock (flock: released by the OS when the holder dies)
# --------------------------------------------------------------------------------------------

_TRY_LOCK = textwrap.dedent(
    """
    import sys, time
    from patchforcing.utils.io import RunLock, RunLockedError
    try:
        lock = RunLock(sys.argv[1]).acquire()
    except RunLockedError as e:
        print("LOCKED:", e, flush=True)
        sys.exit(3)
    print("ACQUIRED", flush=True)
    if sys.argv[2] == "hold":
        time.sleep(600)
    """
)


def _run_lock_script(directory, mode):
    return subprocess.Popen([sys.executable, "-c", _TRY_LOCK, str(directory), mode], stdout=subprocess.PIPE, text=True)


def test_run_lock_refuses_a_second_holder_in_another_process(tmp_path):
    with RunLock(tmp_path):
        proc = _run_lock_script(tmp_path, "try")
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 3
        assert out.startswith(f"LOCKED: {tmp_path} is in use by another process (pid {os.getpid()})")
    proc = _run_lock_script(tmp_path, "try")  # released on exit of the with block
    out, _ = proc.communicate(timeout=120)
    assert (proc.returncode, out) == (0, "ACQUIRED\n")


def test_run_lock_is_released_when_the_holder_is_killed(tmp_path):
    proc = _run_lock_script(tmp_path, "hold")
    try:
        assert proc.stdout.readline() == "ACQUIRED\n"
        with pytest.raises(RunLockedError, match=f"pid {proc.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        proc.kill()
        proc.wait(timeout=60)
        proc.stdout.close()
    lock = RunLock(tmp_path).acquire()  # no stale lock left behind
    lock.release()


# --------------------------------------------------------------------------------------------
# local paths vs hub ids
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source, local",
    [
        ("stabilityai/sd-vae-ft-ema", False),
        ("someone/pft-b-2", False),
        ("hf://someone/repo/model.safetensors", False),
        ("runs/exp1/checkpoints/last.pt", True),
        ("exports/model.safetensors", True),
        ("someone/pft.ckpt", True),
        ("data/latents.npz", True),
        ("./runs/x", True),
        ("../x", True),
        ("/abs/path", True),
        ("~/weights", True),
        ("C:\\weights\\x", True),
        ("runs/typo", False),  # no extension, does not exist: may be a hub id
    ],
)
def test_looks_local(source, local):
    assert looks_local(source) is local


def test_looks_local_for_an_existing_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "name").mkdir()
    assert looks_local("owner/name") is True
    assert looks_local("owner/other") is False


def test_is_offline_switches(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    assert uio.is_offline() is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert uio.is_offline() is False
    monkeypatch.setenv("DIFFUSERS_OFFLINE", "True")
    assert uio.is_offline() is True


# --------------------------------------------------------------------------------------------
# devices
# --------------------------------------------------------------------------------------------


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(DeviceError, match="unknown device 'bogus'"):
        resolve_device("bogus")
    with pytest.raises(DeviceError, match="'cuda' requested but CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="CUDA is not available"):
        resolve_device("cuda:1")


# --------------------------------------------------------------------------------------------
# per-item seeding
# --------------------------------------------------------------------------------------------


def test_item_hash_known_values():
    # computed with data/augment.item_hash before it moved to utils.seeding: must never change
    assert item_hash() == 0
    assert item_hash(0) == 0xE220A8397B1DCDAF
    assert item_hash(1) == 0x910A2DEC89025CC1
    assert item_hash(-1) == 0xE4D971771B652C20
    assert item_hash(2**64 + 7) == 0x63CBE1E459320DD7
    assert item_hash(1, 2, 3) == 0xD0734750FDE362B3
    assert item_hash(3, 2, 1) == 0xD62A7F6E291FEF64
    assert item_hash(0x5F1A9E3700000001, 0, 0, 5) == 0x10049F461015B1A9
    assert augment.item_hash is item_hash
    assert [augment.hflip_flag(0, 0, i) for i in range(8)] == [True, False, True, True, True, False, False, False]


def test_hashed_generator_bits():
    h = item_hash(4, 5)
    assert hashed_generator(4, 5).initial_seed() == h
    assert hashed_generator(4, 5, bits=63).initial_seed() == h & ((1 << 63) - 1)
    with pytest.raises(ValueError, match="bits must be 63 or 64"):
        hashed_generator(1, bits=32)


def test_indexed_randn_rows_do_not_depend_on_the_batch():
    full = indexed_randn(7, 3, [0, 1, 2, 3, 4], (2, 3))
    assert full.shape == (5, 2, 3) and full.dtype == torch.float32
    assert torch.equal(indexed_randn(7, 3, [4, 1], (2, 3)), full[[4, 1]])
    assert torch.equal(indexed_randn(7, 3, [2], (2, 3))[0], full[2])
    assert torch.equal(full[3], torch.randn(2, 3, generator=hashed_generator(7, 3, 3)))
    assert not torch.equal(indexed_randn(7, 4, [0], (2, 3))[0], full[0])  # the seed matters
    assert not torch.equal(indexed_randn(8, 3, [0], (2, 3))[0], full[0])  # so does the salt


def test_auto_precision_uses_bf16_only_where_it_is_native():
    from patchforcing.utils.devices import auto_precision, cpu_has_native_bf16

    amx = "processor : 0\nflags : fpu sse avx2 avx512f amx_bf16 amx_tile\n"
    zen4 = "flags\t\t: fpu avx2 avx512f avx512_bf16\n"
    avx2 = "flags\t\t: fpu sse avx avx2 fma\n"
    assert [cpu_has_native_bf16(c) for c in (amx, zen4, avx2, "")] == [True, True, False, False]
    cpu = torch.device("cpu")
    assert [auto_precision(cpu, c) for c in (amx, zen4, avx2)] == ["bf16", "bf16", "fp32"]
    assert auto_precision(torch.device("cuda"), avx2) == "bf16"
