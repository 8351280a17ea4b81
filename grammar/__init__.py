"""The KQL grammar (``kql.lark``), shipped as package data."""
from pathlib import Path

GRAMMAR_PATH = Path(__file__).with_name("kql.lark")
