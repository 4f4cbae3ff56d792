"""Knowledge-guided mask rectification (seed Sec. 3.5, Eq. 12).

In sampling-step order (row i = step i, row i+1 = the next, less noisy step) the rule m[t,b] = 0 if
m[t,b+1] = 0 and m[t-1,b] = 1 reads: unit b's fresh output at step i is needed neither by unit b+1 at step i
(which reuses its cache) nor by unit b at step i+1 (which recomputes), so unit b can skip at step i.

Order matters because each rectification can enable or disable others: rows go from the last sampling step back
to the first, units from the last down to the first, each decision seeing the already rectified entries.
The last step (no next step to refresh for) and the last unit (feeds the output layer) are left alone, and so is
step 0, which has no cache to reuse.
"""
from __future__ import annotations

import torch

from .maskfile import as_mask_matrix


def rectify(mask) -> torch.Tensor:
    m = as_mask_matrix(mask).clone()
    steps, units = m.shape
    for i in range(steps - 2, 0, -1):
        for b in range(units - 2, -1, -1):
            if m[i, b] and not m[i, b + 1] and m[i + 1, b]:
                m[i, b] = False
    return m
