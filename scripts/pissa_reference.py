"""PEFT's own PiSSA decomposition (peft.utils.loftq_utils._pissa_decomposition, exact SVD) of the matrix
`engine::pissa`'s golden test builds, printed as the test's golden rows.

    python scripts/pissa_reference.py            # needs torch and peft (pip install torch peft)
"""
import math

import torch
from peft.utils.loftq_utils import _pissa_decomposition


def matrix(m, n):
    w = torch.zeros(m, n, dtype=torch.float32)
    for i in range(m):
        for j in range(n):
            w[i, j] = sum(
                0.25**k * math.cos((k + 1.0) * (i + 0.5)) * math.sin((k + 1.3) * (j + 0.7)) for k in range(6)
            )
    return w


for m, n in [(24, 10), (10, 24)]:
    a, b, residual = _pissa_decomposition(matrix(m, n), 3, 2.0, "pissa")
    ba = b @ a
    print(f"({m}, {n}) B·A row 0:", [round(float(x), 7) for x in ba[0]])
    print(f"({m}, {n}) residual row 1:", [round(float(x), 7) for x in residual[1]])
