"""The server's fast path for bootstrap-free linear circuits: the same output ciphertexts as Concrete's runtime,
bit for bit, in about a quarter of the time.

Why it exists. The kernel and linear machines that `molcloak fit` chooses compile to one encrypted-by-clear matrix
product (`FHELinalg.matmul_eint_int`), with no bootstrap and no evaluation keys. Their inputs arrive as *seeded*
LWE ciphertexts (a 16-byte seed and an 8-byte body per encrypted input), and Concrete's runtime spends most of a
request regenerating each input's mask from its seed with a software AES (`concrete_csprng`'s
`SoftwareRandomGenerator`; the concrete-python 2.10 wheel has no AES-NI generator built in), on one core: 58 % of
the profile, against about 1.5 % for the product itself (evaluation/PERFORMANCE.md, session 39). Here the masks
are expanded with OpenSSL's AES (the `cryptography` package, AES-NI where the CPU has it) and the product is exactly
the arithmetic the circuit specifies (mod 2^64): one uint64 matrix product for one output, two float64 BLAS products
of the masks' 32-bit halves for several (`LinearFastPath.product`, exact by a bound checked at load).

What it accepts, and why that is safe:

- Only circuits whose `circuit.mlir` is one function whose body is, line by line, a dense integer constant, an
  optional `to_signed`, one `matmul_eint_int` of the input by that constant, and its return, nothing else; one secret key and no bootstrap, keyswitch or
  packing keys; a seeded input and an uncompressed output (`client.specs.json`). Anything else is not eligible and
  Concrete's runtime serves it as before.
- At load, a self-check: a throwaway key made from the circuit's own client specs encrypts two samples in the
  input's range, Concrete's runtime and this path evaluate them, and the serialized outputs must be equal byte for
  byte. (The product is linear in each input's whole ciphertext, random mask included, so a weight read wrongly
  changes the output with overwhelming probability.) Otherwise this
  path is off (a new concrete-python release that changes the seed expansion or the serialization switches it
  off instead of giving wrong answers). The check also records the exact layout (header, length, trailer) of a
  well-formed input and of the output.
- A request is taken here only when its bytes have exactly that input layout: the same header and trailer and
  the exact length. Anything else (a different shape, an uncompressed ciphertext, truncated or padded bytes) goes
  to Concrete's runtime, which validates it as before (and rejects what it cannot read). Within the layout every byte string is a valid
  seed and body, so a hostile client can only get the product of garbage, as from Concrete.

The server learns nothing more: it computes the same ciphertexts from the same ciphertexts, with no key.
`MOLCLOAK_FAST_PATH=0` turns it off (to compare, or if in doubt).
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import NotEligibleError

HEADER = 0x40  # bytes before the ciphertext payload in a serialized concrete `Value` (a Cap'n Proto message)
# one seeded LWE ciphertext: the mask's seed, then the body (a little-endian u64)
SEED_BYTES, BODY_BYTES = 16, 8
ENV_SWITCH = "MOLCLOAK_FAST_PATH"

_CONSTANT = re.compile(r"^(%\w+) = arith\.constant dense<(.+)> : tensor<(\d+)x(\d+)xi(\d+)>$")
_TO_SIGNED = re.compile(r'^(%\w+) = "FHELinalg\.to_signed"\((%\w+)\) : .*$')
_MATMUL = re.compile(r'^(%\w+) = "FHELinalg\.matmul_eint_int"\((%\w+), (%\w+)\) : .*$')
_RETURN = re.compile(r"^return (%\w+) : .*$")
_FUNC = re.compile(r"^func\.func @\w+\((%\w+): tensor<1x(\d+)x!FHE\.e(s?)int<\d+>>\) -> tensor<1x(\d+)x.*\{$")


def enabled() -> bool:
    """False when the environment turns the fast path off (`MOLCLOAK_FAST_PATH=0`)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def weights_from_mlir(mlir: str) -> np.ndarray:
    """The (inputs, outputs) int64 weight matrix of a circuit that is one `matmul_eint_int` by a constant,
    optionally after `to_signed`; `NotEligibleError` for any other circuit."""
    lines = [line.strip() for line in mlir.strip().splitlines() if line.strip()]
    if len(lines) < 5 or lines[0] != "module {" or lines[-2:] != ["}", "}"]:
        raise NotEligibleError("circuit.mlir is not one function in one module")
    func = _FUNC.match(lines[1])
    if not func:
        raise NotEligibleError("the function does not take one 1xN encrypted tensor")
    arg, rows, cols = func.group(1), int(func.group(2)), int(func.group(4))
    body, constant, current, matmul = lines[2:-2], None, arg, None
    for n, line in enumerate(body, 1):
        if (m := _CONSTANT.match(line)) and constant is None:
            constant = m
        elif (m := _TO_SIGNED.match(line)) and m.group(2) == current and matmul is None:
            current = m.group(1)
        elif (m := _MATMUL.match(line)) and matmul is None and constant and m.group(2) == current:
            if m.group(3) != constant.group(1):
                raise NotEligibleError("the matrix product is not by the constant")
            current = matmul = m.group(1)
        elif (m := _RETURN.match(line)) and matmul and m.group(1) == current and n == len(body):
            break
        else:
            raise NotEligibleError(f"operation not evaluated by the fast path: {line[:80]}")
    else:
        raise NotEligibleError("the function does not return the matrix product")
    shape = (int(constant.group(3)), int(constant.group(4)))
    if shape[0] != rows or shape[1] != cols:
        raise NotEligibleError(f"the constant is {shape}, the function maps {rows} inputs to {cols} outputs")
    return _dense(constant.group(2), shape, int(constant.group(5)))


def _dense(text: str, shape: tuple[int, int], bits: int) -> np.ndarray:
    """An MLIR dense integer literal (hex bytes, a nested list, or one splat value) of iN elements, signed."""
    if not 2 <= bits <= 64:
        raise NotEligibleError(f"the constant's elements are i{bits}")
    if text.startswith('"0x') and text.endswith('"'):
        # bytes per element (MLIR stores i17-i24 in 3 bytes: that ends in a size mismatch below)
        width = next(w for w in (1, 2, 4, 8) if bits <= 8 * w)
        raw = np.frombuffer(bytes.fromhex(text[3:-1]), dtype=f"<u{width}").astype(np.uint64)
        modulus = np.uint64(1) << np.uint64(bits) if bits < 64 else None
        values = (raw % modulus if modulus is not None else raw).astype(np.int64)
        if bits < 64:
            values = np.where(values >= 2 ** (bits - 1), values - 2**bits, values)
    elif re.fullmatch(r"[\s\[\],0-9-]+", text):
        values = [int(v) for v in re.findall(r"(?<![0-9-])-?\d+(?![0-9-])", text)]
        if any(not -(2 ** (bits - 1)) <= v < 2**bits for v in values):
            raise NotEligibleError(f"the constant has a value out of i{bits}")
        values = np.array(values, dtype=np.int64)
    else:
        raise NotEligibleError("the constant is not a dense integer literal")
    if values.size == 1:
        values = np.full(shape[0] * shape[1], values[0], dtype=np.int64)
    if values.size != shape[0] * shape[1]:
        raise NotEligibleError(f"the constant has {values.size} values for shape {shape}")
    return values.reshape(shape)


def _lwe_dimension(specs: dict, rows: int, cols: int) -> int:
    """The LWE dimension of the circuit's one secret key, after checking the specs are what this path handles."""
    keyset, circuits = specs.get("keyset", {}), specs.get("circuits", [])
    if len(keyset.get("lweSecretKeys", [])) != 1 or any(
        keyset.get(k) for k in ("lweBootstrapKeys", "lweKeyswitchKeys", "packingKeyswitchKeys")
    ):
        raise NotEligibleError("the circuit needs evaluation keys")
    if len(circuits) != 1 or len(circuits[0]["inputs"]) != 1 or len(circuits[0]["outputs"]) != 1:
        raise NotEligibleError("the circuit does not have one input and one output")
    (inp,), (out,) = circuits[0]["inputs"], circuits[0]["outputs"]
    inp, out = inp["typeInfo"].get("lweCiphertext"), out["typeInfo"].get("lweCiphertext")
    if not inp or not out or inp.get("compression") != "seed" or out.get("compression") != "none":
        raise NotEligibleError("the input is not a seeded ciphertext or the output is compressed")
    d = int(keyset["lweSecretKeys"][0]["params"]["lweDimension"])
    if (
        inp["abstractShape"]["dimensions"] != [1, rows]
        or out["concreteShape"]["dimensions"] != [1, cols, d + 1]
        or inp["encryption"]["lweDimension"] != d
        or out["encryption"]["lweDimension"] != d
        or "native" not in inp["encryption"]["modulus"]["modulus"]
    ):
        raise NotEligibleError("the ciphertext shapes or keys are not those of the matrix product")
    return d


def _payload_bytes(blob: bytes) -> int:
    """The payload length a serialized `Value`'s header declares (a Cap'n Proto byte-list pointer)."""
    return int.from_bytes(blob[HEADER - 4 : HEADER], "little") >> 3


@dataclass(frozen=True)
class Layout:
    """The bytes around a serialized `Value`'s payload: a well-formed message has exactly these."""

    header: bytes
    payload: int
    trailer: bytes

    @classmethod
    def of(cls, blob: bytes, payload: int) -> Layout:
        if len(blob) < HEADER + payload or _payload_bytes(blob) != payload:
            raise NotEligibleError("the serialized ciphertext does not have the layout this path reads")
        return cls(blob[:HEADER], payload, blob[HEADER + payload :])

    def payload_of(self, blob: bytes) -> memoryview | None:
        """The payload of `blob` when it has exactly this layout, else None."""
        if (
            len(blob) != HEADER + self.payload + len(self.trailer)
            or blob[:HEADER] != self.header
            or blob[HEADER + self.payload :] != self.trailer
        ):
            return None
        return memoryview(blob)[HEADER : HEADER + self.payload]


class LinearFastPath:
    """A self-checked evaluator of one linear circuit: `run(ciphertext bytes)` gives the output bytes, or None
    when the bytes are not a well-formed ciphertext for this circuit (let Concrete's runtime answer)."""

    def __init__(self, weights: np.ndarray, lwe_dimension: int, source: Layout, result: Layout):
        import cryptography.hazmat.primitives.ciphers  # noqa: F401 (fails here, at load, when not installed)

        self.inputs, self.outputs = weights.shape
        self.lwe_dimension = lwe_dimension
        signed = np.ascontiguousarray(weights.T.astype(np.int64))
        self._weights = signed.view(np.uint64)
        # numpy has no BLAS for integers: its uint64 product of 12 outputs by 2,048 inputs (d = 1,014) took 129 ms
        # on this machine, against 20 ms in two float64 BLAS products of the masks' 32-bit halves; 2 outputs (a
        # binary classifier): 23 against 21 ms, 52 against 37 ms at 4,096 inputs; one output: 11 ms in uint64
        # (medians, evaluation/results/fast_path_product_s42.json; `bench.fast_path --product`). Exact while a
        # row's sum of |w| times a half (< 2^32) stays under 2^53, float64's integer range
        self.halves_exact = bool(np.abs(signed).sum(axis=1).max(initial=0) < 2**21)
        self.halves = self.outputs > 1 and self.halves_exact  # the way `product` takes by default
        self._float_weights = signed.astype(np.float64) if self.halves_exact else None
        self.source, self.result = source, result
        # the mask of a seeded ciphertext: AES-128 keyed by its seed over little-endian 128-bit counters from 0,
        # the stream's first byte skipped, read as `lwe_dimension` little-endian u64
        blocks = (1 + 8 * lwe_dimension + 15) // 16
        counters = np.zeros((blocks, 16), dtype=np.uint8)
        counters[:, :8] = np.arange(blocks, dtype="<u8").view(np.uint8).reshape(-1, 8)
        self._counters = counters.tobytes()

    @classmethod
    def for_server(cls, server_zip: str | Path, fhe_server) -> LinearFastPath:
        """The fast path of a compiled `server.zip`, self-checked against `fhe_server` (a `concrete.fhe.Server`
        loaded from it); `NotEligibleError` with the reason when it cannot serve this circuit."""
        with zipfile.ZipFile(server_zip) as archive:
            mlir = archive.read("circuit.mlir").decode()
            specs = json.loads(archive.read("client.specs.json"))
        return cls.from_parts(mlir, specs, fhe_server)

    @classmethod
    def for_circuit(cls, circuit) -> LinearFastPath:
        """The fast path of a compiled `concrete.fhe.Circuit` in memory (what `fit` times before deploying),
        from the same MLIR text and client specs its `server.zip` would hold."""
        specs = json.loads(circuit.server.client_specs.serialize())
        return cls.from_parts(circuit.mlir, specs, circuit.server)

    @classmethod
    def from_parts(cls, mlir: str, specs: dict, fhe_server) -> LinearFastPath:
        """The fast path of a circuit given as its MLIR text and client specs (JSON), self-checked against
        `fhe_server`; `NotEligibleError` with the reason when it cannot serve this circuit."""
        weights = weights_from_mlir(mlir)
        d = _lwe_dimension(specs, *weights.shape)
        encoding = specs["circuits"][0]["inputs"][0]["typeInfo"]["lweCiphertext"]["encoding"]["integer"]
        return cls._self_checked(weights, d, fhe_server, bool(encoding["isSigned"]), int(encoding["width"]))

    @classmethod
    def _self_checked(
        cls, weights: np.ndarray, d: int, fhe_server, signed: bool, width: int
    ) -> LinearFastPath:
        from concrete import fhe

        rows, cols = weights.shape
        client = fhe.Client(fhe_server.client_specs)
        client.keygen()
        rng = np.random.default_rng()
        low, high = (-(2 ** (width - 1)), 2 ** (width - 1) - 1) if signed else (0, 2**width - 1)
        high = min(high, 1)  # small values: the sums stay in the output's range, as in real use
        samples = [
            rng.integers(low, high + 1, size=(1, rows), dtype=np.int64),
            np.full((1, rows), high if high else low, dtype=np.int64),
        ]
        encrypted = [client.encrypt(x).serialize() for x in samples]
        source = Layout.of(encrypted[0], rows * (SEED_BYTES + BODY_BYTES))
        reference = [
            fhe_server.run(fhe.Value.deserialize(blob), evaluation_keys=client.evaluation_keys).serialize()
            for blob in encrypted
        ]
        path = cls(weights, d, source, Layout.of(reference[0], cols * (d + 1) * 8))
        for blob, expected in zip(encrypted, reference):
            if path.run(blob) != expected:
                raise NotEligibleError("self-check failed: the output differs from Concrete's runtime")
        return path

    def product(self, full: np.ndarray, halves: bool | None = None) -> np.ndarray:
        """The weights times the full ciphertexts (inputs, d + 1), mod 2^64: in float64 BLAS on the masks' 32-bit
        halves (`halves=True`; exact only while `halves_exact`), or numpy's uint64 product (`halves=False`).
        None: the faster exact way for this circuit (`self.halves`), as `run` does."""
        halves = self.halves if halves is None else halves
        if halves and not self.halves_exact:
            raise ValueError("a weight row's sum of |w| reaches 2^21: the float64 halves would not be exact")
        if not halves:
            return self._weights @ full
        w = self._float_weights
        low = (w @ (full & np.uint64(0xFFFFFFFF)).astype(np.float64)).astype(np.int64).view(np.uint64)
        high = (w @ (full >> np.uint64(32)).astype(np.float64)).astype(np.int64).view(np.uint64)
        return low + (high << np.uint64(32))

    def run(self, ciphertext: bytes) -> bytes | None:
        payload = self.source.payload_of(ciphertext)
        if payload is None:
            return None
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        d = self.lwe_dimension
        seeded = np.frombuffer(payload, dtype=np.uint8).reshape(self.inputs, SEED_BYTES + BODY_BYTES)
        full = np.empty((self.inputs, d + 1), dtype=np.uint64)
        for i in range(self.inputs):
            aes = Cipher(algorithms.AES(seeded[i, :SEED_BYTES].tobytes()), modes.ECB()).encryptor()
            stream = aes.update(self._counters)
            full[i, :d] = np.frombuffer(stream, dtype="<u8", count=d, offset=1)
        full[:, d] = seeded[:, SEED_BYTES:].copy().view("<u8").ravel()
        product = self.product(full)  # (outputs, d + 1), wrapping mod 2^64 as the circuit does
        return self.result.header + product.astype("<u8", copy=False).tobytes() + self.result.trailer


def load(server_zip: str | Path, fhe_server) -> tuple[LinearFastPath | None, str]:
    """(the fast path, 'linear fast path') for an eligible, self-checked circuit, else (None, why not)."""
    return _engine(lambda: LinearFastPath.for_server(server_zip, fhe_server))


def load_circuit(circuit) -> tuple[LinearFastPath | None, str]:
    """`load` for a compiled `concrete.fhe.Circuit` in memory."""
    return _engine(lambda: LinearFastPath.for_circuit(circuit))


def _engine(make) -> tuple[LinearFastPath | None, str]:
    if not enabled():
        return None, f"off ({ENV_SWITCH}=0)"
    try:
        return make(), "linear fast path"
    except NotEligibleError as exc:
        return None, f"Concrete runtime ({exc})"
    except ImportError:
        return None, "Concrete runtime (the cryptography package is not installed)"
    except Exception as exc:  # noqa: BLE001 (the path is optional: whatever fails, Concrete's runtime serves)
        return (
            None,
            f"Concrete runtime (the fast path could not read the circuit: {type(exc).__name__}: {str(exc)[:120]})",
        )
