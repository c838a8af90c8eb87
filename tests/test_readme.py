"""The README's Python examples run as written."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("code", [b for b in BLOCKS if "# not run in tests" not in b],
                         ids=lambda c: c.strip().splitlines()[0][:50])
def test_readme_example_runs(code):
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
