"""The distillation methods. Importing a method's module registers it in METHODS."""
from distiller_zoo.base import ALIASES, METHODS, BuildContext, Distiller, InitStage, resolve  # noqa: F401
from distiller_zoo import (  # noqa: F401
    ab, at, cat_kd, cc, crd, ctkd, dist, dkd, fitnet, fsp, ft, irg, kd, kdsvd, mlkd, nst, ofd, pkt, reviewkd, rkd,
    sdd, semckd, simkd, sp, vid, wkd, wttm,
)
from distiller_zoo import dist_plus, ickd, itrd, nkd, pad, srd, wsld  # noqa: F401
