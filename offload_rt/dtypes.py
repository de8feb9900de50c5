"""The compute dtypes the runtime takes, by the names config.json, the CLI and the wire use
(the names themselves are `config.DTYPE_NAMES`, in the layer without torch)."""

from __future__ import annotations

import torch

from offload_rt.config import DTYPE_NAMES as NAMES

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in NAMES}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
