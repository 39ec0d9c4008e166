"""The README's Python examples run as written (docs that run)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the examples write their run folders here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    for code in blocks:
        exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert "loss_sub" in out and "loss_main" in out


def test_readme_opens_with_the_two_commands() -> None:
    text = README.read_text()
    cmds = re.search(r"```bash\n(.*?)```", text, re.S).group(1).strip().splitlines()
    assert cmds[0].startswith("bash scripts/setup.sh && .venv/bin/masksub train")
    assert cmds[1].startswith("bash scripts/setup.sh dev && .venv/bin/python -m pytest")
    ci = (README.parent / ".ci" / "run").read_text()
    assert "bash scripts/setup.sh dev && .venv/bin/python -m pytest" in ci
