"""The CLI keeps freed tensor memory in the process (backend.retain_freed_memory): glibc's
default returns each freed multi-megabyte tensor to the kernel, and the next one faults its
pages in again, 10 times as many page faults in `bdiff sample` (NOTES.md)."""
import subprocess
import sys

import pytest

CHURN = """
import resource, sys
import numpy as np
from bdiff.backend import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(100):
    batch = np.ones((10_000, 130), dtype=np.float32)  # one sampler pass's first-layer input
    layer = batch[:, :128] * 2.0
    del batch, layer
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode, env=None):
    run = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True, env=env)
    return int(run.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_tensor_memory_is_reused_without_faulting_it_in_again():
    default, retained = _page_faults("default"), _page_faults("retain")
    assert retained * 5 < default, (retained, default)


def test_a_users_own_allocator_settings_are_left_alone(monkeypatch):
    from bdiff.backend import retain_freed_memory
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert not retain_freed_memory()
