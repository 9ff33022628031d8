import sys
from pathlib import Path

# Tests import the top-level packages and the `tests` helpers from the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
