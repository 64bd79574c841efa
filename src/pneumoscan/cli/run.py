"""pneumoscan run: the main job (index, extract, train, evaluate, report) on a data folder."""
from __future__ import annotations

from ..features.config import ExtractConfig
from ..train.config import TrainConfig
from .common import add_overwrite, check_inputs_exist, check_out, progress_enabled, tame_lightning
from .flags import add_config, build


def register(sub) -> None:
    p = sub.add_parser("run", help="main job: index + extract + train + evaluate on the validation split")
    p.add_argument("data", nargs="?", default=None,
                   help="data folder (default: ../shared/data/chest_xray, else ./data/chest_xray; "
                        "fetch it with 'pneumoscan data download')")
    p.add_argument("--out", default="runs/main", help="output folder (default: %(default)s); an earlier run's "
                   "outputs there are replaced")
    add_overwrite(p)
    add_config(p, TrainConfig, only=("backbone", "size", "intensity", "seed", "pretrained"))
    add_config(p, ExtractConfig, only=("cache",))
    p.set_defaults(func=run)


def run(args) -> int:
    cfg, ext = build(TrainConfig, args), build(ExtractConfig, args)
    check_inputs_exist(args.data)
    _check_run_out(args)
    from ..nets.backbones import check_weights

    check_weights(cfg.backbone, cfg.weights, cfg.pretrained)  # before any data is read
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


def _check_run_out(args) -> None:
    """The main job may run again into its own folder (its outputs are replaced); any other non-empty
    folder needs --overwrite."""
    from pathlib import Path

    out = Path(args.out)
    earlier = out.is_dir() and (out / "summary.json").is_file()
    check_out(args, "dir" if earlier or args.overwrite else "model")
