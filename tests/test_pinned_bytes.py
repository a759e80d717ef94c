"""Pinned bytes: the sha256 of every object a fixed tiny model compresses to, and of what it
materializes to, computed with the code before the speed work (issue 11's speed goals).

Speed work on encode/decode/writers must not change a stored or materialized byte: object ids,
manifest ids and checkpoint files stay exactly these. The model is generated without any RNG library
(sha-256 stream -> fp16/bf16/fp32 values), so the pins do not move with torch or numpy versions.
Shapes exercise padding (K not a multiple of 32), several row tiles (> 256K elements), a one-row
matrix and each input dtype path (fp16, bf16, fp32).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import deltahub
from deltahub.formats.safetensors_io import SafetensorsWriter, TensorSpec

SHAPES = {
    "lm_head.weight": (64, 48),
    "model.embed_tokens.weight": (64, 48),
    "model.layers.0.input_layernorm.weight": (48,),
    "model.layers.0.mlp.down_proj.weight": (48, 1000),
    "model.layers.0.mlp.up_proj.weight": (1000, 48),
    "model.layers.0.mlp.gate_proj.weight": (600, 1000),
    "model.layers.0.self_attn.q_proj.weight": (48, 48),
    "model.layers.0.self_attn.o_proj.weight": (1, 4100),
    "model.norm.weight": (48,),
}


def _uniform(label: str, n: int) -> np.ndarray:
    """``n`` deterministic values in [-0.5, 0.5) from a sha-256 stream (float64)."""
    raw = hashlib.shake_256(label.encode()).digest(2 * n)
    return np.frombuffer(raw, dtype="<u2").astype(np.float64) / 65536.0 - 0.5


def _write(path: Path, dtype: torch.dtype, fine_tune: bool) -> Path:
    path.mkdir(parents=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 48,
              "torch_dtype": str(dtype).removeprefix("torch.")}
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    specs = [TensorSpec(name, dtype, shape) for name, shape in sorted(SHAPES.items())]
    with SafetensorsWriter(path / "model.safetensors", specs, metadata={"format": "pt"}) as w:
        for spec in specs:
            n = int(np.prod(spec.shape))
            w_base = torch.from_numpy(_uniform(spec.name, n) * 0.08).to(torch.float32)
            if fine_tune and not spec.name.endswith("norm.weight"):
                w_base = w_base + torch.from_numpy(_uniform("ft" + spec.name, n) * 0.004).to(torch.float32)
            w.write(spec.name, w_base.to(dtype).reshape(spec.shape).contiguous())
    return path


def _digest_dir(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in sorted(path.iterdir()) if p.is_file()}


CASES = {
    "sign1": ("sign1", None),
    "planes1-row": ("planes", {"planes": 1, "scales": "row"}),
    "planes4-row": ("planes", {"planes": 4, "scales": "row"}),
    "planes2-group": ("planes", {"planes": 2, "scales": "group", "group_size": 64}),
}

# dtype -> case -> manifest id, sha256 of the list of tensor part object ids, materialized files' sha256
# (all truncated to 16 hex digits)
PINS: dict = {
    "torch.bfloat16": {
        "planes1-row": {
            "manifest_id": "950aa9cea077bcd8",
            "materialized": {
                "bfloat16": {
                    "config.json": "0616bc5896800adc",
                    "model.safetensors": "9517904c6388e927"
                },
                "float16": {
                    "config.json": "e1905435d2d7bf8a",
                    "model.safetensors": "663d3f31b6e76729"
                },
                "float32": {
                    "config.json": "1d654a048bdb3d5f",
                    "model.safetensors": "37c4521311195bd2"
                }
            },
            "parts": "1ccd5fc6ff3c1365"
        },
        "planes2-group": {
            "manifest_id": "ef7fbedabdf2144d",
            "materialized": {
                "bfloat16": {
                    "config.json": "0616bc5896800adc",
                    "model.safetensors": "e7d77d29c19c9194"
                },
                "float16": {
                    "config.json": "e1905435d2d7bf8a",
                    "model.safetensors": "9afb3b608036aae0"
                },
                "float32": {
                    "config.json": "1d654a048bdb3d5f",
                    "model.safetensors": "d4c5785cf7f44d29"
                }
            },
            "parts": "ed7b328b71f210b2"
        },
        "planes4-row": {
            "manifest_id": "1f328f25ebf22693",
            "materialized": {
                "bfloat16": {
                    "config.json": "0616bc5896800adc",
                    "model.safetensors": "7088966d41ff797a"
                },
                "float16": {
                    "config.json": "e1905435d2d7bf8a",
                    "model.safetensors": "bf2c80ca7c990228"
                },
                "float32": {
                    "config.json": "1d654a048bdb3d5f",
                    "model.safetensors": "a403c9afdbdc5cfb"
                }
            },
            "parts": "efab45e871035b33"
        },
        "sign1": {
            "manifest_id": "47b5564ff4762de3",
            "materialized": {
                "bfloat16": {
                    "config.json": "0616bc5896800adc",
                    "model.safetensors": "e228efd9db28c4c2"
                },
                "float16": {
                    "config.json": "e1905435d2d7bf8a",
                    "model.safetensors": "6eae6164ee624aa2"
                },
                "float32": {
                    "config.json": "1d654a048bdb3d5f",
                    "model.safetensors": "44636c8adeb20240"
                }
            },
            "parts": "921d2cc808c0c8e2"
        }
    },
    "torch.float16": {
        "planes1-row": {
            "manifest_id": "648484aa7c56c2f7",
            "materialized": {
                "bfloat16": {
                    "config.json": "0616bc5896800adc",
                    "model.safetensors": "77d523b6b9cd8657"
                },
                "float16": {
                    "config.json": "e1905435d2d7bf8a",
                    "model.safetensors": "aad1a4dbeb2e78a6"
                },
                "float32": {
                    "config.json": "1d654a048bdb3d5f",
                    "model.safetensors": "90affc3bf3a96718"
                }
            },
            "parts": "e7175ef25345029c"
        },
        "planes2-group": {
            "manifest_id": "3fe7b271f13826ee",
            "materialized": {
                "bfloat16": {
                    "config.json": "0616bc5896800adc",
                    "model.safetensors": "e3bcabe046a5ff31"
                },
                "float16": {
                    "config.json": "e1905435d2d7bf8a",
                    "model.safetensors": "8791f9fa466638a4"
                },
                "float32": {
                    "config.json": "1d654a048bdb3d5f",
                    "model.safetensors": "46785a40f97eb533"
                }
            },
            "parts": "5e9d9c7d04323851"
        },
        "planes4-row": {
            "manifest_id": "78ae12f15105bcf9",
            "materialized": {
                "bfloat16": {
                    "config.json": "0616bc5896800adc",
                    "model.safetensors": "49974b9e5851fa57"
                },
                "float16": {
                    "config.json": "e1905435d2d7bf8a",
                    "model.safetensors": "35c9e6f63b91ecaa"
                },
                "float32": {
                    "config.json": "1d654a048bdb3d5f",
                    "model.safetensors": "9c44e1dfef031e77"
                }
            },
            "parts": "916435f7c07dc4bc"
        },
        "sign1": {
            "manifest_id": "bebb8172e7f7419f",
            "materialized": {
                "bfloat16": {
                    "config.json": "0616bc5896800adc",
                    "model.safetensors": "713edc157da58927"
                },
                "float16": {
                    "config.json": "e1905435d2d7bf8a",
                    "model.safetensors": "e263847cb32db853"
                },
                "float32": {
                    "config.json": "1d654a048bdb3d5f",
                    "model.safetensors": "6be8df844cfe1c71"
                }
            },
            "parts": "29e4bd403d23db9b"
        }
    },
    "torch.float32": {
        "planes1-row": {
            "manifest_id": "968a72fdad8f3a8d",
            "materialized": {
                "bfloat16": {
                    "config.json": "0616bc5896800adc",
                    "model.safetensors": "eec1a22947922116"
                },
                "float16": {
                    "config.json": "e1905435d2d7bf8a",
                    "model.safetensors": "9673a992b6b7f58f"
                },
                "float32": {
                    "config.json": "1d654a048bdb3d5f",
                    "model.safetensors": "b85604f28b7ecd28"
                }
            },
            "parts": "cef9eb88beb68a0e"
        },
        "planes2-group": {
            "manifest_id": "8cccf98e74e39303",
            "materialized": {
                "bfloat16": {
                    "config.json": "0616bc5896800adc",
                    "model.safetensors": "0b29144c6652aeca"
                },
                "float16": {
                    "config.json": "e1905435d2d7bf8a",
                    "model.safetensors": "0fefe30548fa8c3b"
                },
                "float32": {
                    "config.json": "1d654a048bdb3d5f",
                    "model.safetensors": "b082147542eca22c"
                }
            },
            "parts": "b0e7a5a04f6fd8fa"
        },
        "planes4-row": {
            "manifest_id": "3b9d9fbdcede414c",
            "materialized": {
                "bfloat16": {
                    "config.json": "0616bc5896800adc",
                    "model.safetensors": "98ea574457cf3885"
                },
                "float16": {
                    "config.json": "e1905435d2d7bf8a",
                    "model.safetensors": "41af6eb09b3a639b"
                },
                "float32": {
                    "config.json": "1d654a048bdb3d5f",
                    "model.safetensors": "31e7135881a62b24"
                }
            },
            "parts": "88bad86373777440"
        },
        "sign1": {
            "manifest_id": "779406ae0ce3ee3e",
            "materialized": {
                "bfloat16": {
                    "config.json": "0616bc5896800adc",
                    "model.safetensors": "d5b0df40d5017b33"
                },
                "float16": {
                    "config.json": "e1905435d2d7bf8a",
                    "model.safetensors": "10e072c5b46b6134"
                },
                "float32": {
                    "config.json": "1d654a048bdb3d5f",
                    "model.safetensors": "2290bc905bf7ae1c"
                }
            },
            "parts": "bc48ea7b6c7d0cc5"
        }
    }
}


def _run(tmp_path: Path, dtype: torch.dtype) -> dict:
    base = _write(tmp_path / "base", dtype, False)
    ft = _write(tmp_path / "ft", dtype, True)
    store = deltahub.Store(tmp_path / "store")
    store.add(base, name="base")
    got = {}
    for case, (codec, options) in CASES.items():
        res = store.compress(ft, base="base", name=case, codec=codec, codec_options=options)
        manifest = store._ctx.resolve(case).manifest
        lines = [f"{t}:{p}={oid}" for t, rec in sorted(manifest.tensors.items()) for p, oid in sorted(rec.parts.items())]
        parts = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
        mats = {}
        for out_dtype in ("float16", "float32", "bfloat16"):
            out = tmp_path / f"mat-{case}-{out_dtype}"
            store.materialize(case, out, dtype=out_dtype)
            mats[out_dtype] = _digest_dir(out)
        got[case] = {"manifest_id": res.manifest_id[:16], "parts": parts, "materialized": mats}
    store.close()
    return got


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_pinned_object_and_output_bytes(tmp_path, dtype):
    got = _run(tmp_path, dtype)
    want = PINS.get(str(dtype))
    if want is None:
        pytest.fail("no pins for " + str(dtype) + ":\n" + json.dumps(got, indent=1, sort_keys=True))
    assert got == want
