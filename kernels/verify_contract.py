"""What both verification implementations share: the result type and the DeepSpec constants.

The torch rules (``engine/spec_decode/rejection.py``, the CPU path and the reference) and the Triton
kernel (``kernels/rejection.py``) return the same ``VerifyResult`` and apply the same two floors, so
both are defined here, below both (kernels/ imports nothing from engine/: docs/architecture.md).
Source of the constants: DeepSpec section 2 step 11 (shared/DEEPSPEC_FORMAT.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

Q_FLOOR = 1e-8  # DeepSpec: p / max(q, 1e-8)
RESIDUAL_MIN_MASS = 1e-8  # DeepSpec: fall back to p_a below this residual mass


@dataclass(frozen=True)
class VerifyResult:
    """Emitted tokens of R requests.

    Attributes:
        token_ids: ``[R, 1 + max l_r]`` int64: accepted drafts, then the recovered / bonus token, then
            padding (0); ``num_accepted + 1`` entries of row r are real.
        num_accepted: ``[R]`` int64 accepted drafts a.
    """

    token_ids: Tensor
    num_accepted: Tensor
