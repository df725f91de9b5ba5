import gc
import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", max_examples=30, derandomize=True, deadline=None, print_blob=True)
settings.register_profile("nightly", max_examples=500, deadline=None)
settings.register_profile("dev", max_examples=10, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tests on one torch thread: the property tests' networks are tiny,
    and on a busy machine a second intra-op thread makes each op wait for it (10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_LARGE_MODELS = ("test_zoo", "test_timm", "test_hf", "test_untouched")


@pytest.fixture(autouse=True)
def _collect_large_models(request):
    """After a test that builds large models, collect garbage: torch.fx graphs are cyclic,
    so a pruned GraphModule (and its weights) is freed only by the cycle collector, and
    a run of several-GB models would otherwise pile up until it happens to run."""
    yield
    if request.module.__name__.rsplit(".", 1)[-1] in _LARGE_MODELS:
        gc.collect()
