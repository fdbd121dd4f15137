"""General helpers shared by every domain module: file I/O, seeding, devices, processes, checked compilation.

Nothing here knows about models, objectives or samplers; domain modules import from here, never
the other way round.
"""

from .compile import CompileCheck, checked_compile
from .devices import DeviceError, module_device, resolve_device, torchrun_env
from .io import (
    RunLock,
    RunLockedError,
    atomic_write,
    clean_temp_files,
    ensure_writable_dir,
    is_offline,
    looks_local,
    read_json,
    torch_save_atomic,
    write_json_atomic,
)
from .seeding import hashed_generator, indexed_randn, item_hash

__all__ = [
    "CompileCheck",
    "DeviceError",
    "RunLock",
    "RunLockedError",
    "atomic_write",
    "checked_compile",
    "clean_temp_files",
    "ensure_writable_dir",
    "hashed_generator",
    "indexed_randn",
    "is_offline",
    "item_hash",
    "looks_local",
    "module_device",
    "read_json",
    "resolve_device",
    "torch_save_atomic",
    "torchrun_env",
    "write_json_atomic",
]
