"""CRD (Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020):
the memory bank and the NCE criterion. The registered method is distiller_zoo/crd.py."""
from crd.criterion import ContrastLoss, CRDLoss, Embed  # noqa: F401
from crd.memory import ContrastMemory  # noqa: F401
