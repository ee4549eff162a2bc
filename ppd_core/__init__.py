"""ppd_core: the PPD library. Everything a researcher runs in a notebook; never imports Prefect."""

__version__ = "0.1.0"
