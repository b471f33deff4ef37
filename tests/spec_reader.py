"""A .ctraj reader written from docs/format.md alone: numpy, json, hashlib, zipfile and numcodecs' zstd.

It imports nothing from trajstore, so it is the independent reference the conformance tests hold
trajstore to (and what a reader in another language would do). Arithmetic follows §7 step by step
with IEEE round-to-nearest-even after every operation; bfloat16, which numpy lacks, is carried in
float32 arrays and rounded back to bfloat16 after every operation (exact: float32 holds every
bfloat16 sum or product to more than twice bfloat16's precision, so the double rounding is harmless).
"""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
from pathlib import Path

import numpy as np

# safetensors dtype name -> numpy dtype used to carry the values (BF16 in float32)
CARRY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.float32}
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


class Source:
    """Byte reads and listing over the directory form or the single-file (zip) form (§1, §6)."""

    def __init__(self, path):
        self.path = Path(path)
        self.zip = None
        if self.path.is_file():
            with open(self.path, "rb") as f:
                self.zip = zipfile.ZipFile(self.path) if f.read(4) == b"PK\x03\x04" else None

    def read(self, key: str) -> bytes:
        return self.zip.read(key) if self.zip else (self.path / key).read_bytes()

    def exists(self, key: str) -> bool:
        return key in self.zip.namelist() if self.zip else (self.path / key).is_file()

    def listdir(self, key: str) -> list[str]:
        if not self.zip:
            return sorted(p.name for p in (self.path / key).iterdir())
        prefix = key.rstrip("/") + "/"
        return sorted({n[len(prefix):].split("/")[0] for n in self.zip.namelist() if n.startswith(prefix)})


def bf16_round(x) -> np.ndarray:
    """float32 (or float64) values rounded to the nearest bfloat16, ties to even, as float32."""
    x = np.asarray(x)
    if x.dtype == np.float64:  # one rounding straight from float64: drop 45 of its 52 fraction bits
        bits = x.view(np.uint64)
        bits = (bits + np.uint64((1 << 44) - 1) + ((bits >> np.uint64(45)) & np.uint64(1))) & ~np.uint64((1 << 45) - 1)
        return bf16_round(bits.view(np.float64).astype(np.float32))  # now exact in float32
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


def bf16_from_bits(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def bf16_to_bits(x: np.ndarray) -> np.ndarray:
    return (bf16_round(x).view(np.uint32) >> 16).astype(np.uint16)


def to_bits(x: np.ndarray, dtype: str) -> np.ndarray:
    """The stored bit pattern of values of a layer dtype (for exact comparisons and for expected files)."""
    if dtype == "BF16":
        return bf16_to_bits(x)
    return np.ascontiguousarray(x, dtype=CARRY[dtype]).view({8: np.uint64, 4: np.uint32, 2: np.uint16}[ITEMSIZE[dtype]])


def rnd(x, dtype: str):
    """One IEEE rounding of x to the layer dtype (carried in CARRY[dtype])."""
    return bf16_round(x) if dtype == "BF16" else np.asarray(x).astype(CARRY[dtype])


def lerp(x: np.ndarray, y: np.ndarray, w: float, dtype: str) -> np.ndarray:
    """§7 step 4: x + w*(y-x) if w < 0.5 else y - (1-w)*(y-x); the factor rounded to dtype, then every
    operation rounded to dtype (numpy ufuncs round each result; nothing is fused)."""
    d = rnd(y - x, dtype)
    if w < 0.5:
        return rnd(x + rnd(d * rnd(np.float64(w), dtype), dtype), dtype)
    return rnd(y - rnd(d * rnd(np.float64(1.0) - np.float64(w), dtype), dtype), dtype)


def trajectory_betas(traj, epochs) -> np.ndarray:
    """§5 from a raw trajectory (K+1 timesteps of per-layer arrays or tensors), in plain loops: float64
    step norms, each piece's cumulative share of its length, the linear schedule where S = 0."""
    steps = [[np.asarray(x, dtype=np.float64) for x in step] for step in traj]
    K, L = len(steps) - 1, len(steps[0])
    norms = np.array([[float(np.sqrt(np.sum((steps[t + 1][l] - steps[t][l]) ** 2))) for l in range(L)]
                      for t in range(K)])
    beta = np.zeros((K + 1, L))
    for a, b in zip(epochs, epochs[1:]):
        for l in range(L):
            total = sum(norms[a:b, l])
            for t in range(a + 1, b):
                beta[t, l] = sum(norms[a:t, l]) / total if total > 0 else (t - a) / (b - a)
    beta[K] = 1.0
    return beta


def weights(beta: np.ndarray, epochs: list[int], c: float) -> tuple[int, np.ndarray]:
    """§7 steps 1-3: the piece containing c and w per layer (float64)."""
    if not 0 <= c <= epochs[-1]:
        raise ValueError(f"c={c} outside [0, {epochs[-1]}]")
    j = min(max(i for i, e in enumerate(epochs) if e <= c), len(epochs) - 2)
    b = epochs[j + 1]
    lo, hi = math.floor(c), math.ceil(c)
    eta = c - lo
    beta_lo = beta[lo]
    beta_hi = np.ones_like(beta_lo) if hi == b else beta[hi]
    return j, (1 - eta) * beta_lo + eta * beta_hi


def parse_safetensors(data: bytes, layers: list[dict]) -> list[np.ndarray]:
    """§4: 8-byte little-endian header length, JSON header, raw little-endian tensors."""
    (hlen,) = np.frombuffer(data[:8], dtype="<u8")
    header = json.loads(data[8 : 8 + int(hlen)])
    base = 8 + int(hlen)
    out = []
    for layer in layers:
        entry = header[layer["name"]]
        assert entry["dtype"] == layer["dtype"] and entry["shape"] == layer["shape"], (entry, layer)
        begin, end = entry["data_offsets"]
        raw = data[base + begin : base + end]
        if layer["dtype"] == "BF16":
            values = bf16_from_bits(np.frombuffer(raw, dtype="<u2"))
        else:
            values = np.frombuffer(raw, dtype=np.dtype(CARRY[layer["dtype"]]).newbyteorder("<"))
        out.append(values.astype(CARRY[layer["dtype"]]).reshape(layer["shape"]))
    return out


def read_zarr_array(src: Source, prefix: str) -> np.ndarray:
    """A zarr v3 array from its zarr.json and chunk files (regular grid, default key encoding,
    codecs: bytes then optional zstd), decoded with numcodecs' zstd."""
    from numcodecs import Zstd

    meta = json.loads(src.read(f"{prefix}/zarr.json"))
    assert meta["zarr_format"] == 3 and meta["node_type"] == "array"
    dtype = np.dtype(meta["data_type"])
    shape = tuple(meta["shape"])
    chunk = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
    sep = meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
    out = np.full(shape, meta["fill_value"], dtype=dtype)
    grid = [range(math.ceil(s / c)) for s, c in zip(shape, chunk)]
    for index in np.ndindex(*[len(g) for g in grid]):
        key = f"{prefix}/c{sep}" + sep.join(str(i) for i in index)
        if not src.exists(key):
            continue
        data = src.read(key)
        endian = "<"
        for codec in reversed(meta["codecs"]):
            if codec["name"] == "zstd":
                data = Zstd().decode(data)
            elif codec["name"] == "bytes":
                endian = {"little": "<", "big": ">"}[codec.get("configuration", {}).get("endian", "little")]
            else:
                raise NotImplementedError(codec["name"])
        values = np.frombuffer(data, dtype=dtype.newbyteorder(endian)).reshape(chunk)
        where = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(index, chunk, shape))
        out[where] = values[tuple(slice(0, w.stop - w.start) for w in where)]
    return out


class SpecStore:
    """The store as §1-§5 describe it: metadata, experts in id order, verified files."""

    def __init__(self, path):
        self.src = Source(path)
        root = json.loads(self.src.read("zarr.json"))
        self.meta = root["attributes"]["trajstore"]
        assert self.meta["format"] == "ctraj" and self.meta["complete"] is True
        self.layers = self.meta["layers"]
        self.K = self.meta["num_timesteps"] - 1
        self.epochs = self.meta["anchor_epochs"]
        names = [n for n in self.src.listdir("experts") if n.isdigit()]
        self.ids = sorted(int(n) for n in names if self.src.exists(f"experts/{n}/zarr.json"))
        self.names = {int(n): n for n in names}

    def expert_files(self, expert_id: int) -> tuple[str, dict[str, str]]:
        prefix = f"experts/{self.names[expert_id]}"
        info = json.loads(self.src.read(f"{prefix}/zarr.json"))["attributes"]["trajstore_expert"]
        assert info["id"] == expert_id
        return prefix, info["files"]

    def verified(self, expert_id: int, rel: str) -> bytes:
        prefix, files = self.expert_files(expert_id)
        data = self.src.read(f"{prefix}/{rel}")
        assert hashlib.sha256(data).hexdigest() == files[rel], f"{prefix}/{rel} fails its checksum"
        return data

    def anchor(self, position: int, epoch: int) -> list[np.ndarray]:
        expert_id = self.ids[position]
        data = self.verified(expert_id, f"anchor_{epoch:04d}.safetensors")
        return parse_safetensors(data, self.layers)

    def beta(self, position: int) -> np.ndarray:
        expert_id = self.ids[position]
        prefix, files = self.expert_files(expert_id)
        for rel in files:
            if rel.startswith("beta/"):
                self.verified(expert_id, rel)
        return read_zarr_array(self.src, f"{prefix}/beta")

    def theta(self, position: int, c: float, dtype: str | None = None) -> list[np.ndarray]:
        """theta(c) per layer, in the layer dtype or the requested one (a safetensors dtype name)."""
        j, w = weights(self.beta(position), self.epochs, c)
        A = self.anchor(position, self.epochs[j])
        B = self.anchor(position, self.epochs[j + 1])
        out = []
        for layer, x, y, wl in zip(self.layers, A, B, w):
            t = dtype or layer["dtype"]
            out.append(lerp(rnd(x, t), rnd(y, t), float(wl), t))
        return out
