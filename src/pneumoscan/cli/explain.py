"""pneumoscan explain IMAGE...: occlusion and Grad-CAM heat maps (PNG overlay + raw .npy per image)."""
from __future__ import annotations

from ..explain.config import ExplainConfig
from .common import EXIT_OUT_OF_SCOPE, add_model_arg, check_inputs_exist, check_out, print_file_errors
from .flags import add_config, build


def register(sub) -> None:
    p = sub.add_parser("explain", help="heat maps of where the model looks (occlusion, Grad-CAM)",
                       description="For each image: a PNG (X-ray, heat map overlay with colour bar, prediction) "
                                   "and the raw map as .npy, per method; a summary CSV/JSON with each map's "
                                   "share inside the central chest region; with --grid a summary figure.")
    p.add_argument("paths", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, DICOM) or folders")
    add_model_arg(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    add_config(p, ExplainConfig)
    p.set_defaults(func=run)


def pick_evenly(files: list, n: int | None) -> list:
    """Up to ``n`` files, taken in turn from each parent folder, evenly spaced within it (deterministic)."""
    if n is None or len(files) <= n:
        return list(files)
    groups: dict = {}
    for f in files:
        groups.setdefault(str(f.parent), []).append(f)
    queues = [[g[int(i * len(g) / min(len(g), n))] for i in range(min(len(g), n))] for g in groups.values()]
    out = []
    while len(out) < n:
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return sorted(out)


def unique_stems(files: list) -> list[str]:
    """Output name per file: its stem, prefixed by the parent folder (and a number) when stems clash."""
    from collections import Counter

    counts = Counter(f.stem for f in files)
    names, used = [], set()
    for f in files:
        name = f.stem if counts[f.stem] == 1 else f"{f.parent.name}_{f.stem}"
        base, k = name, 2
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        names.append(name)
    return names


def run(args) -> int:
    import csv
    import io
    import math
    from pathlib import Path

    cfg = build(ExplainConfig, args)
    check_inputs_exist(args.model)
    check_out(args, "dir")
    from ..data.imaging import load_xray
    from ..data.index import iter_image_files
    from ..errors import ImageError, PneumoscanError
    from ..explain.explainer import CENTRAL_REGION, Explainer
    from ..explain.figures import grid_figure, save_array, save_overlay
    from ..explain.maps import DISPLAY_SIDE
    from ..io import atomic_write_json, atomic_write_text, staged_dir
    from ..plots import save_figure
    from ..predict import Predictor

    methods = cfg.methods
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise PneumoscanError(f"--out {out} is a file; give a folder")
    previous = previous_outputs(out)  # what an earlier explain wrote here, to remove what this one does not rewrite
    files, errors = iter_image_files(args.paths, exclude=out)  # never its own maps read back as X-rays
    files = [f for f in files if not (f.name in previous and f.resolve().parent == out.resolve())]  # --out DIR DIR
    if not files:
        what = "; ".join(f"{p}: {e}" for p, e in errors) or "no JPEG, PNG or DICOM files in the given folders"
        raise PneumoscanError(f"nothing to explain ({what})")
    files = pick_evenly(files, cfg.sample)
    pred = Predictor(args.model, backend="torch")  # explanations need the network's gradients and layers
    explainer = Explainer(pred, patch=cfg.patch, stride=cfg.stride, batch_size=cfg.batch_size, engine=cfg.engine)
    grid_idx = set(pick_evenly(files, 16)) if cfg.grid else set()
    rows, grid, grids = [], {m: [] for m in methods}, []
    with staged_dir(out) as stage:  # the run's files reach --out together, once all are written (Ctrl-C: none)
        for f, name in zip(files, unique_stems(files)):
            try:
                x = load_xray(f, max_pixels=pred.max_pixels, size_hint=max(pred.prep_cfg.size, DISPLAY_SIDE))
            except ImageError as e:
                errors.append((str(f), str(e)))
                continue
            for e in explainer(x, methods):
                png = out / save_overlay(x.pixels, e, stage / f"{name}.{e.method}.png", title_name=f.name).name
                npy = out / save_array(e.heatmap, stage / f"{name}.{e.method}.npy").name
                share = e.central_share
                rows.append({"path": str(f), "method": e.method, "in_scope": e.in_scope, "label": e.label,
                             **{f"p_{k}": round(v, 4) for k, v in e.probabilities.items()},
                             "central_share": None if math.isnan(share) else round(share, 4),
                             "seconds": round(e.seconds, 3), "png": str(png), "npy": str(npy),
                             "reasons": "; ".join(e.reasons)})
                if f in grid_idx:
                    grid[e.method].append((str(f), x.pixels, e))
                what = e.label if e.in_scope else f"out of scope, no diagnosis ({e.reasons[0]}); the network's {e.label}"
                print(f"{f}: {what} ({e.method}, central share {share:.2f}, {e.seconds:.2f} s) -> {png}")
        for method, items in grid.items():
            if items:
                grids.append(out / save_figure(grid_figure(items, pred.model_id), stage / f"grid.{method}.png",
                                               dpi=110).name)
                print(f"grid -> {grids[-1]}")
        if rows:
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
            atomic_write_text(stage / "explain.csv", buf.getvalue())
            left, right, top, bottom = CENTRAL_REGION
            atomic_write_json(stage / "explain.json", {
                "model": pred.model_id, "methods": list(methods), "patch": cfg.patch, "stride": cfg.stride,
                "central_region": {"left": left, "right": right, "top": top, "bottom": bottom,
                                   "note": "fractions of width/height; a map spread evenly has share 0.42"},
                "maps": rows, "grids": [g.name for g in grids]})
            print(f"summary -> {out / 'explain.csv'}")
        written = {p.name for p in stage.iterdir()}
    for stale in sorted(previous - written):  # an earlier run's maps, grids and summary: never left to mislead
        (out / stale).unlink(missing_ok=True)
    print_file_errors(errors)
    return 1 if errors else (EXIT_OUT_OF_SCOPE if any(not r["in_scope"] for r in rows) else 0)


def previous_outputs(out) -> set[str]:
    """Names of the files an earlier ``explain`` wrote into ``out``, as its ``explain.json`` lists them (maps,
    grids, the summary itself); nothing else in the folder is ever touched."""
    import json
    import re
    from pathlib import Path

    try:
        doc = json.loads((Path(out) / "explain.json").read_text())
    except (OSError, ValueError):
        return set()
    if not isinstance(doc, dict):
        return set()
    names = {"explain.csv", "explain.json"}
    for m in doc.get("maps") or []:
        names |= {Path(str(m[k])).name for k in ("png", "npy") if isinstance(m, dict) and m.get(k)}
    grids = doc.get("grids", [f"grid.{m}.png" for m in doc.get("methods") or []])  # older files name no grids
    names |= {Path(str(g)).name for g in grids or []}
    ours = re.compile(r"explain\.(csv|json)|grid\.(occlusion|gradcam)\.png|.+\.(occlusion|gradcam)\.(png|npy)")
    return {n for n in names if ours.fullmatch(n)}  # only names explain gives its own files
