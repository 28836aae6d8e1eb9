"""ssvi's version, written once: the package (``ssvi_cli.__version__``), ``ssvi --version``, the
provenance recorded beside every run's numbers and the built distribution (pyproject.toml reads it
from here) all take it from this line, so a source tree run without installing says it too."""

__version__ = "0.1.0"
