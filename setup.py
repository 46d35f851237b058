"""Packaging for bptf-relay: ``pip install .`` installs the package and the console script."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "relay" / "__init__.py").read_text()).group(1)

setup(
    name="bptf-relay",
    version=VERSION,
    description="Relay for the Backpack.tf events feed: one upstream websocket, many local clients",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["relay", "relay.*"]),
    install_requires=[
        # 1.9.1 crashes in close() called from another thread; the relay
        # subclasses WebSocketApp's dispatcher hook, checked on 1.9.x.
        "websocket-client>=1.9.2,<2",
        "simple-websocket>=1.1,<2",
        "werkzeug>=3,<4",
        # The field's standard Prometheus client: text exposition format done right.
        "prometheus_client>=0.17,<1",
    ],
    entry_points={"console_scripts": ["bptf-relay=relay.__main__:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
    ],
)
