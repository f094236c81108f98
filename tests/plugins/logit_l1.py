"""A method that lives outside distiller_zoo/: what docs/adding_a_method.md walks through.

LogitL1: the mean absolute difference of student and teacher logits raised to --logit_l1_power,
each sample weighted by (1 + its dataset index mod 2). The weighting is no published idea; it
is there so the method has a data need (the samples' dataset indices) for the test to exercise.
"""

from core.errors import UserError
from core.ranges import POSITIVE
from distiller_zoo.base import BuildContext, Distiller, register
from distiller_zoo.options import DataNeeds, Option


@register("logit_l1", family="logit", gamma=1.0, alpha=0.0, beta=1.0, paper="DistillBench's documentation example")
class LogitL1(Distiller):
    options = (Option("logit_l1_power", float, 1.0, "exponent of the absolute logit difference", valid=POSITIVE),)

    @classmethod
    def data_needs(cls, options) -> DataNeeds:
        return DataNeeds(indices=True)

    def __init__(self, ctx: BuildContext):
        super().__init__(ctx)
        self.power = ctx.options.logit_l1_power
        self.n_train = ctx.n_train

    def forward(self, feat_s, feat_t, batch=None):
        if batch is None or batch.indices is None:
            raise UserError("logit_l1 needs the dataset index of every sample")
        assert 0 <= int(batch.indices.min()) and int(batch.indices.max()) < self.n_train
        distance = (feat_s.logits - feat_t.logits.detach()).abs().pow(self.power).mean(dim=1)
        weight = 1.0 + (batch.indices % 2).to(distance.dtype)
        return (weight * distance).mean(), {"distance": distance.mean().detach()}
