from setuptools import setup

setup(
    name="distillbench",
    version="0.1.0",
    description="Knowledge-distillation benchmark suite: RepDistiller-compatible model zoo, "
    "twenty distillation methods, reproduction scripts and comparison tables.",
    python_requires=">=3.9",
    packages=["models", "distiller_zoo", "crd", "dataset", "engine", "deploy"],
    py_modules=["train_teacher", "train_student", "evaluate"],
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "tensorboard>=2.10",
        "numpy>=1.22",
        "scipy>=1.8",
        "pandas>=1.4",
        "scikit-learn>=1.0",
        "tqdm>=4.60",
        "matplotlib>=3.5",
        "tabulate>=0.8",
    ],
    extras_require={
        "test": ["pytest>=7"],
        # export, int8 and QAT (deploy/): torch.onnx's exporter needs onnx and onnxscript
        "deploy": ["onnx>=1.16", "onnxscript>=0.2", "onnxruntime>=1.18", "torchao>=0.12"],
    },
)
