"""Let the tests run from a source checkout too: import the plugin from this folder when it is not installed."""

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("potstill_example_plugin") is None:
    sys.path.append(str(Path(__file__).resolve().parents[1]))
