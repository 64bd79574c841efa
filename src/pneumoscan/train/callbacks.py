"""Lightning callbacks and trainer settings shared by head training and fine-tuning."""
from __future__ import annotations

import copy


def _lightning():
    import lightning.pytorch as pl
    return pl


class KeepBest:
    """Lightning callback factory: keeps the best state in memory and the per-epoch history."""

    @staticmethod
    def create(monitor: str = "val_loss"):
        pl = _lightning()

        class _KeepBest(pl.Callback):
            def __init__(self) -> None:
                self.best = float("inf")
                self.best_epoch = -1
                self.state: dict | None = None
                self.history: list[dict] = []
                self.epoch_lr = float("nan")

            def on_train_epoch_start(self, trainer, module) -> None:
                # the lr this epoch trains with; by validation's end an epoch-interval scheduler has stepped
                self.epoch_lr = float(trainer.optimizers[0].param_groups[0]["lr"])

            def on_validation_end(self, trainer, module) -> None:  # after every epoch-end log
                if trainer.sanity_checking:
                    return
                m = {k: float(v) for k, v in trainer.callback_metrics.items() if k.endswith(("_loss", "_acc"))}
                m["epoch"] = trainer.current_epoch + 1
                m["lr"] = self.epoch_lr
                self.history.append(m)
                if m.get(monitor, float("inf")) < self.best:
                    self.best, self.best_epoch = m[monitor], m["epoch"]
                    self.state = copy.deepcopy(module.state_dict())

            def on_train_epoch_end(self, trainer, module) -> None:
                # train metrics arrive after validation in Lightning's order: patch the last row
                if self.history and self.history[-1]["epoch"] == trainer.current_epoch + 1:
                    for k, v in trainer.callback_metrics.items():
                        if k.startswith("train_"):
                            self.history[-1][k] = float(v)

        return _KeepBest()


def trainer_kwargs(progress: bool) -> dict:
    return dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_model_summary=False, enable_progress_bar=progress, num_sanity_val_steps=0,
                deterministic=True)


def ema_callback(decay: float):
    """Lightning's exponential moving average of the weights (``EMAWeightAveraging``, Lightning 2.6+)."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    return EMAWeightAveraging(decay=decay)


def progress_bar():
    """Lightning's progress bar, on stderr (Lightning writes it to stdout, where it mixes with results)."""
    import contextlib
    import sys

    from lightning.pytorch.callbacks import TQDMProgressBar

    class StderrProgressBar(TQDMProgressBar):
        def _on_stderr(name):  # noqa: N805  (a decorator factory used in the class body)
            def method(self, *a, **kw):
                with contextlib.redirect_stdout(sys.stderr):
                    return getattr(TQDMProgressBar, name)(self, *a, **kw)
            return method

        init_sanity_tqdm = _on_stderr("init_sanity_tqdm")
        init_train_tqdm = _on_stderr("init_train_tqdm")
        init_predict_tqdm = _on_stderr("init_predict_tqdm")
        init_validation_tqdm = _on_stderr("init_validation_tqdm")
        init_test_tqdm = _on_stderr("init_test_tqdm")

    return StderrProgressBar()


def fit_interruptible(trainer, *args, **kwargs) -> None:
    """``trainer.fit``, with Ctrl-C a :class:`KeyboardInterrupt` again. Lightning catches it, tears down, sets
    ``trainer.interrupted``, ignores SIGINT from then on and calls ``sys.exit(1)`` (older versions return as if
    the run had finished): either way stop here instead of saving a half-trained model, with Ctrl-C working
    again (the CLI then says "interrupted" and exits 130, nothing written)."""
    try:
        trainer.fit(*args, **kwargs)
    except SystemExit:
        if not getattr(trainer, "interrupted", False):
            raise
    if getattr(trainer, "interrupted", False):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.default_int_handler)
        raise KeyboardInterrupt
