"""The readers of the seed documents (``documents.py``), and the repository's copy of them."""

from __future__ import annotations

import pytest
from documents import COPY, SHARED, notebook_cells, reindent, seed_path, seed_text


@pytest.mark.parametrize("number", ["000", "003", "004"])
def test_the_copy_in_the_repository_is_the_original(number):
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is not beside this checkout; the copy is what runs")
    assert seed_path(number, COPY).read_bytes() == seed_path(number, SHARED).read_bytes()


def test_every_notebook_cell_compiles_once_reindented():
    for index, cell in enumerate(notebook_cells(seed_text("000"))):
        compile(cell, f"cell-{index}", "exec")


def test_reindent_rules():
    captured = "\n".join([
        "for x in xs:",          # rule 1: no leading space, depth 0
        " if x:",                # rule 3: after an opener, one deeper
        " a(x,",                 # rule 3 again
        " 1)",                   # a continuation line follows its statement
        " b()",                  # rule 6: same depth as before
        " else:",                # rule 2: the depth of its `if`
        " c()",
        "",
        " d()",                  # rule 4: a blank line closed the `else` block
        "try:",
        " if y:",
        " e()",
        " if z:",                # rule 5: a sibling of the one-statement `if` above
        " f()",
        "except E:",
        " g()",
    ])
    assert reindent(captured) == "\n".join([
        "for x in xs:",
        "    if x:",
        "        a(x,",
        "            1)",
        "        b()",
        "    else:",
        "        c()",
        "",
        "    d()",
        "try:",
        "    if y:",
        "        e()",
        "    if z:",
        "        f()",
        "except E:",
        "    g()",
    ])
