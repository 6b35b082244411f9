"""The README's commands and example stay true."""

from __future__ import annotations

import re
from pathlib import Path

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_readme_starts_with_the_two_commands():
    first = _blocks("bash")[0]
    commands = [ln for ln in first.splitlines() if ln and not ln.startswith("#")]
    assert len(commands) == 2
    assert commands[0].endswith("pip install . && jquant")
    assert commands[1].endswith('pip install -e ".[test]" && python -m pytest -q -n 2')
    assert README.index("```bash") < README.index("```python")


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = _blocks("python")[0]
    assert len(code.strip().splitlines()) <= 16
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    out = capsys.readouterr().out
    assert "Q4_0" in out and "Q8_0" in out
    assert (tmp_path / "model.gguf").stat().st_size > 0
    assert namespace["y"].shape == (1, 1024)
    restored, params = namespace["restored"], namespace["params"]
    assert restored["mlp"]["w"].shape == params["mlp"]["w"].shape
