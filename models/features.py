"""The `Features` record every model's `forward_features` returns.

Distillation methods pick the tensors they need by name (`stages`, `preact`,
`pooled`, ...) instead of by a position in a list, so one method works for
every architecture whatever its number of stages.
"""
from dataclasses import dataclass
from typing import List, Sequence

import torch
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

    def rows(self, start: int, stop: int) -> "Features":
        """The features of batch rows start..stop-1 (views of every tensor, no copy)."""
        return Features(stem=self.stem[start:stop], stages=[t[start:stop] for t in self.stages],
                        preact=[t[start:stop] for t in self.preact], pooled=self.pooled[start:stop],
                        logits=self.logits[start:stop])

    @staticmethod
    def cat(parts: Sequence["Features"]) -> "Features":
        """The features of several batches, concatenated along the batch dimension."""
        return Features(stem=torch.cat([p.stem for p in parts]),
                        stages=[torch.cat(ts) for ts in zip(*(p.stages for p in parts))],
                        preact=[torch.cat(ts) for ts in zip(*(p.preact for p in parts))],
                        pooled=torch.cat([p.pooled for p in parts]),
                        logits=torch.cat([p.logits for p in parts]))
