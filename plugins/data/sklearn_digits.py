"""sklearn's bundled handwritten digits (1,797 8x8 images, 10 classes), scaled to [0, 1].

YAML:  {name: sklearn_digits, heldout: 360}
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from potstill.hookspecs import hookimpl
from potstill.techniques import Context, Data, Dataset, Options


class SklearnDigits(Data):
    name = "sklearn_digits"
    requires = {"sklearn": "potstill[sklearn]"}

    class Options(Options):
        heldout: int = Field(360, gt=0, lt=1797)

    def load(self, ctx: Context) -> Dataset:
        from sklearn.datasets import load_digits

        digits = load_digits()
        order = np.random.default_rng(0).permutation(len(digits.target))
        examples = [(digits.data[i].astype(np.float32) / 16.0, int(digits.target[i])) for i in order]
        held = self.options.heldout
        return Dataset(train=examples[held:], heldout=examples[:held],
                       description=f"{len(examples) - held} train / {held} held-out sklearn digits")


@hookimpl
def register_data(register):
    register(SklearnDigits)
