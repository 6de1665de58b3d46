"""The README and docs/ agree with the code: options, flags, extras, commands, paths, examples."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lcaam_patch
from lcaam_patch import LCAAMConfig
from lcaam_patch.backends import masking
from lcaam_patch.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
FIELDS = [field.name for field in dataclasses.fields(LCAAMConfig)]
DEMO_COMMAND = 'python3 -m venv .venv && .venv/bin/pip install -e ".[demo]" && .venv/bin/lcaam-patch demo'
MAX_README_LINES = 320


# written in parallel by other issues; drop a name once its file is committed
def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _section(text: str, heading: str) -> str:
    """The body of the markdown section whose heading line is exactly `heading`."""
    lines = text.splitlines()
    matches = [i for i, line in enumerate(lines) if line.strip() == heading]
    assert len(matches) == 1, f"expected one heading {heading!r}, found {len(matches)}"
    level = len(heading) - len(heading.lstrip("#"))
    body: list[str] = []
    fenced = False
    for line in lines[matches[0] + 1 :]:
        fenced ^= line.startswith("```")
        hashes = len(line) - len(line.lstrip("#"))
        if not fenced and line.startswith("#") and line[hashes : hashes + 1] == " " and hashes <= level:
            break
        body.append(line)
    return "\n".join(body)


def _options_table() -> dict[str, str]:
    """Option name -> default cell of README's options table."""
    rows: dict[str, str] = {}
    for line in _section(_read(README), "### Options of `apply`").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 3 or set(cells[0]) <= {"-", " "} or cells[0] == "option":
            continue
        names = re.findall(r"`(\w+)`", cells[0])
        assert names, f"options table row without an option name: {line}"
        for name in names:
            assert name not in rows, f"option {name} listed twice"
            rows[name] = cells[1]
    return rows


def _fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block, in order."""
    return [(lang, body.strip()) for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)]


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def _doc_files(*, history: bool = True) -> list[Path]:
    """README, docs/ and CONTRIBUTING.md; and CHANGELOG.md, which may name what was removed."""
    return [README, *DOCS, ROOT / "CONTRIBUTING.md", *([ROOT / "CHANGELOG.md"] if history else [])]


def test_readme_options_table_lists_exactly_the_config_fields() -> None:
    table = _options_table()
    assert sorted(table) == sorted(FIELDS)


def test_readme_options_table_shows_the_config_defaults() -> None:
    table = _options_table()
    for field in dataclasses.fields(LCAAMConfig):
        shown = ast.literal_eval(table[field.name].strip("`"))
        assert shown == field.default, f"README shows {field.name}={shown!r}, LCAAMConfig has {field.default!r}"


@pytest.mark.parametrize("command", ["run", "inspect"])
def test_cli_offers_a_flag_for_every_option(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    script = re.search(r'^lcaam-patch = "([\w.:]+)"', _read(ROOT / "pyproject.toml"), re.M)
    assert script is not None and script.group(1) == "lcaam_patch.cli:main", "the console script is not cli.main"
    text = _help(capsys, command)
    missing = [name for name in FIELDS if not re.search(rf"(?<![\w-])--{name.replace('_', '-')}(?![\w-])", text)]
    assert not missing, f"lcaam-patch {command} --help lacks flags for {missing}"


def test_apply_keyword_parameters_are_the_config_fields() -> None:
    parameters = inspect.signature(lcaam_patch.apply).parameters
    keywords = [
        name
        for name, parameter in parameters.items()
        if parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    assert keywords[0] == "model"
    assert sorted(name for name in keywords[1:] if name not in ("preset", "example_inputs")) == sorted(FIELDS)
    assert "preset" in keywords and "example_inputs" in keywords  # not config fields: a name, and tensors


def _install_extras() -> list[tuple[str, str]]:
    """(file, extra) for every extra named in an install command of the docs and CI files."""
    files = [*_doc_files(history=False), ROOT / ".ci" / "run", *sorted((ROOT / ".github" / "workflows").glob("*.yml"))]
    found = []
    for path in files:
        if not path.exists():
            continue
        for command in re.findall(r"pip install[^\n`]*", _read(path)):
            for extras in re.findall(r"(?:\.|lcaam-patch)\[([^\]]*)\]", command):
                found += [(path.relative_to(ROOT).as_posix(), e.strip()) for e in extras.split(",")]
    return found


def test_every_extra_in_an_install_command_exists_under_that_name() -> None:
    tomllib: Any = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    declared = tomllib.loads(_read(ROOT / "pyproject.toml"))["project"]["optional-dependencies"]
    for name in declared:
        assert name == re.sub(r"[-_.]+", "-", name).lower(), f"extra {name!r} is not a normalised name"
    found = _install_extras()
    assert {("README.md", "demo"), ("README.md", "test")} <= set(found), "install commands not found"
    unknown = [(where, extra) for where, extra in found if extra not in declared]
    assert not unknown, f"extras named in install commands but not in pyproject.toml: {unknown}"


def test_readme_starts_with_the_demo_and_the_ci_test_command() -> None:
    ci_lines = [line.strip() for line in _read(ROOT / ".ci" / "run").splitlines()]
    ci_commands = [line for line in ci_lines if line.startswith("python3 -m venv")]
    assert len(ci_commands) == 1, ".ci/run should run one set-up-and-test command"
    blocks = _fenced_blocks(_read(README))
    assert blocks[:2] == [("bash", DEMO_COMMAND), ("bash", ci_commands[0])]


def test_readme_is_short() -> None:
    assert len(_read(README).splitlines()) <= MAX_README_LINES


def _docstring_bullets(doc: str) -> list[str]:
    body = doc.split("\n\n", 1)[1]
    bullets = re.split(r"\n\s*- ", "\n" + body.strip())
    return [" ".join(bullet.split()) for bullet in bullets if bullet.strip() and not bullet.strip().endswith(":")]


def test_readme_mask_guarantee_is_the_masking_module_docstring() -> None:
    assert masking.__doc__ is not None
    guarantee = " ".join(_section(_read(README), "## What we guarantee").split())
    bullets = _docstring_bullets(masking.__doc__)
    assert len(bullets) >= 4
    for bullet in bullets:
        assert bullet in guarantee, f"README's guarantee lacks the masking rule: {bullet}"


def test_supported_upstreams_is_one_whole_table() -> None:
    section = _section(_read(README), "## Supported upstreams")
    tables = re.findall(r"(?:^\|.*\|\n?)+", section, re.M)
    assert len(tables) == 1, "the supported-upstreams table is split (a blank line inside it?)"
    rows = tables[0].strip().splitlines()
    widths = {len(re.findall(r"(?<!\\)\|", row)) for row in rows}
    assert len(widths) == 1, "rows of the supported-upstreams table have different cell counts"
    for upstream in ("timm", "MultiheadAttention", "QD-DETR", "SwinBERT", "LLaMA-Adapter", "transformers"):
        assert any(upstream in row for row in rows[2:]), f"no row for {upstream}"
    assert "docs/transformers.md" in tables[0]


def test_relative_links_and_paths_in_the_docs_exist() -> None:
    missing = []
    for path in _doc_files():
        text = _read(path)
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if re.match(r"\w+://", target):
                continue
            resolved = (path.parent / target).resolve()
            if not resolved.exists():
                missing.append(f"{path.name}: link {target}")
        for file in re.findall(r"`((?:lcaam_patch|tests|vendor_tests|benchmarks|docs|\.ci)/[\w./-]*\w)`", text):
            if not (ROOT / file).exists():
                missing.append(f"{path.name}: path {file}")
    assert not missing, missing


def _resolve(dotted: str) -> object:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_dotted_names_in_the_docs_exist() -> None:
    missing = []
    for path in _doc_files(history=False):
        for dotted in sorted(set(re.findall(r"`(lcaam_patch(?:\.\w+)+)", _read(path)))):
            try:
                _resolve(dotted)
            except (ImportError, AttributeError):
                missing.append(f"{path.name}: {dotted}")
    assert not missing, missing


def test_the_adapter_guide_example_runs() -> None:
    blocks = [body for lang, body in _fenced_blocks(_read(ROOT / "docs" / "adapters.md")) if lang == "python"]
    upstream = types.ModuleType("my_package.attention")
    sys.modules["my_package.attention"] = upstream
    try:
        exec(compile(blocks[0], "docs/adapters.md:upstream", "exec"), upstream.__dict__)
        exec(compile(blocks[1], "docs/adapters.md:adapter", "exec"), {"__name__": "docs_adapter_example"})
        model = nn.Sequential(upstream.MyAttention(), upstream.MyAttention())
        x = torch.randn(2, 10, 32)
        expected = model(x)
        lcaam_patch.apply(model, preset="my_paper_setting")
        assert [site.adapter.name for _, _, site in lcaam_patch.patched_sites(model)] == ["my_attention"] * 2
        torch.testing.assert_close(model(x), expected)
        lcaam_patch.remove(model)
        assert not lcaam_patch.is_patched(model)
    finally:
        del sys.modules["my_package.attention"]
        lcaam_patch.unregister_adapter("my_attention")


def test_the_backend_guide_example_runs() -> None:

    blocks = [body for lang, body in _fenced_blocks(_read(ROOT / "docs" / "backends.md")) if lang == "python"]
    try:
        exec(compile(blocks[0], "docs/backends.md:backend", "exec"), {"__name__": "docs_backend_example"})
        q, k, v = torch.randn(3, 2, 4, 8, 16).unbind(0)
        m = torch.randn(2, 8, 8)
        keep = torch.ones(2, 1, 1, 8, dtype=torch.bool)
        keep[0, ..., 3:] = False
        options: dict[str, Any] = {"fusion": "add", "scale": 0.25, "attn_mask": keep}
        expected, _ = lcaam_patch.lcaam_attention(q, k, v, m, backend="eager", **options)
        out, _ = lcaam_patch.lcaam_attention(q, k, v, m, backend="my_add", **options)
        torch.testing.assert_close(out, expected)
        with pytest.raises(lcaam_patch.BackendUnavailableError, match="my_add"):
            lcaam_patch.lcaam_attention(q, k, v, m, fusion="mul", scale=0.25, backend="my_add")
    finally:
        lcaam_patch.unregister_backend("my_add")
