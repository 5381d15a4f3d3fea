"""CLI commands contributed by method packages: each module here defines ``add_parsers(sub)``.

``clipslim.cli`` discovers the modules at start-up, so a method adds its commands by adding one file here instead of
editing the central parser.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil


def add_all(sub: argparse._SubParsersAction) -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{info.name}").add_parsers(sub)
