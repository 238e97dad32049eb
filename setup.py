import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = re.search(r'__version__ = "([^"]+)"', (here / "fm" / "__init__.py").read_text()).group(1)
requirements = [ln.strip() for ln in (here / "requirements.txt").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]

setup(
    name="fm",
    version=version,
    description="Train Chinese and English LLMs (FM9G dragonfly, iFlytekSpark-13B) on BMTrain or FSDP2",
    packages=find_packages(include=["fm", "fm.*"]),
    # Shipped model configs and the demo tokenizer travel with the package (the checkout links to them).
    package_data={"fm": ["assets/tokenizer.model", "assets/models/*/*.json", "assets/train_configs/*.json",
                         "assets/transforms/*.py", "assets/demo/*.jsonl"]},
    entry_points={"console_scripts": ["fm = fm.cli:main"]},
    python_requires=">=3.10",
    install_requires=requirements,
    extras_require={"gpu": ["flash-attn>=2.5"]},
)
