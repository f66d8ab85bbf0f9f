"""The documentation: a short README, links that resolve, an mkdocs site that builds with ``--strict``, every
dataset declaration key documented, the old README's section titles still findable, and no millimetre result
typed by hand outside the generated tables (those are included from ``results/`` with ``--8<--`` snippets)."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lmlib.data.dataset_spec import OPTIONAL, REQUIRED
from lmlib.reporting.summary import README_END, README_START

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_LIMIT = 8192  # bytes
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # Markdown link or image: ](target "title")
FENCE = re.compile(r"^\s*(```|~~~)")
SNIPPET = re.compile(r"^\s*--8<--")
GENERATED = re.compile(r"^\s*<!-- (cli-help|csv-table|dataset-spec-keys)\b")
# a millimetre value with decimals (not a "mm/px" spacing) on a line that states a result, or several such values
# on one line (a list of results)
MM_VALUE = re.compile(r"\b\d+\.\d+\s?mm\b(?!/)")
RESULT_WORDS = re.compile(r"\b(MRE|mean radial error|errors?|median|SDR|scores?|scored|reache[sd]|beats?|accuracy)\b",
                          re.IGNORECASE)
# section titles of the README before it moved into docs/: a reader who knew one must find it there
OLD_README_TITLES = (
    "Two commands", "The paper, regenerated", "Every method on every data set", "More ways to run", "conda users",
    "GPU", "Several processes, GPUs and nodes (Lightning DDP)", "Benchmark: where the time goes", "Your own data",
    "Readers (the `reader:` of a declaration)", "Notebooks and methods", "The shared core: how a method plugs in",
    "Results on hamedan-ceph", "Results on hand-xray", "Results on afids-mni", "Layout", "Data", "Conventions",
    "Output contract", "Driver", "Tests", "Writing a notebook",
)


def _markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def _prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) outside code blocks, snippet includes, generated-block markers and the README's
    generated summary block."""
    out, in_code, in_summary = [], False, False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if FENCE.match(line):
            in_code = not in_code
            continue
        if line.strip() == README_START:
            in_summary = True
        if in_summary:
            in_summary = line.strip() != README_END
            continue
        if not in_code and not SNIPPET.match(line) and not GENERATED.match(line):
            out.append((number, line))
    return out


def _relative_links(path: Path) -> list[tuple[int, str]]:
    links = []
    for number, line in _prose_lines(path):
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):  # not inside inline code
            if target.startswith(("http://", "https://", "mailto:", "#")):
                continue
            links.append((number, target))
    return links


def test_readme_is_short() -> None:
    size = len(README.read_bytes())
    assert size < README_LIMIT, f"README.md is {size} bytes; keep it under {README_LIMIT} (move content to docs/)"


def test_readme_keeps_the_test_command_and_the_generated_block() -> None:
    text = README.read_text(encoding="utf-8")
    assert "make test" in text and "make results" in text and "make paper" in text
    assert text.count(README_START) == 1 and text.count(README_END) == 1


def test_every_relative_link_points_to_an_existing_file() -> None:
    broken = []
    for path in _markdown_files():
        for number, target in _relative_links(path):
            file_part = target.split("#", 1)[0]
            if file_part and not (path.parent / file_part).exists():
                broken.append(f"{path.relative_to(ROOT)}:{number}: {target}")
    assert not broken, "links to missing files:\n" + "\n".join(broken)


@pytest.mark.slow
def test_the_site_builds_strictly(tmp_path: Path) -> None:
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.fail("mkdocs / mkdocs-material are not installed: install the dev extra "
                    "(pip install -e '.[dev]', or make setup after environment.yml changed)")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "_repo" / "results" / "summary" / "fig_summary.png").is_file()  # a linked figure


def test_every_dataset_declaration_key_is_documented() -> None:
    """The reference page's key table is generated from the model (DatasetDeclaration) when the site is built: the
    page holds the marker, and the generated table has a row, with a description, for every key."""
    from lmlib.data.dataset_spec import declaration_table

    text = (DOCS / "reference" / "dataset-declaration.md").read_text(encoding="utf-8")
    assert "<!-- dataset-declaration-table -->" in text and "<!-- dataset-declaration-schema -->" in text
    table = declaration_table()
    missing = [key for key in (*REQUIRED, *OPTIONAL) if not re.search(rf"^\| `{key}` \|.*\| \S[^|]* \|$", table, re.M)]
    assert not missing, f"keys of lmlib/data/dataset_spec.py without a described row in the generated table: {missing}"


def test_the_old_readme_sections_are_findable() -> None:
    headings = [line.lstrip("#").strip().lower() for path in DOCS.rglob("*.md")
                for _, line in _prose_lines(path) if line.startswith("#")]
    missing = [title for title in OLD_README_TITLES if not any(title.lower() in h for h in headings)]
    assert not missing, f"README section titles with no docs heading: {missing}"


def test_no_millimetre_result_is_typed_by_hand() -> None:
    typed = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for path in _markdown_files() for number, line in _prose_lines(path)
             if len(MM_VALUE.findall(line)) > 1 or (MM_VALUE.search(line) and RESULT_WORDS.search(line))]
    assert not typed, ("lines stating a mm result by hand; include the generated table instead "
                       "(--8<-- \"results/<dataset>/comparison/table_main.md\"):\n" + "\n".join(typed))
