"""Test-session set-up shared by every test file.

Without a GPU, the Triton kernels run on CPU tensors under Triton's interpreter: TRITON_INTERPRET
must be set before triton compiles (decorates) any kernel, so it is set here, before the tests
import hot_kernels. With a GPU the Triton kernels run compiled on CUDA tensors instead.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The test suite never compiles hot_kernels._C behind your back (minutes): without a _C for this torch
# the cpu/cuda tests see the backend as unavailable. tests/test_install.py turns it on where it means to.
os.environ.setdefault("HOT_KERNELS_JIT", "0")

# Under pytest-xdist (CI: `pytest -n 2`), the workers share the cores: each takes its share of torch's
# threads, or OpenMP teams spinning on oversubscribed cores would slow every parallel region many
# times over. Tests that need a thread count set it themselves (and restore it).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, torch.get_num_threads() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

# Outputs of the Triton wrappers start as NaN / -2^62 (hot_kernels/triton/_alloc.py): an element a
# kernel leaves unwritten shows in the comparisons instead of passing by luck.
os.environ.setdefault("HOT_KERNELS_POISON", "1")

# Triton decides at decoration time whether a kernel is interpreted: import the kernels now, under
# the setting above, not first inside a test that changes the environment.
import hot_kernels.triton  # noqa: E402,F401


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "large: tensors past 2^31 elements (CPU: < 1 GiB resident, ~15 s); deselect with -m 'not large'")


def pytest_collection_modifyitems(config, items):
    # The `install` tests (a fresh venv and a real compile of hot_kernels._C: minutes) run only when
    # asked for by name: python -m pytest -m install tests/test_install.py
    import pytest

    if "install" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="a real install + compile (minutes): run with -m install")
    for item in items:
        if "install" in item.keywords:
            item.add_marker(skip)


# Hypothesis profiles (tests/test_fuzz.py; explicit @settings in other files take precedence):
#   ci     the default: derandomized (a fixed sequence of examples), bounded, no deadline.
#   long   HOT_KERNELS_FUZZ=long (or --hypothesis-profile=long): 10x the examples, random seeds.
#   quick  HOT_KERNELS_FUZZ=quick: a third of ci's examples (the sanitizer run, scripts/sanitize_cpu.sh).
# test_fuzz.py scales each test's example count by the active profile's max_examples / 100.
from hypothesis import HealthCheck, settings  # noqa: E402

_FUZZ_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("ci", max_examples=100, derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=_FUZZ_HEALTH)
settings.register_profile("long", max_examples=1000, derandomize=False, deadline=None, print_blob=True,
                          suppress_health_check=_FUZZ_HEALTH)
settings.register_profile("quick", max_examples=30, derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=_FUZZ_HEALTH)
settings.load_profile(os.environ.get("HOT_KERNELS_FUZZ", "ci"))


@pytest.fixture
def poison_uninitialised_memory():
    """Every torch.empty / at::empty made while a test runs comes back filled with NaN (integers:
    their largest value), so an output element a kernel never writes cannot pass by luck: the
    C++ backends' outputs included (the Triton wrappers poison theirs too: HOT_KERNELS_POISON above). Opt in
    per module: pytestmark = pytest.mark.usefixtures("poison_uninitialised_memory")."""
    import torch.utils.deterministic as det

    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             det.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    det.fill_uninitialized_memory = saved[2]
