"""Opt-in process tuning."""

import sys

import pytest

from patchforcing.utils.runtime import tune_cpu_allocator


def test_allocator_tuning_is_opt_out_by_env(monkeypatch):
    monkeypatch.setenv("PATCHFORCING_NO_MALLOC_TUNING", "1")
    assert tune_cpu_allocator() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_allocator_tuning_applies_on_glibc(monkeypatch):
    monkeypatch.delenv("PATCHFORCING_NO_MALLOC_TUNING", raising=False)
    assert tune_cpu_allocator() is True
