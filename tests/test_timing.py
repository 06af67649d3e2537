"""Time that means what it says: Trainer.train()'s wall time split into steps, validation and checkpoints, and
tokens/s from the steps alone. A stand-in clock advances only when work is done, so nothing here is timed."""

import types

import pytest

from lvf import training


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class TrainerStandIn:
    """What MeasuredTrainer overrides, each spending known seconds of the stand-in clock."""

    clock = None
    spends = {"evaluate": 7.0, "_save_checkpoint": 30.0, "_load_best_model": 5.0}

    def __init__(self, *a, **kw):
        self.args = types.SimpleNamespace(device="cpu")

    def add_callback(self, callback):
        pass

    def spend(self, name):
        self.clock.now += self.spends[name]

    def evaluate(self, *a, **kw):
        self.spend("evaluate")

    def _save_checkpoint(self, *a, **kw):
        self.spend("_save_checkpoint")

    def _load_best_model(self, *a, **kw):
        self.spend("_load_best_model")


def test_validation_and_checkpoints_are_timed_apart_and_tokens_per_second_come_from_the_steps(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(training.time, "perf_counter", clock)
    TrainerStandIn.clock = clock
    trainer = training.make_trainer_class(TrainerStandIn)()
    clock.now += 100.0  # steps
    trainer.evaluate()
    trainer._save_checkpoint(None)
    clock.now += 100.0  # more steps
    trainer.evaluate()
    trainer._save_checkpoint(None)
    trainer._load_best_model()  # the end of train(): the kept checkpoint read back
    train_seconds = clock.now
    timing = training.step_timing(train_seconds, trainer.seconds_away, train_tokens=50_000)
    assert timing["validation_seconds"] == 14.0
    assert timing["checkpoint_seconds"] == 65.0  # two writes and the reload of the best one
    assert timing["train_step_seconds"] == 200.0
    assert timing["train_seconds"] == 279.0
    assert timing["train_tokens_per_second"] == pytest.approx(250.0)  # 50,000 tokens over the 200 s of steps
