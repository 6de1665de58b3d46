"""timm support, measured: the version matrix and the model census.

    python scripts/timm_versions.py matrix [VERSION ...]   # default: VERSIONS
    python scripts/timm_versions.py census [--json FILE]

`matrix` creates one virtualenv per timm version under $TIMM_VENVS (default
~/.cache/lcaam-patch/timm-venvs; reused when present),
installs torch, this package, that timm and pytest into it, runs the vendor sample
(vendor_tests/test_timm.py without the every-model meta census) and prints a table of
passed/failed/skipped/errors per version; it exits non-zero when any version fails. TORCH picks
the torch requirement (default "torch"), TORCH_INDEX the index torch alone comes from (e.g.
https://download.pytorch.org/whl/cpu, a few hundred MB instead of CUDA's GBs); PIP_ARGS adds
pip options to every install; --discard deletes each virtualenv after its run (CI disks).

`census` builds every timm model of the installed timm on the meta device, applies LCAAM
with default options and prints, per attention class, how many models contain it and how
many of those `apply` patched (a model counts once it patches without error).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import venv
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENVS = Path(os.environ.get("TIMM_VENVS", Path.home() / ".cache" / "lcaam-patch" / "timm-venvs"))
VERSIONS = ("0.9.16", "1.0.3", "1.0.9", "1.0.15", "1.0.16", "1.0.20", "1.0.31")
SAMPLE = ("vendor_tests/test_timm.py", "-k", "not test_meta_model_sites")


def _run(command: list[str], log: Path) -> int:
    with log.open("a") as out:
        out.write(f"$ {shlex.join(command)}\n")
        out.flush()
        return subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, check=False).returncode


def _environment(version: str, log: Path) -> Path | None:
    """The virtualenv for timm==`version` with everything installed, or None on failure."""
    home = VENVS / f"timm-{version}"
    python = home / "bin" / "python"
    if not python.exists():
        venv.create(home, with_pip=True, system_site_packages=False)
    pip = [str(python), "-m", "pip", "install", "-q", *shlex.split(os.environ.get("PIP_ARGS", ""))]
    torch = [os.environ.get("TORCH", "torch")]
    if os.environ.get("TORCH_INDEX"):
        torch += ["--index-url", os.environ["TORCH_INDEX"]]
    for requirement in (torch, ["-e", str(ROOT)], [f"timm=={version}", "pytest"]):
        if _run([*pip, *requirement], log) != 0:
            return None
    return python


def _summary(output: str) -> dict[str, int]:
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", output.splitlines()[-1] if output else ""):
        counts["errors" if word.startswith("error") else word] = int(number)
    return counts


def matrix(versions: list[str], discard: bool = False) -> int:
    """Run the vendor sample under each timm version; print the table; 0 when all pass.

    With `discard`, each virtualenv is deleted after its run."""
    VENVS.mkdir(exist_ok=True)
    rows = []
    for version in versions:
        log = VENVS / f"timm-{version}.log"
        log.write_text("")
        started = time.monotonic()
        python = _environment(version, log)
        if python is None:
            rows.append((version, "install failed", {}, time.monotonic() - started))
            continue
        result = subprocess.run(
            [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *SAMPLE],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        with log.open("a") as out:
            out.write(result.stdout + result.stderr)
        status = "pass" if result.returncode == 0 else "FAIL"
        rows.append((version, status, _summary(result.stdout.strip()), time.monotonic() - started))
        print(f"timm {version}: {status} ({log})", flush=True)
        if discard:
            shutil.rmtree(python.parent.parent)
    print("\n| timm | result | passed | failed | skipped | errors | seconds |\n|---|---|---|---|---|---|---|")
    for version, status, counts, seconds in rows:
        cells = " | ".join(str(counts.get(k, "-")) for k in ("passed", "failed", "skipped", "errors"))
        print(f"| {version} | {status} | {cells} | {seconds:.0f} |")
    return 0 if all(status == "pass" for _, status, _, _ in rows) else 1


def census(json_path: str | None) -> int:
    """Per attention class: models containing it, and how many of those apply patched."""
    import timm
    import torch

    import lcaam_patch
    from lcaam_patch.patching import looks_like_attention

    warnings.filterwarnings("ignore")
    inapplicable = {f"{c.__module__}.{c.__qualname__}" for c in lcaam_patch.get_adapter("timm").inapplicable()}
    records: dict[str, dict[str, Any]] = {}
    for name in timm.list_models():
        with torch.device("meta"):
            model = timm.create_model(name)
        classes = sorted(
            {
                f"{type(m).__module__}.{type(m).__qualname__}"
                for m in model.modules()
                if looks_like_attention(m) or f"{type(m).__module__}.{type(m).__qualname__}" in inapplicable
            }
        )
        if not classes:
            continue
        record: dict[str, Any] = {"classes": classes}
        try:
            lcaam_patch.apply(model)
            record["patched"] = sorted(
                {f"{type(m).__module__}.{type(m).__qualname__}" for _, m, _ in lcaam_patch.patched_sites(model)}
            )
        except Exception as error:  # the census reports every refusal
            record["error"] = f"{type(error).__name__}: {error}"
        records[name] = record
    contains: collections.Counter[str] = collections.Counter()
    patched: collections.Counter[str] = collections.Counter()
    for record in records.values():
        for cls in record["classes"]:
            contains[cls] += 1
            patched[cls] += "patched" in record
    total = sum("patched" in r for r in records.values())
    print(f"timm {timm.__version__}: {total} of {len(records)} models with an attention module patched\n")
    print("| class | models | patched | status |\n|---|---|---|---|")
    claimed = {f"{c.__module__}.{c.__qualname__}" for c in lcaam_patch.get_adapter("timm").attention_types()}
    for cls, count in contains.most_common():
        status = "claimed" if cls in claimed else "inapplicable" if cls in inapplicable else "-"
        print(f"| {cls} | {count} | {patched[cls]} | {status} |")
    errors = {name: r["error"] for name, r in records.items() if "error" in r and set(r["classes"]) & claimed}
    for name, error in sorted(errors.items()):
        print(f"error: {name}: {error[:200]}")
    if json_path:
        Path(json_path).write_text(json.dumps(records, indent=1))
    return 0


def main() -> int:
    """Parse the command line and run `matrix` or `census`."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run_matrix = commands.add_parser("matrix", help="run the vendor sample under several timm versions")
    run_matrix.add_argument("versions", nargs="*", default=list(VERSIONS))
    run_matrix.add_argument("--discard", action="store_true", help="delete each virtualenv after its run")
    run_census = commands.add_parser("census", help="count the timm models apply patches, per class")
    run_census.add_argument("--json", help="also write the per-model records here")
    args = parser.parse_args()
    if args.command == "matrix":
        return matrix(args.versions, args.discard)
    return census(args.json)


if __name__ == "__main__":
    sys.exit(main())
