"""Where things are, for tests that read files of the source tree."""

from pathlib import Path

#: The project's root: the folder with pyproject.toml.
ROOT = Path(__file__).resolve().parents[1]
#: Recorded inputs the unit tests replay (uevents, domain XML).
DATA = ROOT / "tests" / "data"
