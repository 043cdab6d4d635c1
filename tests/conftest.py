import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MASKRCNN_SHARED", REPO.parent / "shared"))
PARITY = SHARED / "fixtures" / "matterport-parity"


@pytest.fixture(scope="session")
def parity_dir():
    if not (PARITY / "mask_rcnn_parity_weights.h5").exists():
        pytest.skip(f"Matterport parity fixture not found at {PARITY} (set MASKRCNN_SHARED)")
    return PARITY
