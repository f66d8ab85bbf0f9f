"""mkdocs hooks of the lmlib documentation (named in ``mkdocs.yml``; not a documentation page).

What the Markdown pages need and plain mkdocs does not do:

- **Repository files.** Pages link to files outside ``docs/`` (generated tables and figures under
  ``results/``, notebooks, sources) with ordinary relative links such as ``../../results/x/fig.png``, which
  work where the Markdown is read on GitHub. mkdocs serves only files under ``docs_dir``, so each linked
  repository file is added to the built site under ``_repo/<path>`` and the link is rewritten to it.
  Nothing is copied into ``docs/``; a link to a missing file stays as it is and ``--strict`` reports it.
- **Command-line help** generated from the parsers: a line ``<!-- cli-help: lmlib.run -->`` becomes the
  output of ``python -m lmlib.run --help`` (only the modules in :data:`CLI_MODULES`).
- **The dataset declaration keys** from the module docstring of ``lmlib/data/dataset_spec.py`` (the
  authoritative list): a line ``<!-- dataset-spec-keys -->`` becomes its ``Keys`` block.
- **The shared run parameters** from their typed model (``lmlib.engine.parameters.SharedParameters``): a line
  ``<!-- shared-parameters -->`` becomes its table (name, default, what it accepts, meaning); likewise
  ``<!-- method-parameters -->`` becomes one table per method from its ``Parameters`` model.
- **Generated CSV tables** (the benchmark writes no Markdown): a line ``<!-- csv-table: results/x/table.csv -->``
  (path from the repository root) becomes that file as a Markdown table, numbers to four significant digits.
  A missing file fails the build.
- **The result notebooks of a data set**: a line ``<!-- result-notebooks: hand-xray -->`` becomes links to the
  executed notebooks committed under ``results/hand-xray/`` (one per run folder), so the list follows the
  committed runs.
"""
from __future__ import annotations

import ast
import csv
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files, InclusionLevel
from mkdocs.structure.pages import Page

REPO_PREFIX = "_repo"  # where linked repository files live in the built site
LINK = re.compile(r"(\]\()([^)\s]+?)((?:#[^)\s]*)?\))")  # Markdown link or image target: ](target#anchor)
CLI_MODULES = ("lmlib.run", "lmlib.predict", "lmlib.reporting.diagnostics", "lmlib.data.example_dataset")
CLI_MARKER = re.compile(r"^<!-- cli-help: ([\w.]+) -->$", re.MULTILINE)
KEYS_MARKER = "<!-- dataset-spec-keys -->"
PARAMETERS_MARKER = "<!-- shared-parameters -->"
METHOD_PARAMETERS_MARKER = "<!-- method-parameters -->"
#: generated from lmlib.data.dataset_spec.DatasetDeclaration: its keys as a table, its JSON schema
DECLARATION_MARKERS = {"<!-- dataset-declaration-table -->": "print(declaration_table())",
                       "<!-- dataset-declaration-schema -->":
                           "import json; print('```json'); print(json.dumps(declaration_schema(), indent=1)); "
                           "print('```')"}
CSV_MARKER = re.compile(r"^<!-- csv-table: (\S+\.csv) -->$", re.MULTILINE)
NOTEBOOKS_MARKER = re.compile(r"^<!-- result-notebooks: ([\w.-]+) -->$", re.MULTILINE)
SPEC_MODULE = Path("lmlib") / "data" / "dataset_spec.py"


def _root(config: Any) -> Path:
    return Path(config["config_file_path"]).resolve().parent


def _repo_target(target: str, page_dir: Path, docs_dir: Path, root: Path) -> Path | None:
    """The repository file (outside ``docs_dir``) that a relative link ``target`` names, else None."""
    if target.startswith(("http://", "https://", "mailto:", "#", "/")) or "://" in target:
        return None
    path = (page_dir / target).resolve()
    if not path.is_file() or not path.is_relative_to(root) or path.is_relative_to(docs_dir):
        return None
    return path


def on_files(files: Files, config: Any) -> Files:
    """Add every repository file a page links to under ``_repo/`` (not listed in the navigation)."""
    docs_dir, root = Path(config["docs_dir"]).resolve(), _root(config)
    wanted: set[Path] = set()
    for page in docs_dir.rglob("*.md"):
        text = NOTEBOOKS_MARKER.sub(lambda m, p=page: _result_notebooks(m.group(1), root, p.parent),
                                    page.read_text(encoding="utf-8"))
        for match in LINK.finditer(text):
            path = _repo_target(match.group(2), page.parent, docs_dir, root)
            if path is not None:
                wanted.add(path)
    for path in sorted(wanted):
        uri = f"{REPO_PREFIX}/{path.relative_to(root).as_posix()}"
        if files.get_file_from_path(uri) is None:
            files.append(File.generated(config, uri, abs_src_path=str(path), inclusion=InclusionLevel.NOT_IN_NAV))
    return files


def _cli_help(module: str, root: Path) -> str:
    if module not in CLI_MODULES:
        raise ValueError(f"cli-help: {module!r} is not one of {CLI_MODULES}")
    env = {**os.environ, "COLUMNS": "100"}
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"python -m {module} --help failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return f"```text\n{done.stdout.rstrip()}\n```"


def _parameter_table(root: Path, function: str = "parameter_table") -> str:
    """``lmlib.engine.parameters.<function>()`` (the shared table, or ``method_parameter_tables``), computed in a
    subprocess of this interpreter (as the CLI help)."""
    code = f"from lmlib.engine.parameters import {function}; print({function}())"
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the shared parameter table failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return done.stdout.rstrip()


def _python_output(root: Path, code: str) -> str:
    """What ``code`` prints, run in a subprocess of this interpreter (as the CLI help)."""
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{code!r} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return done.stdout.rstrip()


def _spec_keys(root: Path) -> str:
    """The ``Keys (...)::`` block of the dataset_spec module docstring, as a YAML code block."""
    doc = ast.get_docstring(ast.parse((root / SPEC_MODULE).read_text(encoding="utf-8"))) or ""
    head, sep, rest = doc.partition("::\n")
    if not sep or "Keys" not in head.rsplit("\n", 1)[-1]:
        raise ValueError(f"{SPEC_MODULE}: its docstring has no 'Keys ...::' block")
    block = []
    for line in rest.split("\n")[1:] if rest.startswith("\n") else rest.split("\n"):
        if line and not line.startswith("    "):
            break
        block.append(line[4:])
    return "```yaml\n" + "\n".join(block).strip("\n") + "\n```"


def _cell(text: str) -> str:
    try:
        value = float(text)
    except ValueError:
        return text.replace("|", "\\|")
    return text if text.strip().lstrip("-").isdigit() else f"{value:.4g}"


def _csv_table(relative: str, root: Path) -> str:
    """A generated CSV file as a Markdown table (the first column is the row name when its header is empty)."""
    path = (root / relative).resolve()
    if not path.is_file() or not path.is_relative_to(root):
        raise FileNotFoundError(f"csv-table: {relative} not found in the repository")
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        raise ValueError(f"csv-table: {relative} is empty")
    head, body = rows[0], rows[1:]
    lines = ["| " + " | ".join(h or " " for h in head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def _result_notebooks(dataset: str, root: Path, page_dir: Path) -> str:
    """Links (relative to the page) to the executed notebook of each committed run folder of ``dataset``."""
    found = sorted((root / "results" / dataset).glob("*/*.ipynb"))
    if not found:
        raise FileNotFoundError(f"result-notebooks: no executed notebook under results/{dataset}/")
    links = [f"[{nb.parent.name}]({os.path.relpath(nb, page_dir).replace(os.sep, '/')})" for nb in found]
    return "Result notebooks (executed, with their figures): " + ", ".join(links) + "."


def on_page_markdown(markdown: str, page: Page, config: Any, files: Files) -> str:
    """Rewrite links to repository files; expand the generated blocks."""
    docs_dir, root = Path(config["docs_dir"]).resolve(), _root(config)
    page_dir = (docs_dir / page.file.src_path).parent

    def relink(match: re.Match[str]) -> str:
        path = _repo_target(match.group(2), page_dir, docs_dir, root)
        if path is None:
            return match.group(0)
        served = docs_dir / REPO_PREFIX / path.relative_to(root)
        return f"{match.group(1)}{os.path.relpath(served, page_dir).replace(os.sep, '/')}{match.group(3)}"

    markdown = NOTEBOOKS_MARKER.sub(lambda m: _result_notebooks(m.group(1), root, page_dir), markdown)
    markdown = LINK.sub(relink, markdown)
    markdown = CLI_MARKER.sub(lambda m: _cli_help(m.group(1), root), markdown)
    markdown = CSV_MARKER.sub(lambda m: _csv_table(m.group(1), root), markdown)
    if KEYS_MARKER in markdown:
        markdown = markdown.replace(KEYS_MARKER, _spec_keys(root))
    if PARAMETERS_MARKER in markdown:
        markdown = markdown.replace(PARAMETERS_MARKER, _parameter_table(root))
    for marker, code in DECLARATION_MARKERS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, _python_output(
                root, f"from lmlib.data.dataset_spec import declaration_schema, declaration_table; {code}"))
    if METHOD_PARAMETERS_MARKER in markdown:
        markdown = markdown.replace(METHOD_PARAMETERS_MARKER, _parameter_table(root, "method_parameter_tables"))
    return markdown
