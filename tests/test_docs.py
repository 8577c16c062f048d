"""docs/architecture.md names every module of the package, so the page stays true."""

import pathlib

import genblocks


def test_architecture_page_names_every_python_file():
    root = pathlib.Path(genblocks.__file__).parent
    page = (root.parent / "docs" / "architecture.md").read_text()
    missing = [str(p.relative_to(root.parent)) for p in sorted(root.rglob("*.py"))
               if f"`{p.relative_to(root.parent).as_posix()}`" not in page]
    assert not missing, f"docs/architecture.md does not name {missing}"
