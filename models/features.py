"""The `Features` record every model's `forward_features` returns.

Distillation methods pick the tensors they need by name (`stages`, `preact`,
`pooled`, ...) instead of by a position in a list, so one method works for
every architecture whatever its number of stages.
"""
from dataclasses import dataclass
from typing import List

from torch import Tensor


@dataclass
class Features:
    """Intermediate tensors of one forward pass, shallow to deep.

    stem:    output of the input stem (RepDistiller's feats[0]).
    stages:  each stage's output (RepDistiller's feats[1:-1]).
    preact:  per stage, the tensor entering the ReLU that follows the stage
             output (the stage output itself where no ReLU follows).
    pooled:  the flattened penultimate embedding (RepDistiller's feats[-1]).
    logits:  the classifier output.
    """

    stem: Tensor
    stages: List[Tensor]
    preact: List[Tensor]
    pooled: Tensor
    logits: Tensor
