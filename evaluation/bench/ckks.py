"""The CKKS recipe of the earlier TenSEAL-based tools, as a benchmark peer of molcloak.

A float MLP with the degree-3 sigmoid approximation 0.5 + 0.197x - 0.004x^3 after each layer
(regression: after the hidden layer only, the output stays linear), trained in float on the
same features as molcloak. Inference on a TenSEAL CKKS vector: poly modulus 16384, coefficient
moduli [40, 30, 30, 30, 30, 30, 30, 40], scale 2^30, Galois keys, each layer `enc.mm(W) + b`
then `polyval`. The server half gets the public context (no secret key) and ciphertexts only.

TenSEAL is an optional dependency (`pip install -e ".[bench]"`); `available()` says whether it
is installed so the benchmark can skip this row with a reason instead of failing.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

SIGMOID3 = (0.5, 0.197, 0.0, -0.004)  # polyval coefficients, lowest degree first
POLY_MODULUS = 16384
COEFF_MODULI = (40, 30, 30, 30, 30, 30, 30, 40)
SCALE_BITS = 30


def available() -> str | None:
    """None when TenSEAL can be imported, else the reason (for the benchmark's skip note)."""
    try:
        import tenseal  # noqa: F401
    except ImportError as exc:
        return f'tenseal is not installed ({exc}); install it with pip install -e ".[bench]"'
    return None


def sigmoid3(x: torch.Tensor) -> torch.Tensor:
    return SIGMOID3[0] + SIGMOID3[1] * x + SIGMOID3[3] * x**3


class PolyMLP(nn.Module):
    """n_in -> hidden -> n_out with the cubic sigmoid approximation after each layer."""

    def __init__(self, n_in: int, hidden: int, n_out: int, regression: bool):
        super().__init__()
        self.fc1, self.fc2, self.regression = nn.Linear(n_in, hidden), nn.Linear(hidden, n_out), regression

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = sigmoid3(self.fc1(x))
        out = self.fc2(h)
        return out if self.regression else sigmoid3(out)


def train_poly_mlp(
    X: np.ndarray,
    y: np.ndarray,
    n_out: int,
    regression: bool,
    hidden: int = 32,
    epochs: int = 200,
    seed: int = 0,
) -> PolyMLP:
    """Float training (Adam, full batch). Classification: BCE on the approximated sigmoid outputs
    (clipped into (0, 1), one output per class); regression: MSE on the standardized target."""
    torch.manual_seed(seed)
    model = PolyMLP(X.shape[1], hidden, n_out, regression)
    Xt = torch.as_tensor(X, dtype=torch.float32)
    if regression:
        target = torch.as_tensor(y, dtype=torch.float32).reshape(-1, 1)
    else:
        target = torch.nn.functional.one_hot(torch.as_tensor(y, dtype=torch.long), n_out).float()
    optim = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(epochs):
        optim.zero_grad()
        out = model(Xt)
        if regression:
            loss = nn.functional.mse_loss(out, target)
        else:
            loss = nn.functional.binary_cross_entropy(out.clamp(1e-4, 1 - 1e-4), target)
        loss.backward()
        optim.step()
    model.eval()
    return model


def plain_forward(model: PolyMLP, X: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(X, dtype=torch.float32)).numpy().astype(np.float64)


class CkksHalves:
    """Client and server halves of the CKKS model, with the interface of `predict.run_encrypted`."""

    def __init__(self, model: PolyMLP):
        self.w1 = model.fc1.weight.detach().numpy().T.astype(np.float64).tolist()
        self.b1 = model.fc1.bias.detach().numpy().astype(np.float64).tolist()
        self.w2 = model.fc2.weight.detach().numpy().T.astype(np.float64).tolist()
        self.b2 = model.fc2.bias.detach().numpy().astype(np.float64).tolist()
        self.regression = model.regression
        self.secret_context = None  # client side: holds the secret key

    def keygen(self) -> tuple[float, bytes]:
        """Client side: a fresh context; returns (seconds, public context = what the server receives)."""
        import tenseal as ts

        start = time.perf_counter()
        ctx = ts.context(
            ts.SCHEME_TYPE.CKKS, poly_modulus_degree=POLY_MODULUS, coeff_mod_bit_sizes=list(COEFF_MODULI)
        )
        ctx.global_scale = 2**SCALE_BITS
        ctx.generate_galois_keys()
        seconds = time.perf_counter() - start
        self.secret_context = ctx
        return seconds, ctx.serialize(
            save_public_key=True, save_secret_key=False, save_galois_keys=True, save_relin_keys=True
        )

    def load_keys(self, public_context: bytes):
        import tenseal as ts

        return ts.context_from(public_context)

    def encrypt(self, x: np.ndarray) -> bytes:
        import tenseal as ts

        return ts.ckks_vector(self.secret_context, np.ravel(x).astype(np.float64).tolist()).serialize()

    def run(self, ciphertext: bytes, server_context) -> bytes:
        """Server side: deserialize, two layers of `mm(W) + b` then `polyval`, serialize."""
        import tenseal as ts

        enc = ts.ckks_vector_from(server_context, ciphertext)
        h = (enc.mm(self.w1) + self.b1).polyval(list(SIGMOID3))
        out = h.mm(self.w2) + self.b2
        if not self.regression:
            out = out.polyval(list(SIGMOID3))
        return out.serialize()

    def decrypt(self, ciphertext: bytes) -> np.ndarray:
        import tenseal as ts

        return np.asarray(
            ts.ckks_vector_from(self.secret_context, ciphertext).decrypt(), dtype=np.float64
        ).reshape(1, -1)
