"""The `Features` record every model's `forward_features` returns.

Distillation methods pick the tensors they need by name (`stages`, `preact`,
`pooled`, ...) instead of by a position in a list, so one method works for
every architecture whatever its number of stages.
"""
from dataclasses import dataclass, replace
from typing import List, Optional, Sequence, Tuple

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
    tokens:  per stage, whether the network gave it as tokens, turned into the map (a library
             ViT's, Swin's or MLP's; models/external.py); empty where every stage is a map.
    """

    stem: Tensor
    stages: List[Tensor]
    preact: List[Tensor]
    pooled: Tensor
    logits: Tensor
    tokens: Tuple[bool, ...] = ()

    def rows(self, start: int, stop: int) -> "Features":
        """The features of batch rows start..stop-1 (views of every tensor, no copy)."""
        return Features(stem=self.stem[start:stop], stages=[t[start:stop] for t in self.stages],
                        preact=[t[start:stop] for t in self.preact], pooled=self.pooled[start:stop],
                        logits=self.logits[start:stop], tokens=self.tokens)

    def select(self, indices: Optional[Sequence[int]]) -> "Features":
        """The features with `stages` and `preact` cut down to the stages `indices` names, in
        that order (None: all): what one loss of a recipe sees (distiller_zoo/recipe.py)."""
        if indices is None:
            return self
        return replace(self, stages=[self.stages[i] for i in indices], preact=[self.preact[i] for i in indices],
                       tokens=tuple(self.tokens[i] for i in indices) if self.tokens else ())

    @staticmethod
    def cat(parts: Sequence["Features"]) -> "Features":
        """The features of several batches, concatenated along the batch dimension."""
        return Features(stem=torch.cat([p.stem for p in parts]),
                        stages=[torch.cat(ts) for ts in zip(*(p.stages for p in parts))],
                        preact=[torch.cat(ts) for ts in zip(*(p.preact for p in parts))],
                        pooled=torch.cat([p.pooled for p in parts]),
                        logits=torch.cat([p.logits for p in parts]), tokens=parts[0].tokens)


@dataclass(frozen=True)
class StageSelection:
    """The recorded stages one loss sees, as indices into the student's and the teacher's
    `stages` (None: all of them, in order): a recipe's mapping of recorders to a loss."""

    student: Optional[Tuple[int, ...]] = None
    teacher: Optional[Tuple[int, ...]] = None

    def __call__(self, feat_s: Optional[Features], feat_t: Optional[Features]):
        """(student, teacher) Features as the loss sees them; a missing student (an init stage
        without it) stays None."""
        return (None if feat_s is None else feat_s.select(self.student)), feat_t.select(self.teacher)

    @property
    def everything(self) -> bool:
        return self.student is None and self.teacher is None

    def describe(self) -> str:
        """'' for all stages, else which recorded stages each network gives (0-based)."""
        if self.everything:
            return ""
        seen = ["all" if i is None else "[" + ", ".join(map(str, i)) + "]" for i in (self.student, self.teacher)]
        return f"; recorded stages: student {seen[0]}, teacher {seen[1]}"
