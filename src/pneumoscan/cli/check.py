"""pneumoscan check: verify a model directory (hashes, config, manifest, card, ONNX parity) and say what it holds."""
from __future__ import annotations

from .common import add_model_arg


def register(sub) -> None:
    p = sub.add_parser("check", help="verify a model directory and print what it holds")
    add_model_arg(p)
    p.add_argument("--no-parity", action="store_true", help="skip the ONNX-vs-PyTorch parity run (no torch import)")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from ..data.manifest import Manifest
    from ..errors import PneumoscanError
    from ..evaluate.card import render_card
    from ..nets.modeldir import CARD_NAME, onnx_name, read_config, resolve_model_dir, verify_file

    d = resolve_model_dir(args.model)
    cfg = read_config(d)  # format, class order
    results: list[tuple[bool, str]] = []

    def check(ok: bool, text: str) -> None:
        results.append((ok, text))

    for name, digest in (cfg.get("files") or {}).items():
        try:
            verify_file(d, name, cfg)
            check(True, f"{name}: SHA-256 {digest[:16]}... matches config.json")
        except PneumoscanError as e:
            check(False, str(e))
    manifest = d / "manifest.csv"
    if manifest.is_file():
        digest = Manifest.load(manifest).digest()
        same = digest == cfg.get("manifest_sha256")
        check(same or cfg.get("manifest_sha256") is None,
              f"manifest.csv: {'matches' if same else 'does NOT match'} the manifest the model was trained on")
    card = d / CARD_NAME
    if card.is_file():
        fresh = render_card(d, cfg).splitlines()[5:] == card.read_text().splitlines()[5:]  # past the header lines
        check(fresh, f"{CARD_NAME}: {'up to date' if fresh else 'out of date: run pneumoscan card --model ' + str(d)}")
    else:
        check(False, f"{CARD_NAME}: missing; write it with 'pneumoscan card --model {d}'")
    name = onnx_name(cfg)
    if name and not args.no_parity and all(ok for ok, _ in results):
        from ..export.config import ExportConfig
        from ..export.onnx import parity
        from ..nets.checkpoint import load_model

        bundle = load_model(d)
        par = parity(bundle.net.eval(), d / name, int(cfg["preprocess"]["size"]), ExportConfig())
        check(par["passed"], f"{name}: ONNX Runtime vs PyTorch max probability difference {par['max_abs_prob_diff']:.1e} "
              f"(tolerance {par['tolerance']:.0e}), same class: {'yes' if par['same_class'] else 'no'}")
    vm = (cfg.get("val_metrics") or {}).get("normal_vs_pneumonia") or {}
    members = cfg.get("members") or []
    print(f"model {cfg.get('model_id')} ({cfg.get('kind', 'single')}"
          + (f", {len(members)} members" if members else "") + f") in {d}")
    print(f"backbone {cfg.get('backbone') or ', '.join(m.get('backbone', '?') for m in members)}; input "
          f"{cfg['preprocess']['size']} px, intensity {cfg['preprocess'].get('intensity', 'none')}; threshold "
          f"{cfg.get('threshold'):.4f}; ONNX export: {'yes' if name else 'no'}")
    if vm:
        fmt = lambda v: "undefined" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"validation: AUC {fmt(vm.get('auc'))}, sensitivity {fmt(vm.get('sensitivity'))}, specificity "
              f"{fmt(vm.get('specificity'))} ({(cfg.get('val_metrics') or {}).get('n')} images)")
    evals = sorted(p.stem for p in (d / "evaluations").glob("*.json")) if (d / "evaluations").is_dir() else []
    if evals:
        print("stored evaluations: " + ", ".join(evals))
    for ok, text in results:
        print(f"{'ok  ' if ok else 'FAIL'} {text}")
    failed = [t for ok, t in results if not ok]
    if failed:
        raise PneumoscanError(f"{len(failed)} check(s) failed for {d}: {failed[0]}")
    print(json.dumps({"checks": len(results), "failed": 0}))
    return 0
