"""Overrides that make a whole local pipeline run take a few minutes on two cores (imported by the tests that run one).

One epoch each, a quarter of the digits to train on, small suites, one cached view.
"""

FAST = (
    "finetune.epochs=1",
    "vqgan.train.epochs=1",
    "train.epochs=1",
    "data.val_fraction=0.75",
    "data.suite_per_class=5",
    "cache.views=1",
)
