"""xkernels + xmodel: Triton kernels and a trainer for the Xmodel-2.5 small-LM recipe."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="xkernels",
    version="0.1.0",
    description="Triton kernels (FP8 GEMMs, fused RMSNorm/RoPE/SwiGLU/CE, Newton-Schulz/Muon) and the Xmodel-2.5 trainer",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["xkernels", "xkernels.*", "xmodel", "xmodel.*"]),
    package_data={"xmodel": ["configs/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "einops",
        "safetensors>=0.4",
        "tokenizers>=0.15",
        "pyyaml",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "pyarrow"],
        "data": ["pyarrow"],
        "hf": ["safetensors>=0.4", "tokenizers>=0.15", "transformers>=4.40"],
        "eval": ["lm-eval>=0.4"],
        "te": ["transformer-engine[pytorch]"],
        "build": ["ninja"],
    },
    entry_points={
        "console_scripts": [
            "xmodel-train=xmodel.train:cli",
            "xmodel-export=xmodel.export:main",
            "xmodel-prepare=xmodel.prepare:main",
            "xmodel-generate=xmodel.generate:main",
            "xmodel-eval=xmodel.lm_eval_adapter:main",
        ]
    },
    classifiers=["Programming Language :: Python :: 3", "License :: OSI Approved :: Apache Software License"],
)
