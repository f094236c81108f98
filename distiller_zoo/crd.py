"""CRD: Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020.

Student and teacher pooled features are embedded (linear + L2 normalisation, one trainable
head per network, the teacher's included) into feat_dim = 128 dimensions. Each embedding is
scored against the OTHER network's memory bank at the sample's own row (positive) and at K
rows of other samples (negatives, drawn by the data loader: `batch.contrast`, 'exact' mode =
negatives from other classes):

    h(v, m) = exp(<v, m> / T) / Z,   T = 0.07, Z fixed on the first batch (mean * n_data)
    L = -( sum_b log h_pos / (h_pos + K Pn) + sum_b sum_k log K Pn / (h_neg + K Pn) ) / B

(paper Eq. 18, Pn = 1 / n_data, eps 1e-7 in the denominators), once with the student as
the anchor ('s_anchor') and once with the teacher ('t_anchor'); the method's loss is their
sum. The banks are updated with momentum 0.5 and renormalised after each step (crd/memory.py).

Features: `pooled` only, so every student/teacher pair works, whatever the stage layout.
Defaults (RepDistiller): -r 1 -a 0 -b 0.8, feat_dim 128, nce_k 16384, nce_t 0.07, nce_m 0.5.

Data needs: each sample's dataset index and its contrast indices (nce_k negatives, drawn in
--mode 'exact' or 'relax' by the loader). The two
banks and the normalisation constants are buffers: checkpointed, restored on --resume.
Under torchrun the memory update sees every rank's samples (see crd/memory.py).
"""
from core.errors import UserError
from core.ranges import POSITIVE, at_least, within
from crd.criterion import CRDLoss
from dataset.contrast import NCE_K
from distiller_zoo.base import BuildContext, Distiller, register
from distiller_zoo.options import DataNeeds, Option


@register("crd", family="contrastive", gamma=1.0, alpha=0.0, beta=0.8,
          paper="Tian, Krishnan & Isola, Contrastive Representation Distillation, ICLR 2020")
class CRD(Distiller):
    options = (
        Option("feat_dim", int, 128, "CRD/CC embedding size", valid=at_least(1)),
        Option("nce_k", int, 16384, "CRD negatives per sample", valid=NCE_K),
        Option("nce_t", float, 0.07, "CRD temperature", valid=POSITIVE),
        Option("nce_m", float, 0.5, "CRD memory momentum", valid=within(0, 1, "[)")),
        Option("mode", str, "exact", "CRD sampling: negatives from other classes (exact) or any sample (relax)",
               choices=("exact", "relax")),
    )

    @classmethod
    def data_needs(cls, options) -> DataNeeds:
        return DataNeeds(indices=True, contrast=(options.nce_k, options.mode))

    def __init__(self, ctx: BuildContext):
        super().__init__(ctx)
        opts = ctx.options
        if ctx.n_train < 2:
            raise UserError(f"crd needs the training set size for its memory bank (got {ctx.n_train})")
        if opts.nce_k >= ctx.n_train:
            raise UserError(f"--nce_k {opts.nce_k} negatives need a training set larger than its {ctx.n_train} "
                            f"samples; use --nce_k {ctx.n_train - 1} or less")
        s_dim = ctx.feat_s.pooled[0].numel()
        t_dim = ctx.feat_t.pooled[0].numel()
        self.criterion = CRDLoss(s_dim, t_dim, ctx.n_train, feat_dim=opts.feat_dim, nce_k=opts.nce_k,
                                 nce_t=opts.nce_t, nce_m=opts.nce_m)

    def forward(self, feat_s, feat_t, batch=None):
        if batch is None or batch.indices is None:
            raise UserError("crd needs the dataset index of every sample; build the loader with the method's "
                            "data needs (train_student.py does)")
        return self.criterion(feat_s.pooled, feat_t.pooled.detach(), batch.indices, batch.contrast)
