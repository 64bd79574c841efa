"""pneumoscan run: the main job (index, extract, train, evaluate, report) on a data folder."""
from __future__ import annotations

from ..features.config import ExtractConfig
from ..train.config import TrainConfig
from .common import progress_enabled, tame_lightning
from .flags import add_config, build


def register(sub) -> None:
    p = sub.add_parser("run", help="main job: index + extract + train + evaluate on the validation split")
    p.add_argument("data", nargs="?", default=None,
                   help="data folder (default: ../shared/data/chest_xray, else ./data/chest_xray; "
                        "fetch it with 'pneumoscan data download')")
    p.add_argument("--out", default="runs/main", help="output folder (default: %(default)s)")
    add_config(p, TrainConfig, only=("backbone", "size", "intensity", "seed", "pretrained"))
    add_config(p, ExtractConfig, only=("cache",))
    p.set_defaults(func=run)


def run(args) -> int:
    cfg, ext = build(TrainConfig, args), build(ExtractConfig, args)
    from ..errors import DataError
    from ..pipeline import default_data_dir, run_pipeline

    data = args.data or default_data_dir()
    if data is None:
        raise DataError("no data folder given and none found at ../shared/data/chest_xray or ./data/chest_xray; "
                        "run 'pneumoscan data download --dest data' first")
    tame_lightning()
    s = run_pipeline(data, args.out, cfg, extract=ext, progress=progress_enabled())
    v = s["validation"]["normal_vs_pneumonia"]
    print(f"data {s['data']}: " + ", ".join(f"{k} {sum(c.values())}" for k, c in s["counts"].items()))
    print(f"model {s['model']}; validation 3-class acc {s['validation']['three_class']['accuracy']:.3f}, "
          f"normal vs pneumonia acc {v['accuracy']:.3f} sens {v['sensitivity']:.3f} spec {v['specificity']:.3f} "
          f"AUC {v['auc']:.4f}")
    print(f"report: {args.out}/eval-val/report.md; times " + ", ".join(f"{k} {v}" for k, v in s["seconds"].items()))
    return 0
