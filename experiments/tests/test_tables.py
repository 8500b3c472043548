"""The study tables of the README and docs/ are what experiments/tables.py makes of the results files."""

from __future__ import annotations

import pytest

from experiments import tables


@pytest.mark.parametrize("page", tables.PAGES)
def test_committed_tables_equal_the_generated_ones(page: str) -> None:
    text = (tables.ROOT / page).read_text()
    names = [match["name"] for match in tables.BLOCK.finditer(text)]
    assert names, f"{page} holds no generated table"
    for match in tables.BLOCK.finditer(text):
        assert match["body"] == tables.TABLES[match["name"]](), (
            f"{page}: table {match['name']!r} differs from experiments/results "
            "(run python experiments/tables.py)"
        )


def test_every_table_appears_on_a_page() -> None:
    used = {
        match["name"]
        for page in tables.PAGES
        for match in tables.BLOCK.finditer((tables.ROOT / page).read_text())
    }
    assert used == set(tables.TABLES)


def test_render_rewrites_a_stale_table_and_rejects_an_unknown_one() -> None:
    stale = "before\n<!-- table: mask_resize -->\n| old |\n<!-- /table -->\nafter\n"
    assert tables.render(stale) == (
        f"before\n<!-- table: mask_resize -->\n{tables.mask_resize()}<!-- /table -->\nafter\n"
    )
    with pytest.raises(ValueError, match="unknown table 'nope'"):
        tables.render("<!-- table: nope -->\n<!-- /table -->\n")


def test_first_epoch_above() -> None:
    assert tables.first_epoch_above([0.1, 0.7, 0.71, 0.9]) == "3"
    assert tables.first_epoch_above([0.1, 0.6]) == "none"
    assert tables.first_epoch_above(None) == ""
