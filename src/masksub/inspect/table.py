"""README's family tables: every registered family (why it is chosen, the cost it promises),
and the model modules the project's sweep checks, each with the family it gets
(``scripts/family_table.py`` writes them; a test checks README holds exactly this output)."""

from __future__ import annotations

from ..branches import family_names, get_family

START, END = "<!-- family-table:start -->", "<!-- family-table:end -->"


def families() -> str:
    """One row per registered family, in detection order, from what each family carries."""
    rows = ["| family | chosen when | sub forward cost promised |", "| --- | --- | --- |"]
    for name in family_names():
        cls = get_family(name)
        rows.append(f"| `{name}` | {cls.why} | ~{cls.cost:g}x |")
    return "\n".join(rows)


def modules(rows: list[tuple[str, str, str]]) -> str:
    """``(where, model, family)`` rows: a timm module or a Hugging Face head, the model built."""
    out = ["| module | model checked (small config, 64 px) | mask family |", "| --- | --- | --- |"]
    out += [f"| {where} | `{model}` | `{family}` |" for where, model, family in rows]
    return "\n".join(out)


def render(rows: list[tuple[str, str, str]]) -> str:
    return f"{START}\n{families()}\n\n{modules(rows)}\n{END}"


def section(text: str) -> str:
    """The table section of ``text``, markers included."""
    return START + text.split(START, 1)[1].split(END, 1)[0] + END
