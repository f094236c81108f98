"""Deployment of a trained network: ONNX and torch.export programs checked against PyTorch
(export.py), int8 post-training quantisation with ONNX Runtime's static QDQ quantiser
(quantize.py), quantisation-aware training after distillation with PyTorch's PT2E flow from
torchao (qat.py), the fp32/int8 accuracy-size-latency rows of the evaluation report
(report.py), and the measurements the evaluation report and the analysis scripts share
(metrics.py: accuracy, calibration, agreement with a teacher, parameters, MACs, latency).

Layering: deploy/ sits beside engine/; it imports models/, dataset/ and engine/, and only the
entry points and scripts/ import it. Its heavy packages are the optional `deploy` extra
(extras.py)."""
