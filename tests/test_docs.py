"""The docs against the code: every cited DESIGN.md/README section exists as a heading, the serving
example serves the demo's registered model, and every documented `uniformer ...` command parses with
the job's own argparse parser (parsed, never run)."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "docs" / "benchmarks.md", ROOT / "infra" / "README.md",
        ROOT / "infra" / "configs" / "README.md", ROOT / "infra" / "local" / "README.md"]
CITED = re.compile(r"""(?<!its )(DESIGN|README)(?:\.md)?,? (?:section )?["']([^"']+)["']""")


def _headings(path: Path) -> set[str]:
    return {line.lstrip("#").strip() for line in path.read_text().splitlines() if line.startswith("#")}


def _citing_files() -> list[Path]:
    files = []
    for pattern in ("*.py", "*.md", "*.yaml", "*.sh"):
        for folder in ("model", "pipeline", "jobs", "infra", "tests", "docs"):
            files += (ROOT / folder).rglob(pattern)
    return [*files, ROOT / "README.md", ROOT / "DESIGN.md"]


def test_every_cited_section_exists():
    headings = {"DESIGN": _headings(ROOT / "DESIGN.md"), "README": _headings(ROOT / "README.md")}
    missing = [f"{path.relative_to(ROOT)}: {doc} {name!r}" for path in _citing_files()
               for doc, name in CITED.findall(path.read_text(errors="replace"))
               if not any(h == name or h.startswith(name) for h in headings[doc])]
    assert not missing, missing


def test_no_numbered_design_citations():
    numbered = [str(p.relative_to(ROOT)) for p in _citing_files() if p.name != "test_docs.py"
                and re.search(r"DESIGN(\.md)? ?(§|section \d|\d\b)", p.read_text(errors="replace"))]
    assert not numbered, numbered


def test_the_serving_example_serves_the_demos_model():
    name = yaml.safe_load((ROOT / "infra/configs/demo.yaml").read_text())["tracking"]["registered_model"]
    served = re.findall(r"mlflow models serve -m models:/([^@/\s]+)", (ROOT / "README.md").read_text())
    assert served and set(served) == {name}


def _commands() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S):
            text = re.sub(r"\\\n\s*", " ", block)
            for line in text.splitlines():
                line = line.split("   #")[0].split(" # ")[0].strip()
                if line.startswith("uniformer ") and "[" not in line:
                    found.append((doc.relative_to(ROOT).as_posix(), line))
    return found


class _Parsed(Exception):
    pass


def _parse(argv: list[str], monkeypatch) -> None:
    """Run the job's main until its parser has parsed (and the overrides loaded), then stop."""
    from pipeline import config

    real = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        ns = real(self, args, namespace)
        if getattr(ns, "overrides", None) is not None:
            config.load_config(getattr(ns, "config", None) or None, ns.overrides)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    job, rest = argv[0], argv[1:]
    if job == "submit":
        from jobs.submit import split_argv

        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", real)
        args, job_args = split_argv(rest)
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
        job, rest = args.job, job_args
    module = importlib.import_module(f"jobs.{job}")
    with pytest.raises(_Parsed):
        module.main(rest)


@pytest.mark.parametrize("doc,command", _commands())
def test_documented_commands_parse(doc, command, monkeypatch):
    argv = shlex.split(command.replace("$(", "").replace("$", ""))[1:]
    _parse(argv, monkeypatch)
