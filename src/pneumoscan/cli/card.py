"""pneumoscan card: (re)generate a model directory's MODEL_CARD.md, optionally adding an evaluation."""
from __future__ import annotations

from .common import add_model_arg, check_model_writable


def register(sub) -> None:
    p = sub.add_parser("card", help="regenerate a model's MODEL_CARD.md; --add-eval stores results on other data")
    add_model_arg(p)
    p.add_argument("--add-eval", default=None, metavar="METRICS_JSON",
                   help="metrics.json of 'pneumoscan evaluate' on other data, stored in the model directory")
    p.add_argument("--name", default=None, help="name of the evaluation to add (e.g. official-test)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import PneumoscanError
    from ..evaluate.card import EVAL_DIR, add_evaluation, write_card
    from ..nets.modeldir import resolve_model_dir

    model_dir = check_model_writable(resolve_model_dir(args.model))
    if (args.add_eval is None) != (args.name is None):
        raise PneumoscanError("--add-eval METRICS_JSON and --name NAME go together; give both or neither")
    if args.add_eval:
        card = add_evaluation(model_dir, args.add_eval, args.name)
        print(f"evaluation {args.name!r} stored in {model_dir / EVAL_DIR / (args.name + '.json')}")
    else:
        card = write_card(model_dir)
    print(f"model card: {card}")
    return 0
