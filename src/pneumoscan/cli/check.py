"""pneumoscan check: verify a model directory (config values, hashes, manifest, card, stored evaluations, ONNX
parity) and say what it holds."""
from __future__ import annotations

from .common import add_model_arg


def register(sub) -> None:
    p = sub.add_parser("check", help="verify a model directory and print what it holds")
    add_model_arg(p)
    p.add_argument("--no-parity", action="store_true", help="skip the ONNX-vs-PyTorch parity run (no torch import)")
    p.set_defaults(func=run)


def _number(v, digits: int) -> str:
    """A recorded figure for the summary lines; anything else (a corrupt config) as it stands."""
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else repr(v)


def run(args) -> int:
    import json

    from ..errors import PneumoscanError
    from ..evaluate.card import EVAL_DIR, evaluation_files, manifest_facts, read_evaluation, render_card
    from ..nets.modeldir import CARD_NAME, CONFIG_NAME, config_problems, onnx_name, read_config, resolve_model_dir, verify_file

    d = resolve_model_dir(args.model)
    cfg = read_config(d, check_values=False)  # format and class order; the values are checks of their own
    results: list[tuple[bool, str]] = []

    def check(ok: bool, text: str) -> None:
        results.append((ok, text))

    problems = config_problems(cfg, d)
    for text in problems:
        check(False, text)
    if not problems:
        check(True, f"{CONFIG_NAME}: threshold, calibration, prediction sets, gate and preprocessing in range")
    for name, digest in (cfg.get("files") or {}).items():
        try:
            verify_file(d, name, cfg)
            check(True, f"{name}: SHA-256 {digest[:16]}... matches config.json")
        except PneumoscanError as e:
            check(False, str(e))
    check(*_manifest_check(manifest_facts(d / "manifest.csv"), cfg.get("manifest_sha256")))
    card = d / CARD_NAME
    if card.is_file():
        fresh = render_card(d, cfg).splitlines()[5:] == card.read_text().splitlines()[5:]  # past the header lines
        check(fresh, f"{CARD_NAME}: {'up to date' if fresh else 'out of date: run pneumoscan card --model ' + str(d)}")
    else:
        check(False, f"{CARD_NAME}: missing; write it with 'pneumoscan card --model {d}'")
    evals = evaluation_files(d)
    for path in evals:
        try:
            read_evaluation(path, cfg)
            check(True, f"{EVAL_DIR}/{path.name}: a stored evaluation of this model")
        except PneumoscanError as e:
            check(False, str(e))
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
    prep = cfg.get("preprocess") if isinstance(cfg.get("preprocess"), dict) else {}
    print(f"model {cfg.get('model_id')} ({cfg.get('kind', 'single')}"
          + (f", {len(members)} members" if members else "") + f") in {d}")
    print(f"backbone {cfg.get('backbone') or ', '.join(m.get('backbone', '?') for m in members)}; input "
          f"{prep.get('size')} px, intensity {prep.get('intensity', 'none')}; threshold "
          f"{_number(cfg.get('threshold'), 4)}; ONNX export: {'yes' if name else 'no'}")
    if vm:
        fmt = lambda v: "undefined" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"validation: AUC {fmt(vm.get('auc'))}, sensitivity {fmt(vm.get('sensitivity'))}, specificity "
              f"{fmt(vm.get('specificity'))} ({(cfg.get('val_metrics') or {}).get('n')} images, at threshold "
              f"{_number(vm.get('threshold', cfg.get('threshold')), 4)})")
    if evals:
        print("stored evaluations: " + ", ".join(p.stem for p in evals))
    for ok, text in results:
        print(f"{'ok  ' if ok else 'FAIL'} {text}")
    failed = [t for ok, t in results if not ok]
    if failed:
        raise PneumoscanError(f"{len(failed)} check(s) failed for {d}: {failed[0]}")
    print(json.dumps({"checks": len(results), "failed": 0}))
    return 0


def _manifest_check(facts: dict | None, recorded: str | None) -> tuple[bool, str]:
    """(passed, line) for the model's manifest.csv (:func:`pneumoscan.evaluate.card.manifest_facts`) against
    the hash config.json records. Only a model whose config records no training manifest (an ensemble of
    members trained on different splits) may lack the file."""
    if facts is None:
        if recorded is None:
            return True, ("manifest.csv: absent, as expected: config.json records no training manifest (an ensemble "
                          "of members trained on different splits has none)")
        return False, (f"manifest.csv: missing, but config.json records the split the model was trained on "
                       f"(SHA-256 {recorded[:16]}...); restore it from the model's source: threshold, calibrate and "
                       "the card read the validation split from it")
    if "error" in facts:
        return False, f"manifest.csv: unreadable ({facts['error']}); restore it from the model's source"
    if recorded is None:
        return True, "manifest.csv: present; config.json records no manifest hash to compare it with"
    same = facts["digest"] == recorded
    return same, f"manifest.csv: {'matches' if same else 'does NOT match'} the manifest the model was trained on"
