"""How a student differs from its teacher beyond accuracy: the measurements behind
scripts/analyze.py, on tensors collected in one pass over the test split.

- Linear CKA (Kornblith et al., "Similarity of Neural Network Representations Revisited",
  ICML 2019, in its Gram form): CKA(X, Y) = <HKH, HLH>_F / (||HKH||_F ||HLH||_F) with
  K = X X^T, L = Y Y^T over the same n examples and H the centering matrix; every stage's output
  is flattened per example, so stages of any shape compare.
- The teacher–student difference of class-logit correlations (Tian et al., "Contrastive
  Representation Distillation", ICLR 2020, its correlation figure; neither paper nor RepDistiller gives code, so
  the computation is mdistiller's tools/visualizations/correlation.ipynb, which drew the same
  figure for DKD): per true class c, the mean logit vector of the test images of c (a C x C
  matrix for each network); the figure is |student - teacher| with the diagonal set to 0, on a
  colour scale that ends at CORRELATION_SCALE = 3 (mdistiller's MAX_DIFF).
- The reliability diagram's bins are those of deploy/metrics.py's ECE (Guo et al. 2017, 15
  equal-width bins); entropy, agreement and KL come from deploy/metrics.py as well.
- Per-class accuracy and the confusion matrix are counted from top-1 predictions.
"""
import torch

from deploy.metrics import ECE_BINS, confidence_bins
from engine.loop import move_batch
from engine.precision import autocast

CORRELATION_SCALE = 3.0


# --- one pass over the test split ------------------------------------------------------------
@torch.inference_mode()
def collect_features(models: list, loader, device, amp_dtype, stage_images: int) -> tuple:
    """(per model a dict of float32 CPU tensors: 'logits' and 'pooled' over the split, 'stages'
    (each stage's output flattened per image, for the first `stage_images` images), targets)."""
    outputs = [{"logits": [], "pooled": [], "stages": []} for _ in models]
    targets, kept = [], 0
    for batch in loader:
        images, labels, *_ = move_batch(batch, device, False)
        take = max(0, min(len(labels), stage_images - kept))
        with autocast(device, amp_dtype):
            for out, model in zip(outputs, models):
                feat = model.forward_features(images)
                out["logits"].append(feat.logits.float().cpu())
                out["pooled"].append(feat.pooled.float().cpu())
                if take:
                    out["stages"].append([s[:take].float().flatten(1).cpu() for s in feat.stages])
        kept += take
        targets.append(labels.cpu())
    for out in outputs:
        out["logits"], out["pooled"] = torch.cat(out["logits"]), torch.cat(out["pooled"])
        out["stages"] = [torch.cat(parts) for parts in zip(*out["stages"])]
    return outputs, torch.cat(targets)


# --- CKA -------------------------------------------------------------------------------------
def centered_gram(x: torch.Tensor) -> torch.Tensor:
    """H (X X^T) H for the n x p features X (rows: examples), float64: centering the features
    over the examples first gives the same matrix with one product of size n x n."""
    x = x.flatten(1).double()
    x = x - x.mean(0, keepdim=True)
    return x @ x.T


def cka_from_grams(gram_x: torch.Tensor, gram_y: torch.Tensor) -> float:
    """Linear CKA of two centered Gram matrices over the same examples."""
    return float((gram_x * gram_y).sum() / (gram_x.norm() * gram_y.norm()))


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two sets of features of the same n examples (n x anything each)."""
    return cka_from_grams(centered_gram(x), centered_gram(y))


def cka_matrix(stages_t: list, stages_s: list) -> torch.Tensor:
    """Linear CKA of every teacher stage (rows) with every student stage (columns)."""
    grams_s = [centered_gram(s) for s in stages_s]
    rows = []
    for t in stages_t:
        gram_t = centered_gram(t)
        rows.append([cka_from_grams(gram_t, g) for g in grams_s])
    return torch.tensor(rows, dtype=torch.float64)


# --- class-logit correlations ----------------------------------------------------------------
def class_mean_logits(logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """C x C: row c is the mean logit vector of the samples of true class c (NaN where the split
    holds no sample of c)."""
    sums = torch.zeros(num_classes, logits.shape[1], dtype=torch.float64).index_add_(0, targets, logits.double())
    counts = torch.bincount(targets, minlength=num_classes).double().unsqueeze(1)
    return sums / counts


def logit_correlation_difference(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                                 targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """|class_mean_logits(student) - class_mean_logits(teacher)|, diagonal set to 0."""
    diff = (class_mean_logits(student_logits, targets, num_classes)
            - class_mean_logits(teacher_logits, targets, num_classes)).abs()
    return diff.fill_diagonal_(0.0)


def off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    """The entries off the diagonal of a square matrix, flattened."""
    return matrix[~torch.eye(matrix.shape[0], dtype=torch.bool)]


# --- calibration, per class ------------------------------------------------------------------
def reliability_bins(probs: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> dict:
    """Per confidence bin (ECE's bins): 'count', 'accuracy' and mean 'confidence' (fractions;
    NaN in an empty bin) and the bins' 'edges' (bins + 1)."""
    count, hits, confidence_sum = confidence_bins(probs, targets, bins)
    return {"count": count, "accuracy": hits / count, "confidence": confidence_sum / count,
            "edges": torch.linspace(0, 1, bins + 1, dtype=torch.float64)}


def confusion_matrix(logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int64 C x C: entry [true class, predicted class] counts the samples."""
    flat = targets * num_classes + logits.argmax(1)
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Top-1 accuracy in % of each true class (NaN for a class without samples), float64."""
    confusion = confusion_matrix(logits, targets, num_classes).double()
    return 100.0 * confusion.diagonal() / confusion.sum(1)


def largest_disagreements(student_accuracy: torch.Tensor, teacher_accuracy: torch.Tensor, k: int) -> list:
    """The (at most) k classes whose per-class accuracies differ most, largest gap first (ties:
    the lower class index first)."""
    gap = (student_accuracy - teacher_accuracy).abs().nan_to_num(-1.0)
    order = sorted(range(len(gap)), key=lambda c: (-gap[c].item(), c))
    return [c for c in order[:k] if gap[c] >= 0]
