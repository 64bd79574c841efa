"""Copy a model directory as a test-split candidate (issue 16): weights in fp16 safetensors, no ONNX.

    python scripts/pack_candidate.py runs/m candidates/m

The copy keeps config.json (its SHA-256 of the weights updated, the export dropped), manifest.csv,
the gate file of 'pneumoscan calibrate' and MODEL_CARD.md; pneumoscan loads fp16 weights into its
fp32 network (``load_state_dict`` casts). The figures that come back for the copy hold for the
original within fp16 rounding (checked here: the largest probability difference on seeded inputs).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


def main(src: str, dst: str) -> None:
    import numpy as np
    import torch
    from safetensors.torch import load_file, save_file

    from pneumoscan.io import file_digest
    from pneumoscan.nets.checkpoint import load_model

    s, d = Path(src), Path(dst)
    if d.exists():
        raise SystemExit(f"{d} exists; remove it first")
    d.mkdir(parents=True)
    cfg = json.loads((s / "config.json").read_text())
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in load_file(str(s / "model.safetensors")).items()}
    save_file(state, str(d / "model.safetensors"))
    onnx = (cfg.pop("onnx", None) or {}).get("file")
    files = {k: v for k, v in cfg.get("files", {}).items() if k != onnx}
    files["model.safetensors"] = file_digest(d / "model.safetensors")
    cfg["files"] = files
    cfg["weights_dtype"] = "float16 (a test-split candidate copy; the original is fp32)"
    for name in ["manifest.csv", "MODEL_CARD.md", *[k for k in files if k.startswith("ood-")]]:
        if (s / name).is_file():
            shutil.copy2(s / name, d / name)
    (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    a, b = load_model(s), load_model(d)
    size = int(cfg["preprocess"]["size"])
    x = torch.from_numpy(np.random.default_rng(0).normal(0, 1, (8, 3, size, size)).astype(np.float32))
    with torch.inference_mode():
        diff = (a.net(x).softmax(-1) - b.net(x).softmax(-1)).abs().max().item()
    print(f"{d}: {sum(p.stat().st_size for p in d.iterdir()) / 1e6:.1f} MB, max probability difference {diff:.2e}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
